//! Configurations read from the checkpoint's own `config.json` files.
//!
//! OmniGen ships a plain Phi-3 `config.json` (no OmniGen-specific keys: the patch size, latent
//! channels and position-table size are constructor constants of the official model) and the SDXL
//! `vae/config.json`. diffusers' converted checkpoint ships `transformer/config.json` with renamed
//! keys. Both transformer spellings parse into one [`TransformerConfig`] (serde aliases).
//!
//! Reading is two steps: serde fills the struct (keys a file leaves out, or sets to `null`, take
//! the [`Default`] value), then the config's one `validate` checks it. The sizes that only the
//! checkpoint can know default to 0, which `validate` reports as missing.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Rotary-embedding scaling declared by the checkpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawRopeScaling")]
pub enum RopeScaling {
    /// Phi-3 LongRoPE (legacy spelling `"su"`, newer `"longrope"`): per-frequency divisors, the
    /// long set used when a forward's sequence is longer than `original_max_position_embeddings`.
    LongRope {
        /// Divisors used for sequences up to `original_max_position_embeddings` tokens.
        short_factor: Vec<f64>,
        /// Divisors used for longer sequences.
        long_factor: Vec<f64>,
    },
}

/// `rope_scaling` as written: transformers spells the kind `type` (older) or `rope_type`.
#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
}

impl TryFrom<RawRopeScaling> for RopeScaling {
    type Error = String;
    fn try_from(raw: RawRopeScaling) -> std::result::Result<Self, String> {
        let kind = raw.rope_type.or(raw.kind).unwrap_or_default();
        match kind.as_str() {
            "su" | "longrope" => {
                let needs = |what: &str| format!("type `{kind}` needs `{what}`");
                Ok(Self::LongRope {
                    short_factor: raw.short_factor.ok_or_else(|| needs("short_factor"))?,
                    long_factor: raw.long_factor.ok_or_else(|| needs("long_factor"))?,
                })
            }
            other => Err(format!(
                "type `{other}` is not supported (OmniGen uses `su`/`longrope`)"
            )),
        }
    }
}

/// The OmniGen transformer's hyper-parameters (the Phi-3 backbone plus OmniGen's constants).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (the fused `gate_up_proj` has twice as many rows).
    pub intermediate_size: usize,
    /// Number of Phi-3 decoder layers (diffusers: `num_layers`).
    #[serde(alias = "num_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (OmniGen-v1: equal to `num_attention_heads`; a config that leaves it
    /// out means exactly that).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Rotary base (diffusers: `rope_base`).
    #[serde(alias = "rope_base")]
    pub rope_theta: f64,
    /// Maximum positions the rope scaling was extended to.
    pub max_position_embeddings: usize,
    /// Positions the model was pre-trained on; the LongRoPE switch point (a config that leaves
    /// it out means `max_position_embeddings`).
    pub original_max_position_embeddings: usize,
    /// Rope scaling, if declared.
    pub rope_scaling: Option<RopeScaling>,
    /// MLP activation (only `silu` exists in Phi-3).
    pub hidden_act: String,
    /// Latent patch side (OmniGen-v1: 2).
    pub patch_size: usize,
    /// Latent channels in and out (OmniGen-v1: 4).
    pub in_channels: usize,
    /// Side of the fixed 2-D sin-cos position table, in patches (OmniGen-v1: 192).
    pub pos_embed_max_size: usize,
    /// Width of the sinusoidal timestep features (OmniGen-v1: 256).
    pub time_step_dim: usize,
}

impl Default for TransformerConfig {
    /// What a `config.json` may leave out: OmniGen's constructor constants, rotary base 10000,
    /// no rope scaling, `silu`. The checkpoint's own sizes are 0 (unset) — `validate` refuses
    /// them — and the key/value heads and pre-training positions 0 (taken from the attention
    /// heads and `max_position_embeddings` when a file is read).
    fn default() -> Self {
        Self {
            hidden_size: 0,
            intermediate_size: 0,
            num_hidden_layers: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            rms_norm_eps: 0.0,
            vocab_size: 0,
            rope_theta: 10000.0,
            max_position_embeddings: 0,
            original_max_position_embeddings: 0,
            rope_scaling: None,
            hidden_act: "silu".into(),
            patch_size: 2,
            in_channels: 4,
            pos_embed_max_size: 192,
            time_step_dim: 256,
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Reads the JSON file `path` and hands it to a config's `from_json_value`.
fn read_config<T>(path: &Path, parse: fn(&Path, &Value) -> Result<T>) -> Result<T> {
    parse(path, &read_json(path)?)
}

/// Deserializes the JSON object `value` into `T`, whose fields all have defaults: a key set to
/// `null` counts as absent, and a value serde refuses is reported with its key (found by
/// deserializing each key alone, which works because every other field may be absent).
fn from_object<T: DeserializeOwned>(path: &Path, value: &Value) -> Result<T> {
    let Some(obj) = value.as_object() else {
        return Err(Error::Config {
            path: path.into(),
            reason: "not a JSON object".into(),
        });
    };
    let obj: Map<String, Value> = obj
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::from_value(Value::Object(obj.clone())).map_err(|whole| {
        let culprit = obj.iter().find_map(|(key, v)| {
            let alone = Value::Object(Map::from_iter([(key.clone(), v.clone())]));
            serde_json::from_value::<T>(alone)
                .err()
                .map(|e| format!("field `{key}`: {e}"))
        });
        Error::Config {
            path: path.into(),
            reason: culprit.unwrap_or_else(|| whole.to_string()),
        }
    })
}

/// A `validate` error as a config-file error: `field `name` <reason>` in `path`.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::InvalidArgument { name, reason } => Error::Config {
            path: path.into(),
            reason: format!("field `{name}` {reason}"),
        },
        other => other,
    }
}

/// `Err` naming `field` when `value` is 0.
fn positive(field: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::invalid_argument(field, "is missing or 0"));
    }
    Ok(())
}

/// [`positive`] and at most `max`: sizes far beyond any real model would overflow the size
/// arithmetic (weights, tables, memory estimates) long before they could load.
fn bounded(field: &'static str, value: usize, max: usize) -> Result<()> {
    positive(field, value)?;
    if value > max {
        return Err(Error::invalid_argument(
            field,
            format!("{value} exceeds {max}, far beyond any OmniGen model"),
        ));
    }
    Ok(())
}

/// A float field the f32 kernels use: finite and positive once rounded to f32 (an `eps` of
/// 1e-50 is 0 in f32 and divides by zero; a `rope_theta` of 1e300 is infinite).
fn positive_f32(field: &'static str, value: f64) -> Result<()> {
    let v = value as f32;
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::invalid_argument(
            field,
            format!("is missing or not a positive number representable in f32 ({value})"),
        ));
    }
    Ok(())
}

impl TransformerConfig {
    /// Reads a transformer config: the official Phi-3 `config.json` (`model_type: "phi3"`) or
    /// diffusers' `transformer/config.json` (`OmniGenTransformer2DModel`), whose renamed keys are
    /// serde aliases.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_config(path.as_ref(), Self::from_json_value)
    }

    /// Parses and validates an already-read config (`path` is only used in error messages).
    pub fn from_json_value(path: &Path, value: &Value) -> Result<Self> {
        let mut config: Self = from_object(path, value)?;
        if config.num_key_value_heads == 0 {
            config.num_key_value_heads = config.num_attention_heads;
        }
        if config.original_max_position_embeddings == 0 {
            config.original_max_position_embeddings = config.max_position_embeddings;
        }
        config.validate().map_err(|e| in_file(path, e))?;
        Ok(config)
    }

    /// Checks every field, naming the first one at fault ([`Error::InvalidArgument`]; reading
    /// a file reports it as [`Error::Config`] with the file's path).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::invalid_argument(field, reason));
        bounded("hidden_size", self.hidden_size, 1 << 16)?;
        bounded("num_attention_heads", self.num_attention_heads, 1 << 12)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!("must be a divisor of hidden_size ({})", self.hidden_size),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "num_attention_heads",
                format!(
                    "must leave an even head dimension (hidden_size / num_attention_heads = {})",
                    self.head_dim()
                ),
            );
        }
        if self.num_key_value_heads != self.num_attention_heads {
            return bad(
                "num_key_value_heads",
                format!(
                    "must equal num_attention_heads ({}): OmniGen has no grouped-query attention",
                    self.num_attention_heads
                ),
            );
        }
        bounded("intermediate_size", self.intermediate_size, 1 << 20)?;
        bounded("num_hidden_layers", self.num_hidden_layers, 1 << 10)?;
        bounded("vocab_size", self.vocab_size, 1 << 24)?;
        bounded(
            "max_position_embeddings",
            self.max_position_embeddings,
            1 << 30,
        )?;
        bounded(
            "original_max_position_embeddings",
            self.original_max_position_embeddings,
            1 << 30,
        )?;
        positive_f32("rms_norm_eps", self.rms_norm_eps)?;
        positive_f32("rope_theta", self.rope_theta)?;
        if self.rope_scaling.is_some()
            && self.original_max_position_embeddings == 1
            && self.max_position_embeddings > 1
        {
            // LongRoPE's attention scaling divides by ln(original_max_position_embeddings)
            return bad(
                "original_max_position_embeddings",
                "is 1: LongRoPE's scaling divides by its logarithm".to_string(),
            );
        }
        if let Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
        }) = &self.rope_scaling
        {
            let half = self.head_dim() / 2;
            for (what, factors) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if let Some(f) = factors
                    .iter()
                    .find(|&&f| !((f as f32).is_finite() && f as f32 > 0.0))
                {
                    // the rotary frequencies divide by every factor
                    return bad(
                        "rope_scaling",
                        format!("`{what}` has {f}; every factor must be a positive finite number"),
                    );
                }
                if factors.len() != half {
                    return bad(
                        "rope_scaling",
                        format!(
                            "has {} `{what}` values, the head dimension needs {half}",
                            factors.len()
                        ),
                    );
                }
            }
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("is `{}`; only `silu` is supported", self.hidden_act),
            );
        }
        bounded("patch_size", self.patch_size, 64)?;
        bounded("in_channels", self.in_channels, 1 << 10)?;
        bounded("pos_embed_max_size", self.pos_embed_max_size, 1 << 12)?;
        bounded("time_step_dim", self.time_step_dim, 1 << 16)?;
        Ok(())
    }

    /// Attention head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// LongRoPE's cos/sin multiplier: `sqrt(1 + ln(max/orig) / ln(orig))` when the context was
    /// extended, else 1 (transformers' `Phi3LongRoPEScaledRotaryEmbedding`).
    pub fn rope_attention_scaling(&self) -> f64 {
        if self.rope_scaling.is_none() {
            return 1.0;
        }
        let scale =
            self.max_position_embeddings as f64 / self.original_max_position_embeddings as f64;
        if scale <= 1.0 {
            1.0
        } else {
            (1.0 + scale.ln() / (self.original_max_position_embeddings as f64).ln()).sqrt()
        }
    }

    /// Number of learned parameters, computed from the configuration alone (OmniGen-v1:
    /// 3,762,072,592). The fixed `pos_embed` buffer is not a parameter; see
    /// [`num_stored_values`](Self::num_stored_values).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let c = self.in_channels as u64;
        let p = self.patch_size as u64;
        let per_layer = 3 * h * h + h * h + 2 * i * h + i * h + 2 * h;
        let layers = self.num_hidden_layers as u64 * per_layer;
        let embed = self.vocab_size as u64 * h;
        let patch = 2 * (h * c * p * p + h);
        let time = 2 * (self.time_step_dim as u64 * h + h + h * h + h);
        let final_layer = (2 * h * h + 2 * h) + (p * p * c * h + p * p * c);
        layers + h + embed + patch + time + final_layer
    }

    /// Number of values in the `pos_embed` buffer (`G * G * hidden`; OmniGen-v1: 113,246,208).
    pub fn pos_embed_len(&self) -> u64 {
        (self.pos_embed_max_size * self.pos_embed_max_size) as u64 * self.hidden_size as u64
    }

    /// Number of values the official checkpoint stores: the learned parameters plus the
    /// `pos_embed` buffer (OmniGen-v1: 3,875,318,800).
    pub fn num_stored_values(&self) -> u64 {
        self.num_parameters() + self.pos_embed_len()
    }
}

/// The SDXL-style `AutoencoderKL` configuration (`vae/config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Channels of each resolution level, first (full resolution) to last.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Activation (only `silu` exists in SDXL-style VAEs).
    pub act_fn: String,
    /// Latents are multiplied by this after encoding and divided before decoding.
    pub scaling_factor: f64,
    /// Subtracted before scaling when present (absent in OmniGen-v1).
    pub shift_factor: Option<f64>,
    /// Encoder block kinds; each must be `DownEncoderBlock2D` (empty: every level is one).
    pub down_block_types: Vec<String>,
    /// Decoder block kinds; each must be `UpDecoderBlock2D` (empty: every level is one).
    pub up_block_types: Vec<String>,
    /// Whether the mid blocks have self-attention.
    pub mid_block_add_attention: bool,
    /// Whether the encoder output goes through a 1×1 `quant_conv`.
    pub use_quant_conv: bool,
    /// Whether the decoder input goes through a 1×1 `post_quant_conv`.
    pub use_post_quant_conv: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL` constructor defaults, except `block_out_channels`, which only
    /// the checkpoint can know: empty (unset), refused by `validate`.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: Vec::new(),
            layers_per_block: 1,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            scaling_factor: 0.18215,
            shift_factor: None,
            down_block_types: Vec::new(),
            up_block_types: Vec::new(),
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_config(path.as_ref(), Self::from_json_value)
    }

    /// Parses and validates an already-read config (`path` is only used in error messages).
    pub fn from_json_value(path: &Path, value: &Value) -> Result<Self> {
        let config: Self = from_object(path, value)?;
        config.validate().map_err(|e| in_file(path, e))?;
        Ok(config)
    }

    /// Checks every field, naming the first one at fault ([`Error::InvalidArgument`]; reading
    /// a file reports it as [`Error::Config`] with the file's path).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::invalid_argument(field, reason));
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels", "is missing or empty".into());
        }
        if self.block_out_channels.len() > 8 {
            return bad(
                "block_out_channels",
                format!(
                    "has {} levels; at most 8 are supported (SDXL's VAE has 4)",
                    self.block_out_channels.len()
                ),
            );
        }
        bounded("norm_num_groups", self.norm_num_groups, 1 << 12)?;
        bounded("latent_channels", self.latent_channels, 1 << 10)?;
        bounded("layers_per_block", self.layers_per_block, 64)?;
        bounded("in_channels", self.in_channels, 1 << 10)?;
        bounded("out_channels", self.out_channels, 1 << 10)?;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c > 1 << 16 || c % self.norm_num_groups != 0)
        {
            return bad(
                "block_out_channels",
                format!(
                    "entry {c} is not a positive multiple of norm_num_groups {} (at most 65536)",
                    self.norm_num_groups
                ),
            );
        }
        if self.act_fn != "silu" {
            return bad(
                "act_fn",
                format!("is `{}`; only `silu` is supported", self.act_fn),
            );
        }
        let levels = self.block_out_channels.len();
        for (field, list, kind) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if !list.is_empty() && list.len() != levels {
                return bad(
                    field,
                    format!(
                        "has {} entries but block_out_channels has {levels}",
                        list.len()
                    ),
                );
            }
            if let Some(other) = list.iter().find(|t| t.as_str() != kind) {
                return bad(
                    field,
                    format!("entry `{other}` is not supported (only {kind})"),
                );
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return bad(
                "scaling_factor",
                format!("must be finite and non-zero ({})", self.scaling_factor),
            );
        }
        if let Some(shift) = self.shift_factor.filter(|s| !s.is_finite()) {
            return bad("shift_factor", format!("must be finite ({shift})"));
        }
        Ok(())
    }

    /// Spatial downsampling factor between pixels and latents (8 for four levels).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
