//! The generation loop: prompt → processor → VAE encode → transformer ⇄ scheduler → VAE decode.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use image::RgbImage;
use omnigen_core::{Error, Result};
use omnigen_models::ops::{self, KernelBackend};
use omnigen_models::scheduler::{FlowMatchEulerScheduler, Scheduler};
use omnigen_models::transformer::{KvCache as TransformerKvCache, KvCacheMode};
use omnigen_models::transformer::{LoadOptions, OmniGenTransformer, TransformerInput};
use omnigen_models::vae::{AutoencoderKL, LatentChoice, TilingConfig};
use tracing::{debug, info, info_span, warn};

use crate::collator::ModelInput;
use crate::guidance::Guidance;
use crate::noise::NoiseSource;
use crate::processor::{GuidanceInputs, OmniGenProcessor, ProcessedBatch, ProcessorOptions};
use crate::request::{GenerationRequest, InputLatents, KvCache};

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
    /// Checked before every step; a cancelled token ends the call with [`Error::Cancelled`].
    pub cancel: Option<CancellationToken>,
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

/// Builds an [`OmniGenPipeline`] from a model directory.
#[derive(Debug, Clone)]
pub struct PipelineBuilder<B: Backend> {
    model_dir: PathBuf,
    device: B::Device,
    dtype: DType,
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

    /// Transformer weight dtype (`F32` default; `BF16`/`F16` halve memory). The VAE stays f32,
    /// as in the official pipeline (the SDXL VAE overflows in f16).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Tiled VAE encoding/decoding for large images.
    pub fn vae_tiling(mut self, tiling: Option<TilingConfig>) -> Self {
        self.vae_tiling = tiling;
        self
    }

    /// Loads the model: `config.json` + `model.safetensors` + `tokenizer.json` + `vae/` (the
    /// official layout) or `transformer/` + `tokenizer/` + `vae/` (diffusers'). A model that is
    /// not a local directory but a hub id (`Shitao/OmniGen-v1`) is resolved through the local
    /// Hugging Face cache and downloaded if needed (cargo feature `hub`).
    pub fn build(mut self) -> Result<OmniGenPipeline<B>> {
        let model_id = self.model_dir.display().to_string();
        self.model_dir = crate::hub::resolve_model(&model_id, self.download_progress)?;
        let dir = &self.model_dir;
        let vae_dir = dir.join("vae");
        if !vae_dir.join("config.json").is_file() {
            return Err(Error::ModelNotFound {
                id: dir.display().to_string(),
                reason: format!(
                    "missing VAE: {} needs config.json and diffusion_pytorch_model.safetensors",
                    vae_dir.display()
                ),
            });
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::invalid_argument(
                "dtype",
                format!("{:?} is not f32, f16 or bf16", self.dtype),
            ));
        }
        let start = Instant::now();
        let _span = info_span!("load", dir = %dir.display()).entered();
        let processor = OmniGenProcessor::from_dir(dir)?;
        let transformer =
            OmniGenTransformer::from_dir_with(dir, &self.device, self.dtype, &self.load_options)?;
        let vae = AutoencoderKL::from_dir(&vae_dir, &self.device, DType::F32)?
            .with_tiling(self.vae_tiling)?;
        info!(
            elapsed_ms = start.elapsed().as_millis() as u64,
            "model loaded"
        );
        let weights_fingerprint = [
            "model.safetensors",
            "transformer/diffusion_pytorch_model.safetensors",
        ]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .and_then(|p| crate::fingerprint::weights_fingerprint(&p).ok());
        Ok(OmniGenPipeline {
            processor,
            transformer,
            vae,
            device: self.device,
            model_dir: self.model_dir,
            model_id,
            weights_fingerprint,
            memory_limit: self.memory_limit,
            loras: self.load_options.lora.clone(),
        })
    }
}

/// Per-branch (or joint) forward state across steps.
struct BranchState<B: Backend> {
    cond: TransformerInput<B>,
    rows: usize,
    cache: Option<TransformerKvCache<B>>,
}

impl<B: KernelBackend> OmniGenPipeline<B> {
    /// A builder for the model in `model_dir`.
    pub fn builder(model_dir: impl Into<PathBuf>) -> PipelineBuilder<B> {
        PipelineBuilder {
            model_dir: model_dir.into(),
            device: Default::default(),
            dtype: DType::F32,
            vae_tiling: None,
            download_progress: false,
            memory_limit: None,
            load_options: LoadOptions::default(),
        }
    }

    /// Loads a local model directory or a hub id (e.g. [`DEFAULT_MODEL_ID`]) onto the default
    /// device in f32.
    ///
    /// [`DEFAULT_MODEL_ID`]: crate::hub::DEFAULT_MODEL_ID
    pub fn from_pretrained(id_or_dir: &str) -> Result<Self> {
        Self::builder(id_or_dir).build()
    }

    /// Loads the model in `model_dir` onto `device` in f32.
    pub fn from_dir(model_dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::builder(model_dir.as_ref())
            .device(device.clone())
            .build()
    }

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

    /// Generates with the official flow-matching Euler scheduler.
    pub fn generate(&self, request: &GenerationRequest) -> Result<Generation<B>> {
        self.generate_with(
            request,
            &mut FlowMatchEulerScheduler::new(),
            Hooks::default(),
        )
    }

    /// Generates with any [`Scheduler`], reporting progress and honouring cancellation.
    pub fn generate_with(
        &self,
        request: &GenerationRequest,
        scheduler: &mut dyn Scheduler<B>,
        mut hooks: Hooks<'_>,
    ) -> Result<Generation<B>> {
        request.validate()?;
        let mut stats = GenerationStats::default();

        // prompt -> processor
        let t0 = Instant::now();
        let prompts: Vec<_> = request
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), request.num_images_per_prompt))
            .collect();
        let options = ProcessorOptions {
            height: request.height,
            width: request.width,
            negative_prompt: request.negative_prompt.clone(),
            use_img_guidance: request.use_img_guidance,
            max_input_image_size: u32::try_from(request.max_input_image_size).unwrap_or(u32::MAX),
            use_input_image_size_as_output: request.use_input_image_size_as_output,
            separate_cfg_infer: request.separate_cfg_infer,
        };
        let batch = {
            let _s = info_span!("process").entered();
            self.processor.process(&prompts, &options)?
        };
        stats.process = t0.elapsed();
        stats.tokens_per_branch = batch.model_inputs().iter().map(|m| m.seq_len).collect();
        info!(tokens_per_branch = ?stats.tokens_per_branch, height = batch.height, width = batch.width, "processed");
        self.guard_memory(&batch, request)?;

        let n = batch.num_prompts;
        let f = self.vae.downsample_factor();
        let latent_shape = [
            n,
            self.transformer.config.in_channels,
            batch.height / f,
            batch.width / f,
        ];
        let mut noise = match request.seed {
            Some(seed) => NoiseSource::from_seed(seed),
            None => NoiseSource::from_entropy(),
        };
        // The initial noise is drawn first, as the official pipeline does, so a seed fixes it
        // independently of the input images.
        let mut z: Tensor<B, 4> = match &request.latents {
            Some(l) => self.initial_latents(l, latent_shape)?,
            None => noise.normal(latent_shape, &self.device),
        };

        // VAE encode of input images, branch by branch as the official pipeline does.
        let t1 = Instant::now();
        let mut states = {
            let _s = info_span!("encode").entered();
            self.branch_states(&batch, request, &mut noise)?
        };
        stats.encode = t1.elapsed();

        let guidance = Guidance {
            scale: request.guidance_scale,
            image_scale: request.img_guidance_scale,
        };
        let times = scheduler.timesteps(request.num_inference_steps)?;
        let cache_mode = match request.kv_cache {
            KvCache::Official => Some(KvCacheMode::Official),
            KvCache::Exact => Some(KvCacheMode::Exact),
            KvCache::Off => None,
        };
        let t2 = Instant::now();
        let joint = matches!(batch.inputs, GuidanceInputs::Joint(_));
        let num_branches = batch.branches.len();
        for (i, &t) in times.iter().enumerate() {
            if hooks
                .cancel
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled)
            {
                return Err(Error::Cancelled { step: i });
            }
            let _s = info_span!("step", i, t).entered();
            let mut outs = Vec::with_capacity(num_branches);
            for state in &mut states {
                let reps = state.rows / n;
                let x = if reps == 1 {
                    z.clone()
                } else {
                    Tensor::cat(vec![z.clone(); reps], 0)
                };
                let timestep = Tensor::<B, 1>::full([state.rows], t, &self.device);
                let out = self.forward_branch(state, x, timestep, i, cache_mode)?;
                if joint {
                    outs.extend(out.chunk(num_branches, 0));
                } else {
                    outs.push(out);
                }
            }
            let velocity = guidance.combine(&outs);
            z = scheduler.step(i, z, velocity);
            if let Some(cb) = hooks.on_progress.as_mut() {
                cb(Progress {
                    step: i + 1,
                    total: times.len(),
                    elapsed: t2.elapsed(),
                });
            }
        }
        stats.denoise = t2.elapsed();
        drop(states);

        let t3 = Instant::now();
        let images = {
            let _s = info_span!("decode").entered();
            self.decode_images(z.clone())?
        };
        stats.decode = t3.elapsed();
        stats.peak_memory_bytes = crate::memory::peak_resident_memory();
        info!(
            tokens_per_branch = ?stats.tokens_per_branch,
            process_ms = stats.process.as_millis() as u64,
            encode_ms = stats.encode.as_millis() as u64,
            denoise_ms = stats.denoise.as_millis() as u64,
            decode_ms = stats.decode.as_millis() as u64,
            peak_memory_mib = stats.peak_memory_bytes.map(|b| b >> 20),
            "generation cost"
        );
        debug!(?stats, "generation done");
        Ok(Generation {
            images,
            latents: z,
            stats,
        })
    }

    /// Estimates the request's memory and refuses it when it cannot fit.
    fn guard_memory(&self, batch: &ProcessedBatch, request: &GenerationRequest) -> Result<()> {
        let output_tokens = (batch.height / 16) * (batch.width / 16);
        if request.use_input_image_size_as_output && output_tokens > 4096 {
            warn!(
                width = batch.width,
                height = batch.height,
                output_tokens,
                "use_input_image_size_as_output gives an output larger than 1024x1024: every step \
                 will be slow; lower max_input_image_size to bound it"
            );
        }
        let available = match self.memory_limit {
            Some(limit) => limit,
            None if B::HOST_MEMORY => match crate::memory::available_memory() {
                Some(a) => a,
                None => return Ok(()),
            },
            None => return Ok(()),
        };
        let weight_bytes = match self.transformer.dtype() {
            DType::F32 => 4,
            _ => 2,
        };
        let tile = self.vae.tiling().map(|t| t.tile_sample_size);
        let est = crate::memory::estimate(
            batch,
            &self.transformer.config,
            self.vae.config(),
            tile,
            weight_bytes,
            request.kv_cache != KvCache::Off,
            ops::attention_materialises_scores::<B>(self.transformer.dtype()),
        );
        debug!(?est, available, "memory estimate");
        crate::memory::check(&est, available, batch, request.max_input_image_size)
    }

    fn initial_latents(
        &self,
        given: &crate::request::InitialLatents,
        shape: [usize; 4],
    ) -> Result<Tensor<B, 4>> {
        let [n, c, h, w] = shape;
        let ok = given.shape[1..] == [c, h, w] && (given.shape[0] == n || given.shape[0] == 1);
        if !ok {
            return Err(Error::invalid_argument(
                "latents",
                format!(
                    "shape {:?} does not match the request's {:?}",
                    given.shape, shape
                ),
            ));
        }
        let t = Tensor::<B, 4>::from_data(
            TensorData::new(given.values.clone(), given.shape),
            &self.device,
        );
        Ok(if given.shape[0] == n {
            t
        } else {
            t.repeat_dim(0, n)
        })
    }

    fn branch_states(
        &self,
        batch: &ProcessedBatch,
        request: &GenerationRequest,
        noise: &mut NoiseSource,
    ) -> Result<Vec<BranchState<B>>> {
        let mut injected = request.input_noise.as_ref().map(|v| v.iter());
        batch
            .model_inputs()
            .into_iter()
            .map(|m| {
                let latents = m
                    .images
                    .iter()
                    .map(|img| {
                        let pixels = Tensor::<B, 4>::from_data(
                            TensorData::new(img.pixels.clone(), [1, 3, img.height, img.width]),
                            &self.device,
                        );
                        let f = self.vae.downsample_factor();
                        let shape = [
                            1,
                            self.vae.config().latent_channels,
                            img.height / f,
                            img.width / f,
                        ];
                        let lc = match (request.input_latents, injected.as_mut()) {
                            (InputLatents::Mean, _) => LatentChoice::Mean,
                            (InputLatents::Sample, None) => {
                                LatentChoice::Sample(noise.normal(shape, &self.device))
                            }
                            (InputLatents::Sample, Some(it)) => {
                                let given = it.next().ok_or_else(|| {
                                    Error::invalid_argument(
                                        "input_noise",
                                        "fewer noise tensors than input-image encodes",
                                    )
                                })?;
                                if given.shape != shape {
                                    return Err(Error::invalid_argument(
                                        "input_noise",
                                        format!("shape {:?}, expected {shape:?}", given.shape),
                                    ));
                                }
                                LatentChoice::Sample(Tensor::from_data(
                                    TensorData::new(given.values.clone(), shape),
                                    &self.device,
                                ))
                            }
                        };
                        self.vae.encode_latents(pixels, lc)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(BranchState {
                    cond: self.model_input(m, latents),
                    rows: m.batch_size,
                    cache: None,
                })
            })
            .collect()
    }

    fn model_input(
        &self,
        m: &ModelInput,
        input_img_latents: Vec<Tensor<B, 4>>,
    ) -> TransformerInput<B> {
        let d = &self.device;
        // The VAE runs in f32; the transformer takes its inputs in its own dtype.
        let dtype = self.transformer.dtype();
        let input_img_latents = input_img_latents
            .into_iter()
            .map(|t| t.cast(dtype))
            .collect();
        TransformerInput {
            // x and timestep are replaced at every step
            x: Tensor::zeros([1, 1, 1, 1], d),
            timestep: Tensor::zeros([1], d),
            input_ids: Some(Tensor::<B, 2, Int>::from_data(
                TensorData::new(m.input_ids.clone(), m.input_ids_shape()),
                d,
            )),
            input_img_latents,
            image_spans: m.image_spans.clone(),
            attention_mask: Tensor::<B, 3>::from_data(
                TensorData::new(m.attention_mask.clone(), m.attention_mask_shape()),
                d,
            )
            .cast(dtype),
            position_ids: Tensor::from_data(
                TensorData::new(m.position_ids.clone(), m.position_ids_shape()),
                d,
            ),
        }
    }

    fn forward_branch(
        &self,
        state: &mut BranchState<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        step: usize,
        cache_mode: Option<KvCacheMode>,
    ) -> Result<Tensor<B, 4>> {
        let dtype = self.transformer.dtype();
        let (x, timestep) = (x.cast(dtype), timestep.cast(dtype));
        let out = match (cache_mode, &state.cache) {
            (Some(_), Some(cache)) => self.transformer.forward_cached(cache, x, timestep)?,
            (Some(mode), None) if step == 0 => {
                let input = TransformerInput {
                    x,
                    timestep,
                    ..state.cond.clone()
                };
                let (out, cache) = self.transformer.prefill(input, mode)?;
                state.cache = Some(cache);
                out
            }
            _ => self.transformer.forward(TransformerInput {
                x,
                timestep,
                ..state.cond.clone()
            })?,
        };
        Ok(out.cast(DType::F32))
    }

    /// Decodes latents `[N, 4, h, w]` to 8-bit images exactly as the official pipeline does:
    /// `((x / 2 + 0.5).clamp(0, 1) * 255)` truncated to `u8`.
    pub fn decode_images(&self, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
        let n = latents.dims()[0];
        (0..n)
            .map(|i| {
                let img = self.vae.decode_latents(latents.clone().narrow(0, i, 1))?; // [1, 3, H, W]
                tensor_to_rgb8(img)
            })
            .collect()
    }
}

/// `[1, 3, H, W]` in about [-1, 1] to an 8-bit image, truncating as `torch.to(uint8)` does.
pub fn tensor_to_rgb8<B: Backend>(img: Tensor<B, 4>) -> Result<RgbImage> {
    let [_, c, h, w] = img.dims();
    if c != 3 {
        return Err(Error::invalid_argument(
            "image",
            format!("expected 3 channels, got {c}"),
        ));
    }
    let scaled = ((img * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).permute([0, 2, 3, 1]); // [1, H, W, 3]
    let values: Vec<f32> = scaled
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| Error::invalid_argument("image", format!("{e:?}")))?;
    let bytes: Vec<u8> = values.into_iter().map(|v| v as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::invalid_argument("image", "pixel buffer does not match its size"))
}
