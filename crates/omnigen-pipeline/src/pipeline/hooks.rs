//! Observers of a running generation: progress reports and cancellation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Optional observers of a generation.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Called after every denoising step.
    pub on_progress: Option<&'a mut dyn FnMut(Progress)>,
    /// Checked before every step; a cancelled token ends the call with
    /// [`Error::Cancelled`](omnigen_core::Error::Cancelled).
    pub cancel: Option<CancellationToken>,
}

impl Hooks<'_> {
    /// Whether the caller asked to stop.
    pub(super) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// Reports a finished step.
    pub(super) fn report(&mut self, progress: Progress) {
        if let Some(cb) = self.on_progress.as_mut() {
            cb(progress);
        }
    }
}
