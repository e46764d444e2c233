//! The generation pipeline: prompt → processor → VAE encode → transformer ⇄ scheduler → VAE
//! decode.
//!
//! - [`builder`]: loading a model folder (or hub id) into an [`OmniGenPipeline`];
//! - [`sampling`]: [`OmniGenPipeline::generate_with`], the loop, its stages numbered;
//! - `branch` (private): per-guidance-branch state (condition, KV cache) and the per-step transformer
//!   calls;
//! - [`decode`]: latents to 8-bit images ([`tensor_to_rgb8`]);
//! - [`hooks`]: progress reports, cancellation and the step callback.

mod branch;
pub mod builder;
pub mod decode;
pub mod hooks;
pub mod sampling;

use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use image::RgbImage;
use omnigen_models::ops::KernelBackend;
use omnigen_models::transformer::OmniGenTransformer;
use omnigen_models::vae::AutoencoderKL;

use crate::processor::OmniGenProcessor;

pub use builder::PipelineBuilder;
pub use decode::tensor_to_rgb8;
pub use hooks::{CancellationToken, Hooks, Progress, StepEndFn};

/// Refuses a tensor holding NaN or infinity: one sum on the device and one scalar read back, so
/// it runs after every step. A sum of finite values too large for f32 also counts (latents and
/// pixels that large are as broken).
pub(crate) fn check_finite<B: Backend, const D: usize>(
    t: &Tensor<B, D>,
    stage: &'static str,
    step: Option<usize>,
) -> omnigen_core::Result<()> {
    use burn::tensor::ElementConversion;
    let sum: f32 = t.clone().sum().into_scalar().elem();
    if sum.is_finite() {
        Ok(())
    } else {
        Err(omnigen_core::Error::NonFinite { stage, step })
    }
}

/// Time and size figures of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Sequence length of each forward per step, per guidance branch (or of the joint batch).
    pub tokens_per_branch: Vec<usize>,
    /// Preprocessing and tokenisation.
    pub process: Duration,
    /// VAE encoding of input images.
    pub encode: Duration,
    /// The denoising loop.
    pub denoise: Duration,
    /// VAE decoding.
    pub decode: Duration,
    /// Peak resident memory of the process so far (`VmHWM`), where the system reports it.
    pub peak_memory_bytes: Option<u64>,
    /// The memory guard's estimate of what the generation needs beyond the loaded model, in
    /// bytes, when it was computed (backends whose memory the guard knows).
    pub memory_estimate: Option<u64>,
    /// The seed every random draw came from: the request's, or the one drawn for it (record it
    /// to reproduce an unseeded run).
    pub seed: u64,
}

/// The result of [`OmniGenPipeline::generate`].
#[derive(Debug, Clone)]
pub struct Generation<B: Backend> {
    /// One image per prompt × image per prompt, in order.
    pub images: Vec<RgbImage>,
    /// The final denoised latents before VAE decoding, `[N, 4, H/8, W/8]`.
    pub latents: Tensor<B, 4>,
    /// Time and size figures.
    pub stats: GenerationStats,
}

/// The OmniGen pipeline: tokenizer/processor, transformer and VAE on one device.
#[derive(Debug)]
pub struct OmniGenPipeline<B: Backend> {
    processor: OmniGenProcessor,
    transformer: OmniGenTransformer<B>,
    vae: AutoencoderKL<B>,
    device: B::Device,
    model_dir: PathBuf,
    model_id: String,
    weights_fingerprint: Option<String>,
    memory_limit: Option<u64>,
    loras: Vec<(PathBuf, f32)>,
}

impl<B: KernelBackend> OmniGenPipeline<B> {
    /// The model directory (for a hub id: its snapshot in the local cache).
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The LoRA adapters merged at load time, with their scales.
    pub fn loras(&self) -> &[(PathBuf, f32)] {
        &self.loras
    }

    /// The model as the user named it: a directory or a hub id.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// A SHA-256 fingerprint of the transformer weights file (see
    /// [`weights_fingerprint`](crate::fingerprint::weights_fingerprint)).
    pub fn weights_fingerprint(&self) -> Option<&str> {
        self.weights_fingerprint.as_deref()
    }

    /// The transformer.
    pub fn transformer(&self) -> &OmniGenTransformer<B> {
        &self.transformer
    }

    /// The VAE.
    pub fn vae(&self) -> &AutoencoderKL<B> {
        &self.vae
    }

    /// The processor.
    pub fn processor(&self) -> &OmniGenProcessor {
        &self.processor
    }

    /// The device everything runs on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }
}
