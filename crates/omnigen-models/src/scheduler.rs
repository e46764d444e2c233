//! Denoising schedulers.
