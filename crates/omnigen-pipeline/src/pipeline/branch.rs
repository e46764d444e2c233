//! Per-branch state of the denoising loop: each guidance branch's condition (built once, with its
//! input images encoded) and, with a KV cache, the cache filled by the branch's first call.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use omnigen_core::{Error, Result};
use omnigen_models::ops::KernelBackend;
use omnigen_models::transformer::{
    KvCache as TransformerKvCache, KvCacheMode, KvPlacement, OmniGenTransformer,
    TransformerCondition,
};
use omnigen_models::vae::LatentChoice;

use super::OmniGenPipeline;
use crate::collator::ModelInput;
use crate::noise::NoiseSource;
use crate::processor::{GuidanceInputs, ProcessedBatch};
use crate::request::{GenerationRequest, InitialLatents, InputLatents};

/// One transformer call per step: a guidance branch, or the joint batch of all of them.
///
/// The condition's dense attention mask is the largest tensor of a long request, so it is built
/// only when the branch first runs: with a KV cache it lives for that call only, and the
/// branches' masks are never all alive at once.
pub(super) struct BranchState<B: Backend> {
    /// The collated input (without pixels), kept by its structure until the condition is built.
    input: ModelInput,
    /// The input images' latents (shared handles, no copy).
    latents: Vec<Tensor<B, 4>>,
    /// What the branch conditions on, the same at every step (kept only without a KV cache).
    cond: Option<TransformerCondition<B>>,
    /// Rows of the call: the number of prompts, times the branches for the joint batch.
    rows: usize,
    /// Filled by the branch's first call when a KV cache is used.
    cache: Option<TransformerKvCache<B>>,
}

/// Every branch of one generation, and how their outputs are laid out.
pub(super) struct Branches<B: Backend> {
    states: Vec<BranchState<B>>,
    /// One joint call whose output stacks the branches along the batch.
    joint: bool,
    num_branches: usize,
    cache_mode: Option<KvCacheMode>,
    /// Where a branch's KV cache is kept.
    kv_placement: KvPlacement,
    /// Joint form, steps outside the CFG range: the conditional rows of the joint batch (still
    /// padded to its length, so they compute what those rows compute inside it), built when
    /// first needed.
    cond_rows: Option<BranchState<B>>,
}

impl<B: KernelBackend> Branches<B> {
    /// The velocity of every branch at flow time `t` of step `step`, in branch order (the
    /// joint batch split back into its branches), in f32; unguided steps run the conditional
    /// branch alone and return only its velocity.
    ///
    /// # Shapes
    /// `z`: `[n, C, h, w]` for `n` prompts; returns one `[n, C, h, w]` tensor per branch.
    pub(super) fn velocities(
        &mut self,
        transformer: &OmniGenTransformer<B>,
        z: &Tensor<B, 4>,
        t: f32,
        step: usize,
        guided: bool,
    ) -> Result<Vec<Tensor<B, 4>>> {
        let n = z.dims()[0];
        if !guided && self.num_branches > 1 {
            let timestep = Tensor::<B, 1>::full([n], t, &z.device());
            let state = if self.joint {
                let joint = &self.states[0];
                self.cond_rows.get_or_insert_with(|| joint.cond_rows(n))
            } else {
                &mut self.states[0]
            };
            return Ok(vec![state.forward(
                transformer,
                z.clone(),
                timestep,
                step,
                self.cache_mode,
                self.kv_placement,
            )?]);
        }
        let mut outs = Vec::with_capacity(self.num_branches);
        for state in &mut self.states {
            let reps = state.rows / n;
            let x = if reps == 1 {
                z.clone()
            } else {
                Tensor::cat(vec![z.clone(); reps], 0)
            };
            let timestep = Tensor::<B, 1>::full([state.rows], t, &z.device());
            let out = state.forward(
                transformer,
                x,
                timestep,
                step,
                self.cache_mode,
                self.kv_placement,
            )?;
            if self.joint {
                outs.extend(out.chunk(self.num_branches, 0));
            } else {
                outs.push(out);
            }
        }
        Ok(outs)
    }
}

impl<B: KernelBackend> BranchState<B> {
    /// One transformer call: the KV-cache prefill at step 0, cached steps after it, or the
    /// uncached forward. Inputs are cast to the transformer's dtype, the output back to f32.
    fn forward(
        &mut self,
        transformer: &OmniGenTransformer<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        step: usize,
        cache_mode: Option<KvCacheMode>,
        kv_placement: KvPlacement,
    ) -> Result<Tensor<B, 4>> {
        let dtype = transformer.dtype();
        let (x, timestep) = (x.cast(dtype), timestep.cast(dtype));
        let out = match (cache_mode, &self.cache) {
            (Some(_), Some(cache)) => transformer.forward_cached(cache, x, timestep)?,
            (Some(mode), None) => {
                // The official cache's step-0 attention is a property of step 0: a branch first
                // run later (outside a CFG range before it) computes what the official cache
                // computes at that step, the full forward.
                let mode = if step == 0 { mode } else { KvCacheMode::Exact };
                let cond = self.condition(dtype, &x.device())?;
                let (out, cache) =
                    transformer.prefill_with(&cond, x, timestep, mode, kv_placement)?;
                self.cache = Some(cache);
                out
            }
            (None, _) => {
                if self.cond.is_none() {
                    self.cond = Some(self.condition(dtype, &x.device())?);
                }
                match &self.cond {
                    Some(cond) => transformer.forward(cond, x, timestep)?,
                    None => unreachable!("the condition was built above"),
                }
            }
        };
        Ok(out.cast(DType::F32))
    }

    /// The branch's condition on `device` in `dtype`: the one kept, or a new one.
    fn condition(&mut self, dtype: DType, device: &B::Device) -> Result<TransformerCondition<B>> {
        if let Some(cond) = self.cond.take() {
            return Ok(cond);
        }
        let m = &self.input;
        Ok(TransformerCondition {
            input_ids: Some(Tensor::<B, 2, Int>::from_data(
                TensorData::new(m.input_ids.clone(), m.input_ids_shape()),
                device,
            )),
            input_img_latents: self.latents.iter().map(|t| t.clone().cast(dtype)).collect(),
            image_spans: m.image_spans.clone(),
            attention_mask: m.key_ranges()?,
            position_ids: Tensor::from_data(
                TensorData::new(m.position_ids.clone(), m.position_ids_shape()),
                device,
            ),
        })
    }

    /// The first `n` rows of this (joint) call, the conditional branch, as a call of its own
    /// with an empty cache (still padded to the joint length, so its rows compute what they
    /// compute inside the joint batch).
    fn cond_rows(&self, n: usize) -> BranchState<B> {
        let input = self.input.rows_without_pixels(n);
        let images: usize = input.image_spans.iter().map(Vec::len).sum();
        BranchState {
            rows: input.batch_size,
            input,
            latents: self.latents[..images.min(self.latents.len())].to_vec(),
            cond: None,
            cache: None,
        }
    }
}

impl<B: KernelBackend> OmniGenPipeline<B> {
    /// Builds every branch's condition, encoding its input images with the VAE branch by
    /// branch as the official pipeline does (so a seeded posterior sample draws the same noise).
    pub(super) fn branches(
        &self,
        batch: &ProcessedBatch,
        request: &GenerationRequest,
        noise: &mut NoiseSource,
        cache_mode: Option<KvCacheMode>,
        kv_placement: KvPlacement,
    ) -> Result<Branches<B>> {
        let mut injected = request.input_noise.as_ref().map(|v| v.iter());
        let states = batch
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
                        let choice =
                            self.latent_choice(request, injected.as_mut(), noise, shape)?;
                        let latents = self.vae.encode_latents(pixels, choice)?;
                        super::check_finite(&latents, "input-image encoding", None)?;
                        Ok(latents)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(BranchState {
                    // the images are encoded already: keep everything but their pixels
                    input: m.rows_without_pixels(m.batch_size),
                    latents,
                    cond: None,
                    rows: m.batch_size,
                    cache: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Branches {
            states,
            joint: matches!(batch.inputs, GuidanceInputs::Joint(_)),
            num_branches: batch.branches.len(),
            cache_mode,
            kv_placement,
            cond_rows: None,
        })
    }

    /// How the next input image's latents are taken: the posterior mean, or a sample with
    /// noise injected by the caller or drawn from the generation's source.
    fn latent_choice<'a>(
        &self,
        request: &GenerationRequest,
        injected: Option<&mut impl Iterator<Item = &'a InitialLatents>>,
        noise: &mut NoiseSource,
        shape: [usize; 4],
    ) -> Result<LatentChoice<B>> {
        Ok(match (request.input_latents, injected) {
            (InputLatents::Mean, _) => LatentChoice::Mean,
            (InputLatents::Sample, None) => LatentChoice::Sample(noise.normal(shape, &self.device)),
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
        })
    }
}
