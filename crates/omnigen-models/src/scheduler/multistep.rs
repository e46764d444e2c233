//! diffusers' multistep solvers on flow sigmas: DPM-Solver++ (2M) and UniPC (bh2, order 2).
//!
//! Both work on the data prediction `x0 = z − σ·m` (`m = −v`, diffusers' flow prediction) and in
//! half-log-SNR `λ = ln(1 − σ) − ln σ`; the history they keep is the previous `x0`s.

use burn::tensor::{backend::Backend, Tensor};
use omnigen_core::Result;

use super::{check_time_shift, model_time, np_linspace, zero_steps, Scheduler};

const TRAIN_TIMESTEPS: f64 = 1000.0;

/// `set_timesteps(n)` with `use_flow_sigmas=True`: σ (f32, the final 0 appended) and the int64
/// timesteps, formed in numpy f64 as diffusers does.
fn flow_sigmas(flow_shift: f32, n: usize) -> (Vec<f32>, Vec<f32>) {
    let s = f64::from(flow_shift);
    let shifted: Vec<f64> = np_linspace(1.0, 1.0 / TRAIN_TIMESTEPS, n + 1)
        .into_iter()
        .map(|alpha| {
            let sigma = 1.0 - alpha;
            s * sigma / (1.0 + (s - 1.0) * sigma)
        })
        .collect();
    // flipped, without the last point (σ = 0)
    let grid: Vec<f64> = (0..n).map(|i| shifted[n - i]).collect();
    // timesteps are truncated to int64; the model sees those integers
    let timesteps = grid
        .iter()
        .map(|&g| (g * TRAIN_TIMESTEPS) as i64 as f32)
        .collect();
    let sigmas = grid
        .iter()
        .map(|&g| g as f32)
        .chain(std::iter::once(0.0))
        .collect();
    (sigmas, timesteps)
}

/// `λ(σ) = ln α − ln σ` with `α = 1 − σ`, in f32 (`+∞` at σ = 0).
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

/// The 2×2 solve `R·ρ = b` as LAPACK's `sgesv` does it (partial pivoting, the pivot's
/// reciprocal scaling the column), which is what `torch.linalg.solve` runs on the CPU.
fn solve2(r: [[f32; 2]; 2], b: [f32; 2]) -> [f32; 2] {
    let (mut r, mut b) = (r, b);
    if r[1][0].abs() > r[0][0].abs() {
        r.swap(0, 1);
        b.swap(0, 1);
    }
    let l = r[1][0] * (1.0 / r[0][0]);
    let u11 = r[1][1] - l * r[0][1];
    let y1 = b[1] - l * b[0];
    let x1 = y1 / u11;
    let x0 = (b[0] - x1 * r[0][1]) / r[0][0];
    [x0, x1]
}

/// diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=s,
/// prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2)` with every
/// other argument at its 0.33.1 default (`solver_type="midpoint"`, `lower_order_final=True`,
/// `final_sigmas_type="zero"`): DPM-Solver++(2M).
///
/// The first and the last step are first order; the others use the previous step's `x0`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler<B: Backend> {
    flow_shift: f32,
    sigmas: Vec<f32>,
    steps: usize,
    previous_x0: Option<Tensor<B, 4>>,
}

impl<B: Backend> DpmSolverMultistepScheduler<B> {
    /// The scheduler with `flow_shift` (1 = none).
    pub fn new(flow_shift: f32) -> Result<Self> {
        check_time_shift(flow_shift)?;
        Ok(Self {
            flow_shift,
            sigmas: Vec::new(),
            steps: 0,
            previous_x0: None,
        })
    }
}

impl<B: Backend> Scheduler<B> for DpmSolverMultistepScheduler<B> {
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
        if num_steps == 0 {
            return Err(zero_steps());
        }
        let (sigmas, timesteps) = flow_sigmas(self.flow_shift, num_steps);
        self.sigmas = sigmas;
        self.steps = num_steps;
        self.previous_x0 = None;
        Ok(timesteps.into_iter().map(model_time).collect())
    }

    fn step(
        &mut self,
        index: usize,
        latents: Tensor<B, 4>,
        velocity: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let (sigma_s0, sigma_t) = (self.sigmas[index], self.sigmas[index + 1]);
        let x0 = latents.clone() - velocity.neg() * sigma_s0;
        let alpha_t = 1.0 - sigma_t;
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let c_sample = sigma_t / sigma_s0;
        let c_x0 = alpha_t * ((-h).exp() - 1.0);
        // lower_order_final with final_sigmas_type="zero": the step to σ = 0 is first order
        let last = index + 1 == self.steps;
        let next = match self.previous_x0.take() {
            Some(m1) if !last => {
                let sigma_s1 = self.sigmas[index - 1];
                let r0 = (lambda(sigma_s0) - lambda(sigma_s1)) / h;
                let d1 = (x0.clone() - m1) * (1.0 / r0);
                latents * c_sample - x0.clone() * c_x0 - d1 * (0.5 * c_x0)
            }
            _ => latents * c_sample - x0.clone() * c_x0,
        };
        self.previous_x0 = Some(x0);
        next
    }
}

/// diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s,
/// prediction_type="flow_prediction")` with every other argument at its 0.33.1 default
/// (`solver_order=2`, `solver_type="bh2"`, `predict_x0=True`, `lower_order_final=True`,
/// `final_sigmas_type="zero"`): the UniP predictor and, from the second step on, the UniC
/// corrector of the previous step's result with this step's model output.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler<B: Backend> {
    flow_shift: f32,
    sigmas: Vec<f32>,
    steps: usize,
    /// `x0` of the last two steps, oldest first.
    history: [Option<Tensor<B, 4>>; 2],
    /// The sample the last predictor started from (after its correction).
    last_sample: Option<Tensor<B, 4>>,
    /// The order of the last predictor, which its corrector reuses.
    last_order: usize,
}

impl<B: Backend> UniPcMultistepScheduler<B> {
    /// The scheduler with `flow_shift` (1 = none).
    pub fn new(flow_shift: f32) -> Result<Self> {
        check_time_shift(flow_shift)?;
        Ok(Self {
            flow_shift,
            sigmas: Vec::new(),
            steps: 0,
            history: [None, None],
            last_sample: None,
            last_order: 0,
        })
    }

    /// `multistep_uni_c_bh_update`: corrects the sample the last step predicted, using this
    /// step's `x0` (`model_t`).
    fn correct(&self, index: usize, model_t: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        let x = self.last_sample.clone()?;
        let m0 = self.history[1].clone()?;
        let (sigma_t, sigma_s0) = (self.sigmas[index], self.sigmas[index - 1]);
        let alpha_t = 1.0 - sigma_t;
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let x_t_ = x * (sigma_t / sigma_s0) - m0.clone() * (alpha_t * h_phi_1);
        let d1_t = model_t.clone() - m0.clone();
        let corrected = match (self.last_order, &self.history[0]) {
            (2, Some(m1)) => {
                let rk = (lambda(self.sigmas[index - 2]) - lambda_s0) / h;
                let d1 = (m1.clone() - m0) / rk;
                let mut h_phi_k = h_phi_1 / hh - 1.0;
                let b1 = h_phi_k * 1.0 / b_h;
                h_phi_k = h_phi_k / hh - 1.0 / 2.0;
                let b2 = h_phi_k * 2.0 / b_h;
                let [rho0, rho1] = solve2([[1.0, 1.0], [rk, 1.0]], [b1, b2]);
                x_t_ - (d1 * rho0 + d1_t * rho1) * (alpha_t * b_h)
            }
            _ => x_t_ - (d1_t * 0.5) * (alpha_t * b_h),
        };
        Some(corrected)
    }

    /// `multistep_uni_p_bh_update`: predicts the next sample from `x` and the `x0` history.
    fn predict(
        &self,
        index: usize,
        x: Tensor<B, 4>,
        m0: Tensor<B, 4>,
        order: usize,
    ) -> Tensor<B, 4> {
        let (sigma_t, sigma_s0) = (self.sigmas[index + 1], self.sigmas[index]);
        let alpha_t = 1.0 - sigma_t;
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let x_t_ = x * (sigma_t / sigma_s0) - m0.clone() * (alpha_t * h_phi_1);
        match (order, &self.history[0]) {
            (2, Some(m1)) => {
                let rk = (lambda(self.sigmas[index - 1]) - lambda_s0) / h;
                let d1 = (m1.clone() - m0) / rk;
                let b_h = hh.exp_m1();
                x_t_ - (d1 * 0.5) * (alpha_t * b_h)
            }
            _ => x_t_,
        }
    }
}

impl<B: Backend> Scheduler<B> for UniPcMultistepScheduler<B> {
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
        if num_steps == 0 {
            return Err(zero_steps());
        }
        let (sigmas, timesteps) = flow_sigmas(self.flow_shift, num_steps);
        self.sigmas = sigmas;
        self.steps = num_steps;
        self.history = [None, None];
        self.last_sample = None;
        self.last_order = 0;
        Ok(timesteps.into_iter().map(model_time).collect())
    }

    fn step(
        &mut self,
        index: usize,
        latents: Tensor<B, 4>,
        velocity: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        // x0 from the sample the model saw, before any correction of it
        let x0 = latents.clone() - velocity.neg() * self.sigmas[index];
        let sample = if index > 0 {
            self.correct(index, &x0).unwrap_or(latents)
        } else {
            latents
        };
        let [_, newer] = std::mem::take(&mut self.history);
        self.history = [newer, Some(x0.clone())];
        // warm-up, and lower_order_final: order 1 on the first and the last step
        let order = 2.min(self.steps - index).min(index + 1);
        self.last_order = order;
        self.last_sample = Some(sample.clone());
        self.predict(index, sample, x0, order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_sigmas_and_integer_timesteps_match_diffusers() {
        // DPMSolverMultistepScheduler(use_flow_sigmas=True).set_timesteps(6): timesteps
        // [999, 832, 666, 499, 332, 166], sigmas [0.999, 0.8325, ..., 0.1665, 0]
        let (sigmas, timesteps) = flow_sigmas(1.0, 6);
        assert_eq!(timesteps, [999.0, 832.0, 666.0, 499.0, 332.0, 166.0]);
        assert_eq!(sigmas.len(), 7);
        assert_eq!(sigmas[0], 0.999);
        assert_eq!(sigmas[6], 0.0);
    }

    #[test]
    fn the_two_by_two_solve_solves() {
        let [x0, x1] = solve2([[1.0, 1.0], [-0.8, 1.0]], [0.3, 0.7]);
        assert!((x0 + x1 - 0.3).abs() < 1e-6 && (-0.8 * x0 + x1 - 0.7).abs() < 1e-6);
    }
}
