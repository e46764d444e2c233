//! Key-value cache of the condition tokens across denoising steps.
//!
//! Nothing before the time token attends to the time token or the noisy image, so the condition
//! tokens' keys and values do not depend on the step: they are computed once by
//! [`OmniGenTransformer::prefill`](super::OmniGenTransformer::prefill) and reused by
//! [`OmniGenTransformer::forward_cached`](super::OmniGenTransformer::forward_cached), which feeds
//! only the time token and the image tokens.

use burn::tensor::backend::Backend;

use super::offload::{CachedLayers, KvPlacement};
use super::rope::RopeTables;
use crate::ops::AttentionBias;

/// What the first (prefill) step computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvCacheMode {
    /// Reproduces the official pipeline (`use_kv_cache=True`) exactly: its `OmniGenCache` returns
    /// the keys/values cropped to the condition tokens on the first call, so in step 0 the time
    /// token and the image tokens attend **only to the condition tokens**, not to themselves.
    /// Steps >= 1 are identical in both modes.
    #[default]
    Official,
    /// Step 0 is the plain uncached forward, so every step equals
    /// [`OmniGenTransformer::forward`](super::OmniGenTransformer::forward).
    Exact,
}

/// The condition tokens' keys/values (after RoPE) for every layer, plus what the later steps
/// reuse unchanged: the mask rows and rotary tables of the time and image tokens.
///
/// One cache covers the batch rows it was prefilled with: hold one per CFG branch (separate CFG)
/// or one for a joint batch.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer, keys and values of the condition tokens, `[B, H, L, head_dim]` each, on the
    /// device or in host memory.
    pub(crate) layers: CachedLayers<B>,
    /// Mask rows of the `1 + N` new tokens over all `L + 1 + N` columns, `[B, 1+N, S]`.
    pub(crate) tail_bias: AttentionBias<B>,
    /// Rotary tables of the new tokens (factor set chosen by the full length `S`).
    pub(crate) tail_rope: RopeTables<B>,
    /// Batch rows.
    pub(crate) batch: usize,
    /// Condition tokens `L`.
    pub(crate) cond_len: usize,
    /// Latent height and width of `x` the cache was built for.
    pub(crate) latent_hw: (usize, usize),
    /// The mode of the prefill step.
    pub(crate) mode: KvCacheMode,
}

impl<B: Backend> KvCache<B> {
    /// Batch rows covered.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Number of cached condition tokens (padded text length, input-image tokens included).
    pub fn cond_len(&self) -> usize {
        self.cond_len
    }

    /// Latent `(height, width)` the later steps must feed.
    pub fn latent_size(&self) -> (usize, usize) {
        self.latent_hw
    }

    /// The mode the cache was prefilled with.
    pub fn mode(&self) -> KvCacheMode {
        self.mode
    }

    /// Number of layers cached.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Where the keys and values are kept.
    pub fn placement(&self) -> KvPlacement {
        match &self.layers {
            CachedLayers::Device(_) => KvPlacement::Device,
            CachedLayers::Host(_) => KvPlacement::Host,
        }
    }

    /// Bytes of keys and values kept in host memory (0 when they are on the device).
    pub fn host_bytes(&self) -> u64 {
        match &self.layers {
            CachedLayers::Device(_) => 0,
            CachedLayers::Host(layers) => layers.iter().map(|kv| kv.bytes()).sum(),
        }
    }
}
