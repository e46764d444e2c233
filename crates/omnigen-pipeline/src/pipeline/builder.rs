//! Loading a pipeline: where the model is, what dtype and device, which adapters.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use omnigen_core::{Error, ModelFolder, Result};
use omnigen_models::ops::KernelBackend;
use omnigen_models::transformer::{LoadOptions, OmniGenTransformer};
use omnigen_models::vae::{AutoencoderKL, TilingConfig};
use tracing::{info, info_span};

use super::OmniGenPipeline;
use crate::processor::OmniGenProcessor;

/// Builds an [`OmniGenPipeline`] from a model directory.
#[derive(Debug, Clone)]
pub struct PipelineBuilder<B: Backend> {
    model_dir: PathBuf,
    device: B::Device,
    /// `None`: [`default_dtype`](omnigen_models::ops::default_dtype) for the device.
    dtype: Option<DType>,
    vae_dtype: DType,
    vae_tiling: Option<TilingConfig>,
    download_progress: bool,
    memory_limit: Option<u64>,
    load_options: LoadOptions,
}

impl<B: KernelBackend> PipelineBuilder<B> {
    /// Merges a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into the
    /// transformer at load time, as the official `merge_lora` does; `scale` multiplies the
    /// adapter's `alpha / r`. Call again to stack adapters.
    pub fn lora(mut self, adapter_dir: impl Into<PathBuf>, scale: f32) -> Self {
        self.load_options.lora.push((adapter_dir.into(), scale));
        self
    }

    /// Round transformer weights to bf16 before use, as the official pipeline does (default
    /// true; exact no-op for bf16 checkpoints). `false` uses the stored values as they are.
    pub fn round_weights_to_bf16(mut self, on: bool) -> Self {
        self.load_options.round_weights_to_bf16 = on;
        self
    }

    /// Keep the transformer's decoder layers in host memory and stream each to the device
    /// ahead of its use (`--offload model`): for GPUs with less memory than the model. The
    /// images are the same as without it. A no-op on the CPU backends, whose tensors are in
    /// host memory already. Default off.
    pub fn offload_model(mut self, on: bool) -> Self {
        self.load_options.offload_layers = on;
        self
    }

    /// Bytes generations may use beyond the weights; default: the system's available memory
    /// (CPU backends). Requests estimated to need more are refused before any work starts.
    pub fn memory_limit(mut self, bytes: Option<u64>) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// Show progress bars while downloading from the hub (default off).
    pub fn download_progress(mut self, on: bool) -> Self {
        self.download_progress = on;
        self
    }

    /// Device to load onto (default: the backend's default device).
    pub fn device(mut self, device: B::Device) -> Self {
        self.device = device;
        self
    }

    /// Transformer weight dtype: `F32`, `BF16` or `F16` (half the memory). Default: bf16 on a
    /// GPU backend that has it, f32 on the CPU backends
    /// ([`default_dtype`](omnigen_models::ops::default_dtype)); on the CPU backends half-precision
    /// weights are computed in f32.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// The VAE's dtype: `F32` (default, as the official pipeline) or `BF16` (half the VAE's
    /// activation memory; its error is in docs/parity.md). `F16` is refused: the SDXL VAE
    /// overflows in f16.
    pub fn vae_dtype(mut self, dtype: DType) -> Self {
        self.vae_dtype = dtype;
        self
    }

    /// Tiled VAE encoding/decoding for large images.
    pub fn vae_tiling(mut self, tiling: Option<TilingConfig>) -> Self {
        self.vae_tiling = tiling;
        self
    }

    /// Loads the model: `config.json` + `model.safetensors` + `tokenizer.json` + `vae/` (the
    /// official layout) or `transformer/` + `tokenizer/` + `vae/` (diffusers'), as
    /// [`ModelFolder`] finds them. A model that is not a local directory but a hub id
    /// (`Shitao/OmniGen-v1`) is resolved through the local Hugging Face cache and downloaded if
    /// needed (cargo feature `hub`).
    pub fn build(self) -> Result<OmniGenPipeline<B>> {
        let model_id = self.model_dir.display().to_string();
        let model_dir = crate::hub::resolve_model(&model_id, self.download_progress)?;
        let folder = ModelFolder::open(&model_dir)?;
        // Checked before anything is read so that an incomplete download fails at once.
        let vae_dir = folder.vae_dir()?;
        let dtype = self
            .dtype
            .unwrap_or_else(|| omnigen_models::ops::default_dtype::<B>(&self.device));
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::invalid_argument(
                "dtype",
                format!("{dtype:?} is not f32, f16 or bf16"),
            ));
        }
        if !matches!(self.vae_dtype, DType::F32 | DType::BF16) {
            return Err(Error::invalid_argument(
                "vae_dtype",
                format!(
                    "{:?} is not f32 or bf16 (the SDXL VAE overflows in f16)",
                    self.vae_dtype
                ),
            ));
        }
        // The transformer's dtype is checked where it loads (in the dtype it computes in); the
        // VAE's here, so that the refusal names this builder's option.
        omnigen_models::ops::check_dtype::<B>(&self.device, "vae_dtype", self.vae_dtype)?;
        let start = Instant::now();
        let _span = info_span!("load", dir = %model_dir.display()).entered();
        let processor = OmniGenProcessor::from_tokenizer_file(folder.tokenizer()?)?;
        let mut load_options = self.load_options.clone();
        load_options.offload_layers &= !B::HOST_MEMORY;
        let transformer =
            OmniGenTransformer::from_folder(&folder, &self.device, dtype, &load_options)?;
        let vae = AutoencoderKL::from_dir(&vae_dir, &self.device, self.vae_dtype)?
            .with_tiling(self.vae_tiling)?;
        info!(
            elapsed_ms = start.elapsed().as_millis() as u64,
            "model loaded"
        );
        // Sharded weights get no fingerprint: the metadata names one file's content.
        let weights_fingerprint = folder
            .transformer_weights()
            .ok()
            .and_then(|w| w.single().map(Path::to_path_buf))
            .and_then(|p| crate::fingerprint::weights_fingerprint(&p).ok());
        Ok(OmniGenPipeline {
            processor,
            transformer,
            vae,
            device: self.device,
            model_dir,
            model_id,
            weights_fingerprint,
            memory_limit: self.memory_limit,
            loras: self.load_options.lora,
        })
    }
}

impl<B: KernelBackend> OmniGenPipeline<B> {
    /// A builder for the model in `model_dir`.
    pub fn builder(model_dir: impl Into<PathBuf>) -> PipelineBuilder<B> {
        PipelineBuilder {
            model_dir: model_dir.into(),
            device: Default::default(),
            dtype: None,
            vae_dtype: DType::F32,
            vae_tiling: None,
            download_progress: false,
            memory_limit: None,
            load_options: LoadOptions::default(),
        }
    }

    /// Loads a local model directory or a hub id (e.g. [`DEFAULT_MODEL_ID`]) onto the default
    /// device in the default dtype (f32 on the CPU backends, bf16 on a GPU that has it).
    ///
    /// [`DEFAULT_MODEL_ID`]: crate::hub::DEFAULT_MODEL_ID
    pub fn from_pretrained(id_or_dir: &str) -> Result<Self> {
        Self::builder(id_or_dir).build()
    }

    /// Loads the model in `model_dir` onto `device` in the default dtype (f32 on the CPU
    /// backends, bf16 on a GPU that has it).
    pub fn from_dir(model_dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::builder(model_dir.as_ref())
            .device(device.clone())
            .build()
    }
}
