//! Configurations read from the checkpoint's own `config.json` files.
//!
//! OmniGen ships a plain Phi-3 `config.json` (no OmniGen-specific keys: the patch size, latent
//! channels and position-table size are constructor constants of the official model) and the SDXL
//! `vae/config.json`. diffusers' converted checkpoint ships `transformer/config.json` with renamed
//! keys. Both transformer spellings parse into one [`TransformerConfig`].

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Rotary-embedding scaling declared by the checkpoint.
#[derive(Debug, Clone, PartialEq)]
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

/// The OmniGen transformer's hyper-parameters (the Phi-3 backbone plus OmniGen's constants).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (the fused `gate_up_proj` has twice as many rows).
    pub intermediate_size: usize,
    /// Number of Phi-3 decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (OmniGen-v1: equal to `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// Maximum positions the rope scaling was extended to.
    pub max_position_embeddings: usize,
    /// Positions the model was pre-trained on; the LongRoPE switch point.
    pub original_max_position_embeddings: usize,
    /// Rope scaling, if declared.
    pub rope_scaling: Option<RopeScaling>,
    /// Latent patch side (OmniGen-v1: 2).
    pub patch_size: usize,
    /// Latent channels in and out (OmniGen-v1: 4).
    pub in_channels: usize,
    /// Side of the fixed 2-D sin-cos position table, in patches (OmniGen-v1: 192).
    pub pos_embed_max_size: usize,
    /// Width of the sinusoidal timestep features (OmniGen-v1: 256).
    pub time_step_dim: usize,
}

#[derive(Deserialize)]
struct RawRope {
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
}

fn parse_rope(path: &Path, v: &Value, head_dim: usize) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let raw: RawRope = serde_json::from_value(v.clone()).map_err(|e| Error::Config {
        path: path.into(),
        reason: format!("rope_scaling: {e}"),
    })?;
    let kind = raw.rope_type.or(raw.kind).unwrap_or_default();
    match kind.as_str() {
        "su" | "longrope" => {
            let bad = |what: &str| Error::Config {
                path: path.into(),
                reason: format!(
                    "rope_scaling `{kind}` needs `{what}` with {} values",
                    head_dim / 2
                ),
            };
            let short = raw.short_factor.ok_or_else(|| bad("short_factor"))?;
            let long = raw.long_factor.ok_or_else(|| bad("long_factor"))?;
            if short.len() != head_dim / 2 {
                return Err(bad("short_factor"));
            }
            if long.len() != head_dim / 2 {
                return Err(bad("long_factor"));
            }
            Ok(Some(RopeScaling::LongRope {
                short_factor: short,
                long_factor: long,
            }))
        }
        other => Err(Error::Config {
            path: path.into(),
            reason: format!(
                "rope_scaling type `{other}` is not supported (OmniGen uses `su`/`longrope`)"
            ),
        }),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        reason: e.to_string(),
    })
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Value,
}

impl Fields<'_> {
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, "a positive integer")),
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a finite number")),
        }
    }
    fn missing(&self, key: &str) -> Error {
        Error::Config {
            path: self.path.into(),
            reason: format!("missing field `{key}`"),
        }
    }
    fn wrong(&self, key: &str, what: &str) -> Error {
        Error::Config {
            path: self.path.into(),
            reason: format!("field `{key}` must be {what}"),
        }
    }
}

impl TransformerConfig {
    /// Reads a transformer config: the official Phi-3 `config.json` (`model_type: "phi3"`) or
    /// diffusers' `transformer/config.json` (`OmniGenTransformer2DModel`), told apart by their keys.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        Self::from_json_value(path, &value)
    }

    /// Parses an already-read config (`path` is only used in error messages).
    pub fn from_json_value(path: &Path, value: &Value) -> Result<Self> {
        if !value.is_object() {
            return Err(Error::Config {
                path: path.into(),
                reason: "not a JSON object".into(),
            });
        }
        let f = Fields { path, obj: value };
        // diffusers renames num_hidden_layers -> num_layers and rope_theta -> rope_base.
        let diffusers =
            value.get("num_layers").is_some() && value.get("num_hidden_layers").is_none();
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        if hidden_size % num_attention_heads != 0 {
            return Err(f.wrong("num_attention_heads", "a divisor of hidden_size"));
        }
        let head_dim = hidden_size / num_attention_heads;
        if head_dim % 2 != 0 {
            return Err(f.wrong(
                "num_attention_heads",
                "such that the head dimension is even",
            ));
        }
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads != num_attention_heads {
            return Err(f.wrong(
                "num_key_value_heads",
                "equal to num_attention_heads (no grouped-query attention in OmniGen)",
            ));
        }
        let (layers_key, theta_key) = if diffusers {
            ("num_layers", "rope_base")
        } else {
            ("num_hidden_layers", "rope_theta")
        };
        let max_position_embeddings = f.usize("max_position_embeddings")?;
        let original_max_position_embeddings = f
            .opt_usize("original_max_position_embeddings")?
            .unwrap_or(max_position_embeddings);
        let rope_scaling = parse_rope(
            path,
            value.get("rope_scaling").unwrap_or(&Value::Null),
            head_dim,
        )?;
        if let Some(act) = value.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(f.wrong("hidden_act", "\"silu\""));
            }
        }
        Ok(Self {
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize(layers_key)?,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: f.f64("rms_norm_eps")?,
            vocab_size: f.usize("vocab_size")?,
            rope_theta: f.opt_f64(theta_key)?.unwrap_or(10000.0),
            max_position_embeddings,
            original_max_position_embeddings,
            rope_scaling,
            patch_size: f.opt_usize("patch_size")?.unwrap_or(2),
            in_channels: f.opt_usize("in_channels")?.unwrap_or(4),
            pos_embed_max_size: f.opt_usize("pos_embed_max_size")?.unwrap_or(192),
            time_step_dim: f.opt_usize("time_step_dim")?.unwrap_or(256),
        })
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
pub struct VaeConfig {
    /// Image channels in (3).
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Latent channels (4).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Channels of each resolution level, first (full resolution) to last.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Activation (only `silu` exists in SDXL-style VAEs).
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Latents are multiplied by this after encoding and divided before decoding.
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    /// Subtracted before scaling when present (absent in OmniGen-v1).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Encoder block kinds; each must be `DownEncoderBlock2D`.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Decoder block kinds; each must be `UpDecoderBlock2D`.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Whether the mid blocks have self-attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Whether the encoder output goes through a 1×1 `quant_conv`.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether the decoder input goes through a 1×1 `post_quant_conv`.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        let cfg: Self = serde_json::from_value(value).map_err(|e| Error::Config {
            path: path.into(),
            reason: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Config {
                path: path.into(),
                reason,
            })
        };
        if self.block_out_channels.is_empty() {
            return bad("`block_out_channels` is empty".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups.max(1) != 0)
        {
            return bad(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "act_fn `{}` is not supported (only silu)",
                self.act_fn
            ));
        }
        let levels = self.block_out_channels.len();
        for (key, list, kind) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if !list.is_empty() && list.len() != levels {
                return bad(format!(
                    "`{key}` has {} entries but block_out_channels has {levels}",
                    list.len()
                ));
            }
            if let Some(other) = list.iter().find(|t| t.as_str() != kind) {
                return bad(format!(
                    "`{key}` entry `{other}` is not supported (only {kind})"
                ));
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return bad("`scaling_factor` must be finite and non-zero".into());
        }
        if self.norm_num_groups == 0 || self.latent_channels == 0 || self.layers_per_block == 0 {
            return bad(
                "`norm_num_groups`, `latent_channels` and `layers_per_block` must be positive"
                    .into(),
            );
        }
        Ok(())
    }

    /// Spatial downsampling factor between pixels and latents (8 for four levels).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
