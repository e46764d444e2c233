//! Observers of a running generation: progress reports, cancellation and a per-step callback
//! that may read or replace the latents.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Where the denoising loop is, reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps completed (1-based).
    pub step: usize,
    /// Steps in total.
    pub total: usize,
    /// Time since the loop started.
    pub elapsed: Duration,
}

/// Cancels a running generation from another thread; checked before every step.
#[derive(Debug, Clone, Default)]
pub struct CancellationToken(Arc<AtomicBool>);

impl CancellationToken {
    /// A token that has not been cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Called after every scheduler step with the step's index (0-based, one per model
/// evaluation), the time the model was evaluated at and the latents the step produced
/// `[N, 4, h, w]`, which it may read or replace (diffusers' `callback_on_step_end`). A
/// multistep scheduler's history is not changed by a replacement.
pub type StepEndFn<'a, B> = dyn FnMut(usize, f32, &mut Tensor<B, 4>) + 'a;

/// Optional observers of a generation.
pub struct Hooks<'a, B: Backend> {
    /// Called after every denoising step.
    pub on_progress: Option<&'a mut dyn FnMut(Progress)>,
    /// Checked before every step; a cancelled token ends the call with
    /// [`Error::Cancelled`](omnigen_core::Error::Cancelled).
    pub cancel: Option<CancellationToken>,
    /// Called after every step, before the progress report (see [`StepEndFn`]).
    pub on_step_end: Option<&'a mut StepEndFn<'a, B>>,
}

impl<B: Backend> Default for Hooks<'_, B> {
    fn default() -> Self {
        Self {
            on_progress: None,
            cancel: None,
            on_step_end: None,
        }
    }
}

impl<B: Backend> Hooks<'_, B> {
    /// Whether the caller asked to stop.
    pub(super) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// Hands the step's latents to the step callback.
    pub(super) fn step_end(&mut self, step: usize, t: f32, latents: &mut Tensor<B, 4>) {
        if let Some(cb) = self.on_step_end.as_mut() {
            cb(step, t, latents);
        }
    }

    /// Reports a finished step.
    pub(super) fn report(&mut self, progress: Progress) {
        if let Some(cb) = self.on_progress.as_mut() {
            cb(progress);
        }
    }
}
