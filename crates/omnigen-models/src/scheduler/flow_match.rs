//! diffusers' flow-matching schedulers on their own σ grid: Euler (`euler-shifted`) and Heun.

use burn::tensor::{backend::Backend, Tensor};
use omnigen_core::Result;

use super::{
    check_time_shift, custom_for, model_time, np_linspace, shift_f32, zero_steps, Scheduler,
};

const TRAIN_TIMESTEPS: f32 = 1000.0;

/// The σ grid of `FlowMatch{Euler,Heun}DiscreteScheduler.set_timesteps(n)` with `shift` (before
/// the final 0 is appended), as diffusers forms it.
///
/// `__init__` shifts the training σ (in torch f32), so `sigma_min` is the shifted `1/1000`;
/// `set_timesteps` spaces the timesteps between the shifted ends in numpy f64 and shifts them
/// again (diffusers shifts `sigma_min` twice), then rounds to f32.
fn flow_match_grid(shift: f32, n: usize) -> Vec<f32> {
    let s1 = (f64::from(shift) - 1.0) as f32;
    let shifted = |sigma: f32| (shift * sigma) / (1.0 + s1 * sigma);
    let sigma_max = shifted(1.0);
    let sigma_min = shifted(1.0 / TRAIN_TIMESTEPS);
    let t = f64::from(TRAIN_TIMESTEPS);
    let s = f64::from(shift);
    np_linspace(f64::from(sigma_max) * t, f64::from(sigma_min) * t, n)
        .into_iter()
        .map(|ts| {
            let sigma = ts / t;
            (s * sigma / (1.0 + (s - 1.0) * sigma)) as f32
        })
        .collect()
}

/// diffusers' `FlowMatchEulerDiscreteScheduler(shift=s)` (every other argument at its 0.33.1
/// default), the `euler-shifted` scheduler.
///
/// Its grid runs from σ = 1 to the (twice) shifted `1/1000`, then a last step to σ = 0; custom
/// sigmas replace the grid and are shifted once.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    shift: f32,
    custom: Option<Vec<f32>>,
    /// σ of the run, with the final 0.
    sigmas: Vec<f32>,
}

impl FlowMatchEulerDiscreteScheduler {
    /// The scheduler with `shift` (diffusers' `shift`, 1 = none) and optional custom sigmas
    /// (validated when the run starts).
    pub fn new(shift: f32, sigmas: Option<Vec<f32>>) -> Result<Self> {
        check_time_shift(shift)?;
        if let Some(s) = &sigmas {
            super::check_sigmas(s)?;
        }
        Ok(Self {
            shift,
            custom: sigmas,
            sigmas: Vec::new(),
        })
    }

    /// σ of the last prepared run, the final 0 included.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl<B: Backend> Scheduler<B> for FlowMatchEulerDiscreteScheduler {
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
        if num_steps == 0 {
            return Err(zero_steps());
        }
        self.sigmas = match &self.custom {
            None => flow_match_grid(self.shift, num_steps),
            Some(custom) => custom_for(custom, num_steps)?
                .iter()
                .map(|&s| shift_f32(self.shift, s))
                .collect(),
        };
        let times = self
            .sigmas
            .iter()
            .map(|&s| model_time(s * TRAIN_TIMESTEPS))
            .collect();
        self.sigmas.push(0.0);
        Ok(times)
    }

    fn step(
        &mut self,
        index: usize,
        latents: Tensor<B, 4>,
        velocity: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let dt = self.sigmas[index + 1] - self.sigmas[index];
        latents + velocity.neg() * dt
    }
}

/// The first half of a Heun step, kept for its second evaluation.
#[derive(Debug, Clone)]
struct Predictor<B: Backend> {
    sample: Tensor<B, 4>,
    derivative: Tensor<B, 4>,
    dt: f32,
}

/// diffusers' `FlowMatchHeunDiscreteScheduler(shift=s)` (0.33.1 defaults otherwise): Heun's
/// method on the flow-matching grid.
///
/// `n` steps evaluate the model `2n − 1` times: every step but the last is an Euler predictor
/// followed by a corrector at the predicted point, which averages the two slopes; the last step
/// (to σ = 0) is plain Euler. Times therefore repeat: `t_0, t_1, t_1, t_2, t_2, …`.
#[derive(Debug, Clone)]
pub struct FlowMatchHeunScheduler<B: Backend> {
    shift: f32,
    /// diffusers' interleaved σ: `σ_0, σ_1, σ_1, …, σ_{n−1}, σ_{n−1}, 0`.
    sigmas: Vec<f32>,
    predictor: Option<Predictor<B>>,
}

impl<B: Backend> FlowMatchHeunScheduler<B> {
    /// The scheduler with `shift` (diffusers' `shift`, 1 = none).
    pub fn new(shift: f32) -> Result<Self> {
        check_time_shift(shift)?;
        Ok(Self {
            shift,
            sigmas: Vec::new(),
            predictor: None,
        })
    }
}

impl<B: Backend> Scheduler<B> for FlowMatchHeunScheduler<B> {
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
        if num_steps == 0 {
            return Err(zero_steps());
        }
        let grid = flow_match_grid(self.shift, num_steps);
        self.sigmas = std::iter::once(grid[0])
            .chain(grid[1..].iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(0.0))
            .collect();
        self.predictor = None;
        Ok(self.sigmas[..self.sigmas.len() - 1]
            .iter()
            .map(|&s| model_time(s * TRAIN_TIMESTEPS))
            .collect())
    }

    fn step(
        &mut self,
        index: usize,
        latents: Tensor<B, 4>,
        velocity: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let model_output = velocity.neg();
        match self.predictor.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[index], self.sigmas[index + 1]);
                // diffusers forms the slope through the denoised sample, not from the output alone
                let denoised = latents.clone() - model_output * sigma;
                let derivative = (latents.clone() - denoised) / sigma;
                let dt = sigma_next - sigma;
                let next = latents.clone() + derivative.clone() * dt;
                self.predictor = Some(Predictor {
                    sample: latents,
                    derivative,
                    dt,
                });
                next
            }
            Some(p) => {
                let sigma_next = self.sigmas[index];
                let denoised = latents.clone() - model_output * sigma_next;
                let derivative = (latents - denoised) / sigma_next;
                let derivative = (p.derivative + derivative) * 0.5;
                p.sample + derivative * p.dt
            }
        }
    }
}
