//! Denoising schedulers: the small [`Scheduler`] interface, OmniGen's flow-matching Euler
//! scheduler and the diffusers flow-matching family ([`SchedulerKind`] names them).
//!
//! OmniGen is a rectified-flow model: time runs from `t = 0` (pure noise) to `t = 1` (clean
//! latents) and the transformer predicts the velocity `v = data - noise`. A scheduler decides at
//! which times the model is evaluated and how a velocity moves the latents to the next time.
//!
//! The diffusers schedulers ([`FlowMatchEulerDiscreteScheduler`], [`FlowMatchHeunScheduler`],
//! [`DpmSolverMultistepScheduler`], [`UniPcMultistepScheduler`]) are written in diffusers'
//! convention and translated at their edges: diffusers' flow sigma `σ` is OmniGen's `1 - t`, the
//! model is evaluated at `t = 1 - timestep / 1000` for each timestep the diffusers scheduler
//! yields, and the scheduler's model output is `-v` (diffusers' flow prediction is
//! `noise - data`). Their arithmetic follows diffusers 0.33.1 operation for operation (f64 where
//! numpy computes the grid, f32 where torch does), so that they agree with it to rounding.
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
use serde::{Deserialize, Serialize};

mod flow_match;
mod multistep;

pub use flow_match::{FlowMatchEulerDiscreteScheduler, FlowMatchHeunScheduler};
pub use multistep::{DpmSolverMultistepScheduler, UniPcMultistepScheduler};

/// Decides where the model is evaluated and how its velocity advances the latents.
///
/// The pipeline calls [`timesteps`](Scheduler::timesteps) once per generation, evaluates the
/// transformer at each returned time `t` (0 = noise, 1 = data) and passes the guided velocity to
/// [`step`](Scheduler::step) with the index of that time. Times may repeat (Heun evaluates the
/// model twice at most times) and may number more or fewer than the steps asked for.
pub trait Scheduler<B: Backend> {
    /// Starts a run of `num_steps` steps and returns the time of each model evaluation, in order.
    ///
    /// A scheduler is reusable: this forgets whatever an earlier run left behind (multistep
    /// history, a half-finished Heun step, a run cancelled midway).
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>>;

    /// Advances `latents` from evaluation `index`'s time to the next one using the predicted
    /// velocity (called once per time returned by [`timesteps`](Scheduler::timesteps), in order).
    fn step(&mut self, index: usize, latents: Tensor<B, 4>, velocity: Tensor<B, 4>)
        -> Tensor<B, 4>;
}

/// The built-in schedulers by name: what a command line, a config file or a server request
/// selects (`"euler"`, `"heun"`, `"dpmpp-2m"`, `"unipc"`, `"euler-shifted"`).
///
/// ```
/// use omnigen_models::scheduler::SchedulerKind;
/// let kind: SchedulerKind = "dpmpp-2m".parse()?;
/// assert_eq!(kind, SchedulerKind::DpmPp2m);
/// assert_eq!(kind.to_string(), "dpmpp-2m");
/// let err = "ddim".parse::<SchedulerKind>().unwrap_err().to_string();
/// assert!(err.contains("`ddim`") && err.contains("euler, heun, dpmpp-2m, unipc, euler-shifted"));
/// # Ok::<(), omnigen_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum SchedulerKind {
    /// The official OmniGen scheduler ([`FlowMatchEulerScheduler`]); the time shift is its
    /// `time_shifting_factor`.
    #[default]
    Euler,
    /// diffusers' `FlowMatchHeunDiscreteScheduler(shift)` ([`FlowMatchHeunScheduler`]): two model
    /// evaluations per step but the last.
    Heun,
    /// diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift,
    /// prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2)`
    /// ([`DpmSolverMultistepScheduler`]).
    DpmPp2m,
    /// diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift,
    /// prediction_type="flow_prediction")` ([`UniPcMultistepScheduler`]).
    UniPc,
    /// diffusers' `FlowMatchEulerDiscreteScheduler(shift)` ([`FlowMatchEulerDiscreteScheduler`]).
    EulerShifted,
}

impl SchedulerKind {
    /// Every built-in scheduler, in the order the documentation lists them.
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Euler,
        SchedulerKind::Heun,
        SchedulerKind::DpmPp2m,
        SchedulerKind::UniPc,
        SchedulerKind::EulerShifted,
    ];

    /// The name that selects it.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::Heun => "heun",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::EulerShifted => "euler-shifted",
        }
    }

    /// Whether it takes custom sigmas (the diffusers schedulers whose `set_timesteps` does).
    pub fn accepts_sigmas(self) -> bool {
        matches!(self, SchedulerKind::Euler | SchedulerKind::EulerShifted)
    }

    /// Checks the options [`build`](Self::build) would be given, naming the one at fault.
    pub fn check(self, time_shift: f32, sigmas: Option<&[f32]>) -> Result<()> {
        check_time_shift(time_shift)?;
        if let Some(s) = sigmas {
            if !self.accepts_sigmas() {
                return Err(Error::invalid_argument(
                    "sigmas",
                    format!(
                        "the {self} scheduler takes no custom sigmas (only euler and euler-shifted do)"
                    ),
                ));
            }
            check_sigmas(s)?;
        }
        Ok(())
    }

    /// The scheduler, with time shift `time_shift` (1 = none) and, for those that accept them,
    /// custom sigmas (diffusers' σ, strictly decreasing in `[0, 1]`; one per step).
    pub fn build<B: Backend>(
        self,
        time_shift: f32,
        sigmas: Option<&[f32]>,
    ) -> Result<Box<dyn Scheduler<B> + Send>> {
        self.check(time_shift, sigmas)?;
        let sigmas = sigmas.map(<[f32]>::to_vec);
        Ok(match self {
            SchedulerKind::Euler => Box::new(FlowMatchEulerScheduler {
                time_shift,
                custom: sigmas,
                sigmas: Vec::new(),
            }),
            SchedulerKind::EulerShifted => {
                Box::new(FlowMatchEulerDiscreteScheduler::new(time_shift, sigmas)?)
            }
            SchedulerKind::Heun => Box::new(FlowMatchHeunScheduler::<B>::new(time_shift)?),
            SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistepScheduler::<B>::new(time_shift)?),
            SchedulerKind::UniPc => Box::new(UniPcMultistepScheduler::<B>::new(time_shift)?),
        })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
                Error::invalid_argument(
                    "scheduler",
                    format!(
                        "unknown scheduler `{s}`; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

impl TryFrom<String> for SchedulerKind {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<SchedulerKind> for &'static str {
    fn from(kind: SchedulerKind) -> Self {
        kind.name()
    }
}

/// A time shift must be a finite positive number.
pub(crate) fn check_time_shift(time_shift: f32) -> Result<()> {
    if time_shift.is_finite() && time_shift > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            "time_shift",
            format!("must be finite and positive, got {time_shift}"),
        ))
    }
}

/// Custom sigmas: at least one, each in `[0, 1]`, strictly decreasing (diffusers' σ runs from
/// noise to data).
pub fn check_sigmas(sigmas: &[f32]) -> Result<()> {
    if sigmas.is_empty() {
        return Err(Error::invalid_argument(
            "sigmas",
            "at least one value is required",
        ));
    }
    if let Some((i, s)) = sigmas
        .iter()
        .enumerate()
        .find(|(_, s)| !(0.0..=1.0).contains(*s))
    {
        return Err(Error::invalid_argument(
            "sigmas",
            format!("value {i} ({s}) is outside [0, 1]"),
        ));
    }
    if let Some(i) = (1..sigmas.len()).find(|&i| sigmas[i] >= sigmas[i - 1]) {
        return Err(Error::invalid_argument(
            "sigmas",
            format!(
                "must be strictly decreasing, but value {i} ({}) follows {}",
                sigmas[i],
                sigmas[i - 1]
            ),
        ));
    }
    Ok(())
}

/// The custom sigmas of a run of `num_steps`: one per step.
fn custom_for(sigmas: &[f32], num_steps: usize) -> Result<&[f32]> {
    if sigmas.len() != num_steps {
        return Err(Error::invalid_argument(
            "sigmas",
            format!(
                "{} values given for {num_steps} steps (one per step)",
                sigmas.len()
            ),
        ));
    }
    Ok(sigmas)
}

/// diffusers' shift of custom sigmas, in numpy float32: `s·σ / (1 + (s − 1)·σ)`.
fn shift_f32(time_shift: f32, sigma: f32) -> f32 {
    let s1 = (f64::from(time_shift) - 1.0) as f32;
    (time_shift * sigma) / (1.0 + s1 * sigma)
}

/// The official OmniGen sampler: Euler integration of the flow from `t = 0` to `t = 1` on
/// `linspace(0, 1, n + 1)`, optionally warped by a time shift `s` as `t / (t + s - s·t)`
/// (`s = 1`, the official pipeline's value, leaves the grid uniform).
///
/// With custom sigmas it is diffusers' equivalent, `FlowMatchEulerDiscreteScheduler(
/// invert_sigmas=True, num_train_timesteps=1, shift=s)`: times `1 − shift(σ_i)`, then 1.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerScheduler {
    time_shift: f32,
    custom: Option<Vec<f32>>,
    sigmas: Vec<f32>,
}

impl Default for FlowMatchEulerScheduler {
    fn default() -> Self {
        Self {
            time_shift: 1.0,
            custom: None,
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
        check_time_shift(time_shift)?;
        Ok(Self {
            time_shift,
            ..Self::default()
        })
    }

    /// A scheduler on custom sigmas (diffusers' σ = 1 − t, strictly decreasing in `[0, 1]`, one
    /// per step), shifted by `time_shift`.
    pub fn with_sigmas(sigmas: Vec<f32>, time_shift: f32) -> Result<Self> {
        check_time_shift(time_shift)?;
        check_sigmas(&sigmas)?;
        Ok(Self {
            time_shift,
            custom: Some(sigmas),
            sigmas: Vec::new(),
        })
    }

    /// The `n + 1` times of the last prepared run, from the first evaluation's to 1.
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

/// `numpy.linspace(start, stop, num)` in f64, element for element: `i·step + start`, the last
/// point exactly `stop`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i == num - 1 {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// The OmniGen time of a diffusers timestep: `1 − timestep / 1000` in f32.
fn model_time(timestep: f32) -> f32 {
    1.0 - timestep / 1000.0
}

fn zero_steps() -> Error {
    Error::invalid_argument("num_inference_steps", "must be at least 1")
}

impl<B: Backend> Scheduler<B> for FlowMatchEulerScheduler {
    fn timesteps(&mut self, num_steps: usize) -> Result<Vec<f32>> {
        if num_steps == 0 {
            return Err(zero_steps());
        }
        let s = self.time_shift;
        self.sigmas = match &self.custom {
            None => linspace01(num_steps)
                .into_iter()
                .map(|t| t / (t + s - s * t))
                .collect(),
            Some(custom) => custom_for(custom, num_steps)?
                .iter()
                .map(|&sigma| 1.0 - shift_f32(s, sigma))
                .chain(std::iter::once(1.0))
                .collect(),
        };
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
    fn numpy_linspace_is_reproduced() {
        assert_eq!(np_linspace(1.0, 0.001, 5)[4], 0.001);
        assert_eq!(np_linspace(1000.0, 1.0, 1), [1000.0]);
        let l = np_linspace(1.0, 0.001, 7);
        assert_eq!(l[3], 3.0 * ((0.001 - 1.0) / 6.0) + 1.0);
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_typed_errors() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<SchedulerKind>(&json).unwrap(), kind);
        }
        let err = "euler_a".parse::<SchedulerKind>().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { name: "scheduler", reason } if reason.contains("`euler_a`")),
            "{err}"
        );
        let err = serde_json::from_str::<SchedulerKind>("\"lms\"").unwrap_err();
        assert!(err.to_string().contains("unknown scheduler `lms`"), "{err}");
    }

    #[test]
    fn custom_sigmas_are_validated_and_named() {
        let bad = |s: &[f32]| match check_sigmas(s) {
            Err(Error::InvalidArgument {
                name: "sigmas",
                reason,
            }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(bad(&[]).contains("at least one"));
        assert!(bad(&[1.0, 1.5]).contains("value 1 (1.5) is outside [0, 1]"));
        assert!(bad(&[0.9, f32::NAN]).contains("outside"));
        assert!(bad(&[1.0, 0.5, 0.5]).contains("strictly decreasing"));
        assert!(bad(&[0.2, 0.8]).contains("strictly decreasing"));
        assert!(check_sigmas(&[1.0, 0.5, 0.0]).is_ok());
        let err = SchedulerKind::Heun
            .build::<crate::DefaultBackend>(1.0, Some(&[1.0, 0.5]))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("heun scheduler takes no custom sigmas"),
            "{err}"
        );
        assert!(SchedulerKind::UniPc
            .build::<crate::DefaultBackend>(0.0, None)
            .is_err());
    }

    #[test]
    fn official_grid_from_custom_sigmas() {
        // the default grid written as diffusers sigmas gives the default times
        let mut s = FlowMatchEulerScheduler::with_sigmas(vec![1.0, 0.75, 0.5, 0.25], 1.0).unwrap();
        let t = Scheduler::<crate::DefaultBackend>::timesteps(&mut s, 4).unwrap();
        assert_eq!(t, [0.0, 0.25, 0.5, 0.75]);
        assert_eq!(s.sigmas()[4], 1.0);
        assert!(Scheduler::<crate::DefaultBackend>::timesteps(&mut s, 5).is_err());
    }

    #[test]
    fn zero_steps_is_an_error() {
        let mut s = FlowMatchEulerScheduler::new();
        assert!(Scheduler::<crate::DefaultBackend>::timesteps(&mut s, 0).is_err());
    }
}
