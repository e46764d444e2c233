//! The OmniGen transformer: one Phi-3 backbone over a single sequence
//! `[condition tokens | time token | noisy-latent patch tokens]`.
//!
//! Condition tokens are the text embeddings with each input image's patch embeddings written
//! into its placeholder span. The official module tree is mirrored field by field
//! (`llm.layers.N.self_attn.qkv_proj`, `x_embedder.proj`, `time_token.mlp.0`,
//! `final_layer.adaLN_modulation.1`, ...), and weights are read by those official names from
//! either checkpoint layout (see [`omnigen_core::layout`]).

pub mod embedders;
pub mod final_layer;
pub mod kv_cache;
pub mod offload;
pub mod phi3;
pub mod rope;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor};
use omnigen_core::{
    Error, ModelFolder, Result, TransformerConfig, TransformerWeights, WeightSource,
};

/// The mask type of [`TransformerCondition::attention_mask`].
pub use crate::ops::KeyRanges;
pub use embedders::{PatchEmbed, PosEmbed, TimestepEmbedder};
pub use final_layer::FinalLayer;
pub use kv_cache::{KvCache, KvCacheMode};
pub use offload::{HostLayers, KvPlacement};
pub use phi3::{Attention, AttentionContext, DecoderLayer, Mlp, Phi3Model, RmsNorm};
pub use rope::{LongRope, RopeTables};

use crate::loader::Loader;
use crate::lora::{LoraAdapter, LoraMergePrecision, LoraMergedReader, ModuleTable};
use crate::ops::{self, AttentionBias, KernelBackend, WeightFormat};
use crate::weights::{Bf16RoundedReader, WeightReader};
use offload::{CachedLayers, Fetched, HostKeyValue};
use phi3::KeyValue;

/// Every `Linear` of the transformer, by official module path (`{i}` = a layer index): the
/// modules a LoRA adapter can be merged into (and, with [`NON_LINEAR_MODULES`], every leaf
/// module with parameters).
pub const LINEAR_MODULES: &[&str] = &[
    "llm.layers.{i}.self_attn.qkv_proj",
    "llm.layers.{i}.self_attn.o_proj",
    "llm.layers.{i}.mlp.gate_up_proj",
    "llm.layers.{i}.mlp.down_proj",
    "time_token.mlp.0",
    "time_token.mlp.2",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "final_layer.adaLN_modulation.1",
    "final_layer.linear",
];

/// The transformer's leaf modules with parameters that are not `Linear` (convolutions, the
/// embedding table, norms): a LoRA target that names one of them is refused.
pub const NON_LINEAR_MODULES: &[&str] = &[
    "x_embedder.proj",
    "input_x_embedder.proj",
    "llm.embed_tokens",
    "llm.layers.{i}.input_layernorm",
    "llm.layers.{i}.post_attention_layernorm",
    "llm.norm",
];

/// The transformer's leaf modules, for LoRA adapters.
pub const MODULES: ModuleTable = ModuleTable {
    model: "OmniGen transformer",
    linear: LINEAR_MODULES,
    other: NON_LINEAR_MODULES,
};

/// What a condition (one guidance branch, or the joint batch) gives the transformer: the same at
/// every denoising step, as the official processor/collator produce it. The per-step noisy
/// latents `x` and timestep are passed to [`OmniGenTransformer::forward`] beside it.
///
/// # Shapes
/// With `B` rows, `L` text tokens (left-padded, image placeholders included) and `N` noisy-latent
/// patch tokens, the sequence is `S = L + 1 + N` long (`S = 1 + N` without `input_ids`).
#[derive(Debug, Clone)]
pub struct TransformerCondition<B: Backend> {
    /// Left-padded token ids `[B, L]`, image placeholders included; `None` for a sequence of only
    /// `[time token | image tokens]`.
    pub input_ids: Option<Tensor<B, 2, Int>>,
    /// Input-image latents, each `[1, C, h, w]` (already VAE-scaled), in the order the official
    /// code consumes them: row 0's spans in order, then row 1's, ...
    pub input_img_latents: Vec<Tensor<B, 4>>,
    /// Per batch row, the `[start, end)` token ranges (into that row's padded text) replaced by
    /// the input images, same order as `input_img_latents`. Empty, or one entry per row.
    pub image_spans: Vec<Vec<(usize, usize)>>,
    /// The collator's mask `[B, S, S]`, one range of visible keys per token (see
    /// [`KeyRanges::from_dense`] for the official dense 0/1 form).
    pub attention_mask: KeyRanges,
    /// Position ids `[B, S]` (0 on left padding).
    pub position_ids: Tensor<B, 2, Int>,
}

/// How a checkpoint is turned into model weights: the official bf16 rounding and LoRA adapters.
///
/// The default reproduces the official pipeline: every weight (and the `pos_embed` buffer) is
/// rounded to bf16, because `OmniGenPipeline.__init__` casts the model to bf16 and `__call__`
/// casts it back to the compute dtype; adapters are merged in bf16 as `merge_lora` does. For the
/// official checkpoints and the test fixtures, whose values are bf16-exact, the rounding changes
/// nothing; set `round_weights_to_bf16: false` to use an f32 checkpoint's full precision.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// PEFT LoRA adapter folders with a user scale each (multiplying `alpha / r`; 1.0 = the
    /// official merge), merged in order.
    pub lora: Vec<(PathBuf, f32)>,
    /// Precision of the LoRA merge.
    pub lora_precision: LoraMergePrecision,
    /// Round every weight to bf16 (round to nearest, ties to even) before the LoRA merge and
    /// the conversion to the model dtype. Default `true`.
    pub round_weights_to_bf16: bool,
    /// Keep the decoder layers in host memory and stream each to the device ahead of its use
    /// (`--offload model`, see [`offload`]): for devices with less memory than the model. The
    /// numbers are the same as with the layers on the device. Default `false`.
    pub offload_layers: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            lora: Vec::new(),
            lora_precision: LoraMergePrecision::Official,
            round_weights_to_bf16: true,
            offload_layers: false,
        }
    }
}

impl LoadOptions {
    /// The weights exactly as stored (converted to the model dtype): no rounding, no adapters.
    pub fn as_stored() -> Self {
        Self {
            round_weights_to_bf16: false,
            ..Self::default()
        }
    }

    /// Adds an adapter folder with a scale.
    pub fn with_lora(mut self, dir: impl Into<PathBuf>, scale: f32) -> Self {
        self.lora.push((dir.into(), scale));
        self
    }
}

/// The OmniGen diffusion transformer (`OmniGen/model.py::OmniGen`), backend-generic.
#[derive(Module, Debug)]
pub struct OmniGenTransformer<B: Backend> {
    /// The Phi-3 backbone (`llm`).
    pub llm: Phi3Model<B>,
    /// Patch embedder of the noisy latent (`x_embedder`).
    pub x_embedder: PatchEmbed<B>,
    /// Patch embedder of the input-image latents (`input_x_embedder`).
    pub input_x_embedder: PatchEmbed<B>,
    /// Timestep embedder whose output is the time token (`time_token`).
    pub time_token: TimestepEmbedder<B>,
    /// Timestep embedder conditioning the final adaLN (`t_embedder`).
    pub t_embedder: TimestepEmbedder<B>,
    /// The fixed 2-D sin-cos table (`pos_embed` buffer).
    pub pos_embed: PosEmbed<B>,
    /// adaLN + projection to patches (`final_layer`).
    pub final_layer: FinalLayer<B>,
    /// LongRoPE tables.
    #[module(skip)]
    pub rope: LongRope,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: TransformerConfig,
}

/// Sums the bytes of every parameter a module holds, each in its own dtype.
struct ParamBytes<'a>(&'a mut u64);

impl<B: Backend> burn::module::ModuleVisitor<B> for ParamBytes<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let t = param.val();
        *self.0 += (t.shape().num_elements() * t.dtype().size()) as u64;
    }

    fn visit_int<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D, Int>>) {
        let t = param.val();
        *self.0 += (t.shape().num_elements() * t.dtype().size()) as u64;
    }
}

/// Strict loading: a layer the config does not have is an error (the config does not describe
/// the checkpoint, and the model would silently be a truncated one); any other tensor the model
/// did not read is a warning listing them.
fn check_unused(unread: &[String], config: &TransformerConfig, config_path: &Path) -> Result<()> {
    let layer_of = |key: &str| -> Option<usize> {
        let rest = key
            .strip_prefix("llm.layers.")
            .or_else(|| key.strip_prefix("layers."))?;
        rest.split('.').next()?.parse().ok()
    };
    let extra_layer = unread
        .iter()
        .filter_map(|k| layer_of(k).map(|i| (i, k)))
        .filter(|&(i, _)| i >= config.num_hidden_layers)
        .min();
    if let Some((layer, key)) = extra_layer {
        return Err(Error::Config {
            path: config_path.to_path_buf(),
            reason: format!(
                "num_hidden_layers is {} but the checkpoint also holds layer {layer} \
                 (`{key}`): the config does not describe these weights",
                config.num_hidden_layers
            ),
        });
    }
    if !unread.is_empty() {
        tracing::warn!(
            count = unread.len(),
            tensors = %unread.join(", "),
            "the checkpoint holds tensors the model does not use"
        );
    }
    Ok(())
}

fn shape_error(name: &'static str, expected: String, found: &[usize]) -> Error {
    Error::invalid_argument(name, format!("expected shape {expected}, got {found:?}"))
}

impl<B: KernelBackend> OmniGenTransformer<B> {
    /// Builds the model from a checkpoint in either key layout, with the default
    /// [`LoadOptions`] (official bf16 rounding of the weights, no adapters).
    pub fn load(
        weights: &TransformerWeights,
        config: &TransformerConfig,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_with(weights, config, device, dtype, &LoadOptions::default())
    }

    /// Builds the model from a checkpoint in either key layout with `options`: bf16 rounding
    /// and LoRA adapters (read and validated before any weight is).
    ///
    /// `dtype` is the parameter dtype (`F32`, `BF16` or `F16`); a half-precision model wants its
    /// inputs (`x`, masks) in that dtype and returns its output in it (cast to f32 by the caller).
    pub fn load_with(
        weights: &dyn WeightReader,
        config: &TransformerConfig,
        device: &B::Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        ops::check_dtype::<B>(device, "dtype", ops::compute_dtype::<B>(dtype))?;
        let adapters = options
            .lora
            .iter()
            .map(|(dir, scale)| LoraAdapter::open(dir, *scale, &MODULES))
            .collect::<Result<Vec<_>>>()?;
        let rounded = Bf16RoundedReader { base: weights };
        let base: &dyn WeightReader = if options.round_weights_to_bf16 {
            &rounded
        } else {
            weights
        };
        let offload = options.offload_layers;
        if adapters.is_empty() {
            return Self::build(base, config, device, dtype, offload);
        }
        let merged = LoraMergedReader::new(base, adapters, options.lora_precision);
        let model = Self::build(&merged, config, device, dtype, offload)?;
        merged.finish()?;
        Ok(model)
    }

    /// Builds the model from any reader of official key names (e.g.
    /// [`RandomWeights`](crate::weights::RandomWeights) for benches), taking the tensors exactly
    /// as the reader returns them (no [`LoadOptions`]).
    pub fn load_reader(
        reader: &dyn WeightReader,
        config: &TransformerConfig,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(reader, config, device, dtype, false)
    }

    fn build(
        reader: &dyn WeightReader,
        config: &TransformerConfig,
        device: &B::Device,
        dtype: DType,
        offload_layers: bool,
    ) -> Result<Self> {
        // Half-precision weights with f32 activations where the backend's linear takes them.
        let compute = ops::compute_dtype::<B>(dtype);
        let root = Loader::<B>::new(reader, device, compute)
            .with_weight_dtype(dtype)
            .with_kernel_layout();
        Ok(Self {
            llm: Phi3Model::load_with(&root.sub("llm"), config, offload_layers)?,
            x_embedder: PatchEmbed::load(&root.sub("x_embedder"), config)?,
            input_x_embedder: PatchEmbed::load(&root.sub("input_x_embedder"), config)?,
            time_token: TimestepEmbedder::load(&root.sub("time_token"), config)?,
            t_embedder: TimestepEmbedder::load(&root.sub("t_embedder"), config)?,
            pos_embed: PosEmbed::load(&root, config)?,
            final_layer: FinalLayer::load(&root.sub("final_layer"), config)?,
            rope: LongRope::new(config),
            config: config.clone(),
        })
    }

    /// Loads from a model folder: the official `config.json` + `model.safetensors`, diffusers'
    /// `transformer/` folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a
    /// diffusers repository root containing `transformer/` (see [`ModelFolder`]; shards with
    /// their index too). The key layout is auto-detected.
    /// Uses the default [`LoadOptions`] (official bf16 rounding, no adapters).
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        Self::from_dir_with(dir, device, dtype, &LoadOptions::default())
    }

    /// [`from_dir`](Self::from_dir) with [`LoadOptions`], e.g. LoRA adapters:
    ///
    /// ```no_run
    /// # use omnigen_models::transformer::{LoadOptions, OmniGenTransformer};
    /// # use omnigen_models::{default_device, DefaultBackend};
    /// # use burn::tensor::DType;
    /// let options = LoadOptions::default().with_lora("my_lora", 1.0);
    /// let model = OmniGenTransformer::<DefaultBackend>::from_dir_with(
    ///     "OmniGen-v1", &default_device(), DType::F32, &options)?;
    /// # Ok::<(), omnigen_core::Error>(())
    /// ```
    pub fn from_dir_with(
        dir: impl AsRef<Path>,
        device: &B::Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::from_folder(&ModelFolder::open(dir)?, device, dtype, options)
    }

    /// Loads the transformer of an opened [`ModelFolder`] (its config and weights, wherever the
    /// folder's layout keeps them) with `options`.
    pub fn from_folder(
        folder: &ModelFolder,
        device: &B::Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        let config_path = folder.transformer_config()?;
        let config = TransformerConfig::from_file(&config_path)?;
        let weights =
            TransformerWeights::new(WeightSource::open_files(&folder.transformer_weights()?)?)?;
        let started = std::time::Instant::now();
        let model = Self::load_with(&weights, &config, device, dtype, options)?;
        let secs = started.elapsed().as_secs_f64();
        let bytes = model.weight_bytes();
        tracing::info!(
            bytes,
            secs,
            gb_per_s = bytes as f64 / 1e9 / secs.max(1e-9),
            weights = %model.weight_format().name(),
            "transformer loaded"
        );
        check_unused(&weights.source().unread_keys(), &config, &config_path)?;
        Ok(model)
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.llm.norm.weight.val().dtype()
    }

    /// How the decoder layers' linear weights are stored: the dtype asked for at load time
    /// (bf16 weights on a CPU backend that computes in f32, see [`ops::compute_dtype`]), or the
    /// checkpoint's quantization.
    pub fn weight_format(&self) -> WeightFormat {
        if let Some(host) = &self.llm.offloaded {
            return host.weight_format();
        }
        match self.llm.layers.first() {
            Some(layer) => layer.mlp.down_proj.format(),
            None => self.final_layer.linear.format(),
        }
    }

    /// Bytes the loaded parameters and buffers hold, by their stored dtype and quantization,
    /// offloaded layers included (see [`offloaded_bytes`](Self::offloaded_bytes)).
    pub fn weight_bytes(&self) -> u64 {
        let mut bytes = 0u64;
        let mut visitor = ParamBytes(&mut bytes);
        self.visit(&mut visitor);
        // `pos_embed` is a plain tensor, not a parameter: the visitor does not see it.
        let table = &self.pos_embed.table;
        bytes
            + (table.shape().num_elements() * table.dtype().size()) as u64
            + self.offloaded_bytes()
    }

    /// Bytes of the decoder layers kept in host memory ([`LoadOptions::offload_layers`]); 0
    /// when they are on the device.
    pub fn offloaded_bytes(&self) -> u64 {
        self.llm.offloaded.as_ref().map_or(0, |h| h.bytes())
    }

    /// The uncached forward with the official semantics: the velocity of the noisy latents `x`
    /// at flow time `timestep` under condition `cond`.
    ///
    /// # Shapes
    /// `x`: `[B, C, h, w]` (`h`, `w` multiples of the patch size), `timestep`: `[B]` in [0, 1]
    /// (0 = noise), `cond` as [`TransformerCondition`] with the same `B`; returns `[B, C, h, w]`.
    pub fn forward(
        &self,
        cond: &TransformerCondition<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
    ) -> Result<Tensor<B, 4>> {
        let [b, _, h, w] = x.dims();
        let seq = self.embed_sequence(cond, x, timestep.clone())?; // [B, S, D]
        let s = seq.dims()[1];
        let rope = self.rope.tables(cond.position_ids.clone(), s, self.dtype());
        let bias = ops::attention_bias(&cond.attention_mask, self.dtype(), &seq.device()); // [B, S, S]
        let (hidden, _) = self.run_layers(seq, &rope, &bias, None, None)?;
        Ok(self.head(hidden, timestep, b, h, w))
    }

    /// Step 0 with a KV cache: runs the whole sequence, returns its output and the cache of the
    /// condition tokens for [`forward_cached`](Self::forward_cached).
    ///
    /// In [`KvCacheMode::Official`] the time and image tokens attend only to the condition
    /// tokens in this step (the official pipeline's behaviour); in [`KvCacheMode::Exact`] the
    /// output equals [`forward`](Self::forward). `cond.input_ids` must be present.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward): `x` `[B, C, h, w]`, `timestep` `[B]`; returns
    /// `[B, C, h, w]` and a cache of the first `L` tokens' keys/values per layer.
    pub fn prefill(
        &self,
        cond: &TransformerCondition<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        mode: KvCacheMode,
    ) -> Result<(Tensor<B, 4>, KvCache<B>)> {
        self.prefill_with(cond, x, timestep, mode, KvPlacement::Device)
    }

    /// [`prefill`](Self::prefill) with the cache kept where `placement` says: with
    /// [`KvPlacement::Host`] each layer's keys/values move to host memory as they are made,
    /// and [`forward_cached`](Self::forward_cached) uploads them one layer ahead of use. The
    /// numbers are the same in both placements.
    pub fn prefill_with(
        &self,
        cond: &TransformerCondition<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        mode: KvCacheMode,
        placement: KvPlacement,
    ) -> Result<(Tensor<B, 4>, KvCache<B>)> {
        if cond.input_ids.is_none() {
            return Err(Error::invalid_argument(
                "input_ids",
                "a KV cache needs condition tokens to cache",
            ));
        }
        let [b, _, h, w] = x.dims();
        let seq = self.embed_sequence(cond, x, timestep.clone())?; // [B, S, D]
        let s = seq.dims()[1];
        let p = self.config.patch_size;
        let n_new = (h / p) * (w / p) + 1;
        let cond_len = s - n_new;
        let dtype = self.dtype();
        let rope = self.rope.tables(cond.position_ids.clone(), s, dtype);
        let mask = &cond.attention_mask;
        let device = seq.device();
        let tail_bias = ops::attention_bias(&mask.query_rows(cond_len, n_new), dtype, &device); // [B, 1+N, S]
        let bias = match mode {
            KvCacheMode::Exact => ops::attention_bias(mask, dtype, &device),
            // OmniGenCache crops the first call's keys/values to the condition tokens.
            KvCacheMode::Official => {
                ops::attention_bias(&mask.without_new_keys(cond_len), dtype, &device)
            }
        }; // [B, S, S]
        let (hidden, layers) =
            self.run_layers(seq, &rope, &bias, None, Some((cond_len, placement)))?;
        let out = self.head(hidden, timestep, b, h, w);
        let cache = KvCache {
            layers,
            tail_bias,
            tail_rope: rope.narrow(cond_len, n_new),
            batch: b,
            cond_len,
            latent_hw: (h, w),
            mode,
        };
        Ok((out, cache))
    }

    /// Steps >= 1: only the time token and the image tokens run, against the cached condition
    /// keys/values. Their position ids, mask rows (over all columns) and rotary tables (factor set
    /// chosen by the full length, cached + new) were kept by [`prefill`](Self::prefill).
    pub fn forward_cached(
        &self,
        cache: &KvCache<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
    ) -> Result<Tensor<B, 4>> {
        let dims = x.dims();
        let (h, w) = cache.latent_hw;
        let expected = [cache.batch, self.config.in_channels, h, w];
        if dims != expected {
            return Err(shape_error(
                "x",
                format!("{expected:?} (as prefilled)"),
                &dims,
            ));
        }
        if timestep.dims() != [cache.batch] {
            return Err(shape_error(
                "timestep",
                format!("[{}]", cache.batch),
                &timestep.dims(),
            ));
        }
        if cache.num_layers() != self.llm.num_layers() {
            return Err(Error::invalid_argument(
                "kv_cache",
                format!(
                    "the cache holds {} layers, the model has {}",
                    cache.num_layers(),
                    self.llm.num_layers()
                ),
            ));
        }
        let tokens = self.embed_output(x)?; // [B, N, D]
        let time = self
            .time_token
            .forward(timestep.clone())
            .unsqueeze_dim::<3>(1); // [B, 1, D]
        let seq = Tensor::cat(vec![time, tokens], 1); // [B, 1+N, D]
        let (hidden, _) = self.run_layers(
            seq,
            &cache.tail_rope,
            &cache.tail_bias,
            Some(&cache.layers),
            None,
        )?;
        Ok(self.head(hidden, timestep, cache.batch, h, w))
    }

    /// `x_embedder(x) + pos_embed crop`: `[B, C, h, w]` -> `[B, N, D]`.
    fn embed_output(&self, x: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        let p = self.config.patch_size;
        let [_, _, h, w] = x.dims();
        let pos = self.pos_embed.crop(h / p, w / p)?.unsqueeze::<3>(); // [1, N, D]
        Ok(self.x_embedder.forward(x) + ops::cast(pos, self.dtype()))
    }

    fn check_latent(
        &self,
        name: &'static str,
        dims: [usize; 4],
        batch: Option<usize>,
    ) -> Result<()> {
        let (c, p) = (self.config.in_channels, self.config.patch_size);
        let ok = dims[1] == c
            && dims[2].is_multiple_of(p)
            && dims[3].is_multiple_of(p)
            && dims[2] > 0
            && dims[3] > 0
            && batch.is_none_or(|b| dims[0] == b);
        if ok {
            Ok(())
        } else {
            let b = batch.map_or("B".to_string(), |b| b.to_string());
            Err(shape_error(
                name,
                format!("[{b}, {c}, h, w] with h, w positive multiples of {p}"),
                &dims,
            ))
        }
    }

    /// Validates the inputs and builds `[condition | time token | image tokens]`: `[B, S, D]`.
    fn embed_sequence(
        &self,
        cond: &TransformerCondition<B>,
        x: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
    ) -> Result<Tensor<B, 3>> {
        let x_dims = x.dims();
        self.check_latent("x", x_dims, None)?;
        let [b, _, h, w] = x_dims;
        let p = self.config.patch_size;
        let n = (h / p) * (w / p);
        if timestep.dims() != [b] {
            return Err(shape_error("timestep", format!("[{b}]"), &timestep.dims()));
        }
        let text = match &cond.input_ids {
            Some(ids) => Some(self.embed_condition(ids.clone(), cond, b)?),
            None => {
                if !cond.input_img_latents.is_empty() {
                    return Err(Error::invalid_argument(
                        "input_img_latents",
                        "input images need input_ids",
                    ));
                }
                None
            }
        };
        let l = text.as_ref().map_or(0, |c| c.dims()[1]);
        let s = l + 1 + n;
        if cond.attention_mask.dims() != [b, s, s] {
            return Err(shape_error(
                "attention_mask",
                format!("[{b}, {s}, {s}]"),
                &cond.attention_mask.dims(),
            ));
        }
        if cond.position_ids.dims() != [b, s] {
            return Err(shape_error(
                "position_ids",
                format!("[{b}, {s}]"),
                &cond.position_ids.dims(),
            ));
        }
        let time = self.time_token.forward(timestep).unsqueeze_dim::<3>(1); // [B, 1, D]
        let image = self.embed_output(x)?; // [B, N, D]
        let mut parts = Vec::with_capacity(3);
        parts.extend(text);
        parts.push(time);
        parts.push(image);
        Ok(Tensor::cat(parts, 1))
    }

    /// Token embeddings with the input images' patch embeddings written into their spans:
    /// `[B, L, D]`.
    fn embed_condition(
        &self,
        ids: Tensor<B, 2, Int>,
        cond: &TransformerCondition<B>,
        b: usize,
    ) -> Result<Tensor<B, 3>> {
        let [ids_b, l] = ids.dims();
        if ids_b != b || l == 0 {
            return Err(shape_error(
                "input_ids",
                format!("[{b}, L] with L > 0"),
                &[ids_b, l],
            ));
        }
        let vocab = self.config.vocab_size as i64;
        // One small host read: out-of-range ids would otherwise index out of bounds.
        let (lo, hi): (i64, i64) = (
            ids.clone().min().into_scalar().elem(),
            ids.clone().max().into_scalar().elem(),
        );
        if lo < 0 || hi >= vocab {
            return Err(Error::invalid_argument(
                "input_ids",
                format!("token ids must lie in [0, {vocab}), found range [{lo}, {hi}]"),
            ));
        }
        let mut emb = ops::cast(self.llm.embed_tokens.forward(ids), self.dtype()); // [B, L, D]
        let spans = &cond.image_spans;
        if !spans.is_empty() && spans.len() != b {
            return Err(Error::invalid_argument(
                "image_spans",
                format!("expected one list per batch row ({b}), got {}", spans.len()),
            ));
        }
        let total: usize = spans.iter().map(Vec::len).sum();
        if total != cond.input_img_latents.len() {
            return Err(Error::invalid_argument(
                "input_img_latents",
                format!(
                    "{} latents for {total} image spans",
                    cond.input_img_latents.len()
                ),
            ));
        }
        let d = self.config.hidden_size;
        let p = self.config.patch_size;
        let mut latents = cond.input_img_latents.iter();
        for (row, row_spans) in spans.iter().enumerate() {
            for &(start, end) in row_spans {
                // Counted above: there is one latent per span.
                let Some(latent) = latents.next() else { break };
                let dims = latent.dims();
                self.check_latent("input_img_latents", dims, Some(1))?;
                let n = (dims[2] / p) * (dims[3] / p);
                if start > end || end > l || end - start != n {
                    return Err(Error::invalid_argument(
                        "image_spans",
                        format!(
                            "span [{start}, {end}) of row {row} must lie within the {l} text tokens and hold the \
                             image's {n} patch tokens"
                        ),
                    ));
                }
                let pos = self
                    .pos_embed
                    .crop(dims[2] / p, dims[3] / p)?
                    .unsqueeze::<3>();
                let pos = ops::cast(pos, self.dtype()); // [1, n, D]
                let tokens = self.input_x_embedder.forward(latent.clone()) + pos; // [1, n, D]
                emb = emb.slice_assign([row..row + 1, start..end, 0..d], tokens);
            }
        }
        Ok(emb)
    }

    /// Runs the decoder layers; returns the last hidden state `[B, S, D]` (before the final
    /// norm) and, when `keep` is `(len, placement)`, each layer's first `len` keys/values kept
    /// there (else no layers). Offloaded layers and host-kept `past` keys/values are streamed to
    /// the device one layer ahead.
    fn run_layers(
        &self,
        hidden: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: &AttentionBias<B>,
        past: Option<&CachedLayers<B>>,
        keep: Option<(usize, KvPlacement)>,
    ) -> Result<(Tensor<B, 3>, CachedLayers<B>)> {
        let device_past = match past {
            Some(CachedLayers::Device(layers)) => Some(layers.as_slice()),
            _ => None,
        };
        let host_past = match past {
            Some(CachedLayers::Host(layers)) => Some(layers.as_slice()),
            _ => None,
        };
        let mut kept = match keep {
            Some((_, KvPlacement::Host)) => CachedLayers::Host(Vec::new()),
            _ => CachedLayers::Device(Vec::new()),
        };
        let mut run =
            |hidden: Tensor<B, 3>, layer: &DecoderLayer<B>, past: Option<&KeyValue<B>>| {
                let (out, (k, v)) = layer.forward(hidden, AttentionContext { rope, bias, past });
                if let Some((len, _)) = keep {
                    let kv = (k.narrow(2, 0, len), v.narrow(2, 0, len));
                    match &mut kept {
                        CachedLayers::Device(layers) => layers.push(kv),
                        CachedLayers::Host(layers) => layers.push(HostKeyValue::new(kv)),
                    }
                }
                out
            };
        let offloaded = self.llm.offloaded.as_deref();
        let hidden = if offloaded.is_none() && host_past.is_none() {
            let mut hidden = hidden;
            for (i, layer) in self.llm.layers.iter().enumerate() {
                hidden = run(hidden, layer, device_past.and_then(|p| p.get(i)));
            }
            hidden
        } else {
            let device = hidden.device();
            offload::stream_layers(
                self.llm.num_layers(),
                hidden,
                |i| {
                    Ok(Fetched {
                        layer: offloaded.map(|h| h.layer::<B>(i, &device)).transpose()?,
                        past: host_past
                            .and_then(|p| p.get(i))
                            .map(|kv| kv.upload(&device)),
                    })
                },
                |hidden, i, fetched| {
                    let layer = match &fetched.layer {
                        Some(layer) => layer,
                        None => &self.llm.layers[i],
                    };
                    let past = fetched
                        .past
                        .as_ref()
                        .or_else(|| device_past.and_then(|p| p.get(i)));
                    Ok(run(hidden, layer, past))
                },
            )?
        };
        Ok((hidden, kept))
    }

    /// Final norm on the last `N` tokens, adaLN final layer, unpatchify: `[B, C, h, w]`.
    fn head(
        &self,
        hidden: Tensor<B, 3>,
        timestep: Tensor<B, 1>,
        b: usize,
        h: usize,
        w: usize,
    ) -> Tensor<B, 4> {
        let p = self.config.patch_size;
        let n = (h / p) * (w / p);
        let s = hidden.dims()[1];
        // The final RMSNorm is per token, so normalising only the image tokens is the same.
        let image = self.llm.norm.forward(hidden.narrow(1, s - n, n)); // [B, N, D]
        let temb = self.t_embedder.forward(timestep); // [B, D]
        let patches = self.final_layer.forward(image, temb); // [B, N, p*p*C]
        let out = final_layer::unpatchify(patches, h / p, w / p, p, self.config.in_channels);
        debug_assert_eq!(out.dims(), [b, self.config.in_channels, h, w]);
        out
    }
}
