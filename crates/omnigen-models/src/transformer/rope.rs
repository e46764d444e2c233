//! Phi-3 rotary position embedding with LongRoPE ("su") scaling, as transformers 4.45.2's
//! `Phi3LongRoPEScaledRotaryEmbedding` computes it for the official OmniGen backbone.
//!
//! burn's `RotaryEncoding` rotates interleaved pairs over contiguous positions; Phi-3 rotates
//! halves (`rotate_half`) at explicit, per-row `position_ids`, so the tables are built here and
//! applied by [`ops::rope`](crate::ops::rope).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use omnigen_core::{RopeScaling, TransformerConfig};

/// Rotary tables for one forward: `cos`/`sin` of shape `[B, 1, S, head_dim]` (broadcast over
/// heads), already multiplied by the LongRoPE attention scaling.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `cos(pos * inv_freq) * scaling`, `[B, 1, S, head_dim]`.
    pub cos: Tensor<B, 4>,
    /// `sin(pos * inv_freq) * scaling` with the first half negated, `[B, 1, S, head_dim]`:
    /// folding rotate-half's sign into the table leaves only a half swap per application.
    pub sin_signed: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    /// The rows `start..start + len` of the sequence axis.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        Self {
            cos: self.cos.clone().narrow(2, start, len),
            sin_signed: self.sin_signed.clone().narrow(2, start, len),
        }
    }

    /// Plain `sin` (un-negated), `[B, 1, S, head_dim]`; for tests against reference tables.
    pub fn sin(&self) -> Tensor<B, 4> {
        let half = self.sin_signed.dims()[3] / 2;
        let [lo, hi] = halves(self.sin_signed.clone(), half);
        Tensor::cat(vec![lo.neg(), hi], 3)
    }
}

/// LongRoPE frequency tables and the short/long switch point.
#[derive(Debug, Clone)]
pub struct LongRope {
    head_dim: usize,
    /// Inverse frequencies with the short factors (or unscaled when the config has no scaling).
    inv_freq_short: Vec<f32>,
    /// Inverse frequencies with the long factors.
    inv_freq_long: Vec<f32>,
    /// Sequences longer than this use the long factors.
    original_max_position_embeddings: usize,
    /// cos/sin multiplier.
    scaling: f32,
}

impl LongRope {
    /// Builds the tables from the config's rope settings.
    pub fn new(config: &TransformerConfig) -> Self {
        let head_dim = config.head_dim();
        let half = head_dim / 2;
        // transformers: `base ** (arange(0, dim, 2).float() / dim)` in f32, then
        // `1 / (ext_factors * that)`.
        let base_pow: Vec<f32> = (0..half)
            .map(|j| (config.rope_theta as f32).powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let with = |factors: Option<&[f64]>| -> Vec<f32> {
            base_pow
                .iter()
                .enumerate()
                .map(|(j, p)| 1.0 / (factors.map_or(1.0, |f| f[j] as f32) * p))
                .collect()
        };
        let (short, long) = match &config.rope_scaling {
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
            }) => (with(Some(short_factor)), with(Some(long_factor))),
            None => (with(None), with(None)),
        };
        Self {
            head_dim,
            inv_freq_short: short,
            inv_freq_long: long,
            original_max_position_embeddings: config.original_max_position_embeddings,
            scaling: config.rope_attention_scaling() as f32,
        }
    }

    /// Whether a forward whose full key length (cached + new tokens, padded) is `seq_len` uses the
    /// long factors.
    pub fn uses_long_factors(&self, seq_len: usize) -> bool {
        seq_len > self.original_max_position_embeddings
    }

    /// cos/sin tables for `position_ids` `[B, S]`; the factor set is chosen by `total_len`, the
    /// forward's full key length (official: `kv_seq_len`, not `max(position_ids) + 1`).
    pub fn tables<B: Backend>(
        &self,
        position_ids: Tensor<B, 2, Int>,
        total_len: usize,
        dtype: DType,
    ) -> RopeTables<B> {
        let device = position_ids.device();
        let [b, s] = position_ids.dims();
        let half = self.head_dim / 2;
        let inv = if self.uses_long_factors(total_len) {
            &self.inv_freq_long
        } else {
            &self.inv_freq_short
        };
        // Computed in f32 whatever the model dtype, as transformers does, then cast.
        let inv = Tensor::<B, 3>::from_data(TensorData::new(inv.clone(), [1, 1, half]), &device);
        let pos = position_ids.float().cast(DType::F32).reshape([b, s, 1]);
        let freqs = pos * inv; // [B, S, half]
        let cos = freqs.clone().cos().mul_scalar(self.scaling);
        let sin = freqs.sin().mul_scalar(self.scaling);
        let cos = Tensor::cat(vec![cos.clone(), cos], 2); // [B, S, head_dim]
        let sin_signed = Tensor::cat(vec![sin.clone().neg(), sin], 2); // [B, S, head_dim]
        RopeTables {
            cos: cos.cast(dtype).unsqueeze_dim(1),
            sin_signed: sin_signed.cast(dtype).unsqueeze_dim(1),
        }
    }
}

fn halves<B: Backend>(x: Tensor<B, 4>, half: usize) -> [Tensor<B, 4>; 2] {
    [x.clone().narrow(3, 0, half), x.narrow(3, half, half)]
}
