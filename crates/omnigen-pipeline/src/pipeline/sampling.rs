//! The sampling loop, with its stages numbered after diffusers' `OmniGenPipeline.__call__` in
//! the order the official OmniGen pipeline runs them.
//!
//! diffusers encodes the input images (its stage 4) before it draws the initial noise (its
//! stage 6); the official OmniGen code draws the noise first, and so does this loop, so that a
//! seed fixes the initial latents independently of the input images. diffusers' stage 7 does not
//! exist; its unnumbered final decode is stage 8 here.

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use omnigen_core::{Error, Result};
use omnigen_models::ops::KernelBackend;
use omnigen_models::scheduler::Scheduler;
use omnigen_models::transformer::{KvCacheMode, KvPlacement};
use tracing::{debug, info, info_span, warn};

use super::{Generation, GenerationStats, Hooks, OmniGenPipeline, Progress};
use crate::guidance::Guidance;
use crate::noise::NoiseSource;
use crate::processor::{ProcessedBatch, ProcessorOptions};
use crate::request::{GenerationRequest, InitialLatents, InputLatents, KvCache};

/// The seed of the input images' posterior noise when the caller gives initial latents but no
/// seed.
pub const DEFAULT_SEED: u64 = 0;

impl<B: KernelBackend> OmniGenPipeline<B> {
    /// Generates with the request's scheduler (the official flow-matching Euler by default).
    pub fn generate(&self, request: &GenerationRequest) -> Result<Generation<B>> {
        self.generate_with_hooks(request, Hooks::default())
    }

    /// Generates with the request's scheduler, reporting progress, honouring cancellation and
    /// calling the step callback.
    pub fn generate_with_hooks(
        &self,
        request: &GenerationRequest,
        hooks: Hooks<'_, B>,
    ) -> Result<Generation<B>> {
        request.validate()?;
        let mut scheduler = request
            .scheduler
            .build::<B>(request.time_shift, request.sigmas.as_deref())?;
        self.generate_with(request, scheduler.as_mut(), hooks)
    }

    /// Generates with any [`Scheduler`] (the request's `scheduler`, `time_shift` and `sigmas`
    /// are not used), reporting progress, honouring cancellation and calling the step callback.
    pub fn generate_with(
        &self,
        request: &GenerationRequest,
        scheduler: &mut dyn Scheduler<B>,
        mut hooks: Hooks<'_, B>,
    ) -> Result<Generation<B>> {
        // 1. Check inputs
        request.validate()?;
        let mut stats = GenerationStats::default();

        // 2. Define call parameters
        let prompts: Vec<_> = request
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), request.num_images_per_prompt))
            .collect();
        let options = processor_options(request);
        let guidance = Guidance {
            scale: request.guidance_scale,
            image_scale: request.img_guidance_scale,
        };
        let cache_mode = match request.kv_cache {
            KvCache::Official => Some(KvCacheMode::Official),
            KvCache::Exact => Some(KvCacheMode::Exact),
            KvCache::Off => None,
        };
        let kv_placement = crate::memory::kv_placement::<B>(request).unwrap_or(KvPlacement::Device);

        // 3. Process multi-modal instructions
        let started = Instant::now();
        let batch = {
            let _s = info_span!("process").entered();
            self.processor.process(&prompts, &options)?
        };
        stats.process = started.elapsed();
        stats.tokens_per_branch = batch.model_inputs().iter().map(|m| m.seq_len).collect();
        info!(tokens_per_branch = ?stats.tokens_per_branch, height = batch.height, width = batch.width, "processed");
        stats.memory_estimate = self.guard_memory(&batch, request)?;

        // 4. Prepare latents
        stats.seed = self.seed(request, &batch);
        let mut noise = NoiseSource::from_seed(stats.seed);
        let mut z = self.prepare_latents(&batch, request.latents.as_ref(), &mut noise)?;

        // 5. Encode input images
        let started = Instant::now();
        let mut branches = {
            let _s = info_span!("encode").entered();
            self.branches(&batch, request, &mut noise, cache_mode, kv_placement)?
        };
        stats.encode = started.elapsed();

        // 6. Prepare timesteps
        let times = scheduler.timesteps(request.num_inference_steps)?;

        // 7. Denoising loop
        let started = Instant::now();
        for (i, &t) in times.iter().enumerate() {
            if hooks.cancelled() {
                return Err(Error::Cancelled { step: i });
            }
            let guided = request.cfg_range.guides(i, times.len());
            let _s = info_span!("step", i, t, guided).entered();
            let outs = branches.velocities(&self.transformer, &z, t, i, guided)?;
            z = scheduler.step(i, z, guidance.combine(&outs));
            super::check_finite(&z, "denoising", Some(i))?;
            hooks.step_end(i, t, &mut z);
            hooks.report(Progress {
                step: i + 1,
                total: times.len(),
                elapsed: started.elapsed(),
            });
        }
        stats.denoise = started.elapsed();
        drop(branches);

        // 8. Decode latents
        let started = Instant::now();
        let images = {
            let _s = info_span!("decode").entered();
            self.decode_images(z.clone())?
        };
        stats.decode = started.elapsed();
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

    /// The seed of the generation's random draws: the request's; with caller-given initial latents
    /// and input images to sample, [`DEFAULT_SEED`] (so the run is still reproducible); otherwise
    /// one drawn from the operating system, reported in the stats.
    fn seed(&self, request: &GenerationRequest, batch: &ProcessedBatch) -> u64 {
        if let Some(seed) = request.seed {
            return seed;
        }
        let samples_images = request.input_latents == InputLatents::Sample
            && request.input_noise.is_none()
            && batch.model_inputs().iter().any(|m| !m.images.is_empty());
        if request.latents.is_some() {
            if samples_images {
                warn!(
                    seed = DEFAULT_SEED,
                    "initial latents given without a seed: the input images' posterior noise \
                     uses the default seed"
                );
            }
            return DEFAULT_SEED;
        }
        rand::random()
    }

    /// Estimates the request's memory beyond the loaded model and refuses it when it cannot
    /// fit; the estimate (for backends whose memory is host memory, or with a set limit).
    fn guard_memory(
        &self,
        batch: &ProcessedBatch,
        request: &GenerationRequest,
    ) -> Result<Option<u64>> {
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
        if self.memory_limit.is_none() && !B::HOST_MEMORY {
            return Ok(None);
        }
        let tile = self.vae.tiling().map(|t| t.tile_sample_size);
        let est = crate::memory::estimate_on::<B>(
            batch,
            &self.transformer.config,
            self.vae.config(),
            tile,
            self.transformer.dtype(),
            crate::memory::kv_placement::<B>(request),
        );
        let available = self.memory_limit.or_else(crate::memory::available_memory);
        debug!(?est, ?available, "memory estimate");
        if let Some(available) = available {
            crate::memory::check(&est, available, batch, request.max_input_image_size)?;
        }
        Ok(Some(est.peak()))
    }

    /// The initial latents `[n, C, H/8, W/8]`: the caller's (one row repeated, or one per
    /// image), or Gaussian noise drawn first from the generation's source.
    fn prepare_latents(
        &self,
        batch: &ProcessedBatch,
        given: Option<&InitialLatents>,
        noise: &mut NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        let f = self.vae.downsample_factor();
        let shape = [
            batch.num_prompts,
            self.transformer.config.in_channels,
            batch.height / f,
            batch.width / f,
        ];
        let Some(given) = given else {
            return Ok(noise.normal(shape, &self.device));
        };
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
}

/// The processor's options for a request.
pub(crate) fn processor_options(request: &GenerationRequest) -> ProcessorOptions {
    ProcessorOptions {
        height: request.height,
        width: request.width,
        negative_prompt: request.negative_prompt.clone(),
        use_img_guidance: request.use_img_guidance,
        max_input_image_size: u32::try_from(request.max_input_image_size).unwrap_or(u32::MAX),
        use_input_image_size_as_output: request.use_input_image_size_as_output,
        separate_cfg_infer: request.separate_cfg_infer,
    }
}
