//! Denoising schedulers: the small [`Scheduler`] interface and OmniGen's flow-matching Euler
//! scheduler.
//!
//! OmniGen is a rectified-flow model: time runs from `t = 0` (pure noise) to `t = 1` (clean
//! latents) and the transformer predicts the velocity `v = data - noise`. A scheduler decides at
//! which times the model is evaluated and how a velocity moves the latents to the next time.
//!
//! # Writing your own
//!
//! Implement [`Scheduler`] for any type, in any crate, and hand it to the pipeline. This one takes
//! Euler steps on a cosine-spaced time grid, denser near both ends:
//!
//! ```
//! use burn::tensor::{backend::Backend, Tensor};
//! use omnigen_models::scheduler::Scheduler;
//! use omnigen_core::Result;
//!
//! /// Euler steps on `t_i = (1 - cos(pi * i / n)) / 2`.
//! struct CosineEuler {
//!     times: Vec<f32>,
//! }
//!
//! impl<B: Backend> Scheduler<B> for CosineEuler {
//!     fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
//!         let n = num_steps as f32;
//!         self.times = (0..=num_steps)
//!             .map(|i| (1.0 - (std::f32::consts::PI * i as f32 / n).cos()) / 2.0)
//!             .collect();
//!         Ok(self.times[..num_steps].to_vec())
//!     }
//!
//!     fn step(&mut self, index: usize, latents: Tensor<B, 4>, velocity: Tensor<B, 4>) -> Tensor<B, 4> {
//!         let dt = self.times[index + 1] - self.times[index];
//!         latents + velocity * dt
//!     }
//! }
//!
//! // Drive it as the pipeline does: evaluate the model at each time, then step.
//! type B = omnigen_models::DefaultBackend;
//! let device = Default::default();
//! let mut scheduler = CosineEuler { times: vec![] };
//! let times = Scheduler::<B>::timesteps(&mut scheduler, 4)?;
//! assert_eq!(times.len(), 4);
//! assert_eq!(times[0], 0.0);
//! let mut z = Tensor::<B, 4>::zeros([1, 4, 2, 2], &device);
//! for (i, _t) in times.iter().enumerate() {
//!     let velocity = Tensor::<B, 4>::ones([1, 4, 2, 2], &device); // a model would predict this
//!     z = scheduler.step(i, z, velocity);
//! }
//! // A constant unit velocity integrated from t = 0 to t = 1 moves the latents by exactly 1.
//! let moved: f32 = z.mean().into_scalar();
//! assert!((moved - 1.0).abs() < 1e-6);
//! # Ok::<(), omnigen_core::Error>(())
//! ```

use burn::tensor::{backend::Backend, Tensor};
use omnigen_core::{Error, Result};

/// Decides where the model is evaluated and how its velocity advances the latents.
///
/// The pipeline calls [`timesteps`](Scheduler::timesteps) once per generation, evaluates the
/// transformer at each returned time `t` (0 = noise, 1 = data) and passes the guided velocity to
/// [`step`](Scheduler::step) with the index of that time.
pub trait Scheduler<B: Backend> {
    /// Prepares a run of `num_steps` model evaluations and returns the time of each, in order.
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>>;

    /// Advances `latents` from step `index`'s time to the next one using the predicted velocity.
    fn step(&mut self, index: usize, latents: Tensor<B, 4>, velocity: Tensor<B, 4>)
        -> Tensor<B, 4>;
}

/// The official OmniGen sampler: Euler integration of the flow from `t = 0` to `t = 1` on
/// `linspace(0, 1, n + 1)`, optionally warped by a time shift `s` as `t / (t + s - s·t)`
/// (`s = 1`, the official pipeline's value, leaves the grid uniform).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerScheduler {
    time_shift: f32,
    sigmas: Vec<f32>,
}

impl Default for FlowMatchEulerScheduler {
    fn default() -> Self {
        Self {
            time_shift: 1.0,
            sigmas: Vec::new(),
        }
    }
}

impl FlowMatchEulerScheduler {
    /// The official scheduler (no time shift).
    pub fn new() -> Self {
        Self::default()
    }

    /// A scheduler with time shift `s > 0`; `s > 1` spends more steps near the noise end.
    pub fn with_time_shift(time_shift: f32) -> Result<Self> {
        if !(time_shift.is_finite() && time_shift > 0.0) {
            return Err(Error::invalid_argument(
                "time_shift",
                format!("must be finite and positive, got {time_shift}"),
            ));
        }
        Ok(Self {
            time_shift,
            sigmas: Vec::new(),
        })
    }

    /// The `n + 1` times of the last prepared run, from 0 to 1.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// `torch.linspace(0, 1, n + 1)` in f32, element for element: the first half counts up from 0,
/// the second half down from 1, which is how PyTorch keeps both ends exact.
fn linspace01(n: usize) -> Vec<f32> {
    let step = 1.0f32 / n as f32;
    let half = n.div_ceil(2); // torch: steps / 2 with steps = n + 1 points
    (0..=n)
        .map(|i| {
            if i < half {
                i as f32 * step
            } else {
                1.0 - (n - i) as f32 * step
            }
        })
        .collect()
}

impl<B: Backend> Scheduler<B> for FlowMatchEulerScheduler {
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
        if num_steps == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let s = self.time_shift;
        self.sigmas = linspace01(num_steps)
            .into_iter()
            .map(|t| t / (t + s - s * t))
            .collect();
        Ok(self.sigmas[..num_steps].to_vec())
    }

    fn step(
        &mut self,
        index: usize,
        latents: Tensor<B, 4>,
        velocity: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        // z_{i+1} = z_i + (t_{i+1} - t_i) * v: the time step is formed in f32 as the official code does.
        let dt = self.sigmas[index + 1] - self.sigmas[index];
        latents + velocity * dt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_for_the_official_step_counts() {
        // torch.linspace(0, 1, 5) and (0, 1, 51) endpoints and midpoints.
        assert_eq!(linspace01(4), [0.0, 0.25, 0.5, 0.75, 1.0]);
        let l = linspace01(50);
        assert_eq!(l.len(), 51);
        assert_eq!(l[0], 0.0);
        assert_eq!(l[50], 1.0);
        assert_eq!(l[1], 0.02f32);
        assert_eq!(l[49], 1.0 - 0.02f32);
    }

    #[test]
    fn time_shift_warps_towards_noise() {
        let mut s = FlowMatchEulerScheduler::with_time_shift(3.0).unwrap();
        let t = Scheduler::<crate::DefaultBackend>::timesteps(&mut s, 4).unwrap();
        // t / (t + 3 - 3t) at t = 0.5 is 0.25
        assert!((t[2] - 0.25).abs() < 1e-7);
        assert_eq!(s.sigmas()[4], 1.0);
        assert!(FlowMatchEulerScheduler::with_time_shift(0.0).is_err());
        assert!(FlowMatchEulerScheduler::with_time_shift(f32::NAN).is_err());
    }

    #[test]
    fn zero_steps_is_an_error() {
        let mut s = FlowMatchEulerScheduler::new();
        assert!(Scheduler::<crate::DefaultBackend>::timesteps(&mut s, 0).is_err());
    }
}
