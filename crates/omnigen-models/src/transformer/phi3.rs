//! The Phi-3 backbone as OmniGen runs it (transformers 4.45.2 `Phi3Model` under
//! `OmniGen/transformer.py`): RMSNorm, fused-qkv attention with rotary embeddings from explicit
//! position ids and an explicit additive mask, fused gate/up SwiGLU MLP.

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnigen_core::{Result, TransformerConfig};

use std::sync::Arc;

use super::offload::HostLayers;
use super::rope::RopeTables;
use crate::loader::Loader;
use crate::ops::{self, AttentionBias, HeadRange, KernelBackend, LinearLayer};

/// Root-mean-square layer norm: `weight * x / sqrt(mean(x^2) + eps)`, computed in f32.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale, `[D]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Loads `weight` `[dim]`.
    pub fn load(loader: &Loader<B>, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: loader.param("weight", [dim])?,
            eps,
        })
    }
}

impl<B: KernelBackend> RmsNorm<B> {
    /// # Shapes
    /// `x` `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        ops::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Multi-head self-attention with a fused `qkv_proj` (rows q | k | v) and no biases.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[3D, D]` fused projection.
    pub qkv_proj: LinearLayer<B>,
    /// `[D, D]` output projection.
    pub o_proj: LinearLayer<B>,
    /// Number of heads.
    pub num_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Keys and values of one layer after RoPE, `[B, H, S, head_dim]` each.
pub type KeyValue<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// A layer's (or its attention's) output `[B, S, D]` and its new tokens' keys/values.
pub type LayerOutput<B> = (Tensor<B, 3>, KeyValue<B>);

/// What a layer's attention uses besides its input: the same for every layer of one forward,
/// but for the cached keys/values.
pub struct AttentionContext<'a, B: Backend> {
    /// cos/sin tables of the new tokens, `[B, 1, S, head_dim]`.
    pub rope: &'a RopeTables<B>,
    /// The mask `[B, S, S_past + S]` as the attention kernel reads it.
    pub bias: &'a AttentionBias<B>,
    /// The cached tokens' keys/values, `[B, H, S_past, head_dim]` each.
    pub past: Option<&'a KeyValue<B>>,
}

// By hand: derived impls would require `B: Copy`.
impl<B: Backend> Clone for AttentionContext<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for AttentionContext<'_, B> {}

impl<B: Backend> Attention<B> {
    /// Loads `qkv_proj` and `o_proj`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let d = config.hidden_size;
        Ok(Self {
            qkv_proj: loader.sub("qkv_proj").linear_layer(d, 3 * d, false)?,
            o_proj: loader.sub("o_proj").linear_layer(d, d, false)?,
            num_heads: config.num_attention_heads,
            head_dim: config.head_dim(),
        })
    }
}

impl<B: KernelBackend> Attention<B> {
    /// `x` attends to the context's cached keys/values (if any) followed by its own, under its
    /// additive mask. Returns the output and the new tokens' keys/values after RoPE (what a
    /// cache stores).
    ///
    /// # Shapes
    /// `x` `[B, S, D]` (context as [`AttentionContext`]) -> (`[B, S, D]`, `[B, H, S, hd]` each).
    pub fn forward(&self, x: Tensor<B, 3>, ctx: AttentionContext<'_, B>) -> LayerOutput<B> {
        let AttentionContext { rope, bias, past } = ctx;
        let h = self.num_heads;
        let ops::QkvHeads { q, k, v } = ops::qkv_heads(
            &self.qkv_proj,
            x,
            h,
            rope.cos.clone(),
            rope.sin_signed.clone(),
        ); // H heads each of [B, ·, S, hd], q and k rotated
        let (k_new, v_new) = (k.clone().narrowed(), v.clone().narrowed()); // [B, H, S, hd]
        let (k_all, v_all) = match past {
            Some((pk, pv)) => (
                HeadRange::all(Tensor::cat(vec![pk.clone(), k_new.clone()], 2)),
                HeadRange::all(Tensor::cat(vec![pv.clone(), v_new.clone()], 2)),
            ), // [B, H, S_past + S, hd]
            // Without a cache, k and v are read in place from the projection.
            None => (k, v),
        };
        let out = ops::attention(q, k_all, v_all, bias); // [B, S, D]
        (ops::linear(&self.o_proj, out), (k_new, v_new))
    }
}

/// SwiGLU MLP with fused `gate_up_proj` (rows gate | up): `down(up * silu(gate))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[2I, D]` fused gate and up projections.
    pub gate_up_proj: LinearLayer<B>,
    /// `[D, I]` down projection.
    pub down_proj: LinearLayer<B>,
    /// `I`, the width of one half of `gate_up_proj`.
    pub intermediate_size: usize,
}

impl<B: Backend> Mlp<B> {
    /// Loads `gate_up_proj` and `down_proj`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let (d, i) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_up_proj: loader.sub("gate_up_proj").linear_layer(d, 2 * i, false)?,
            down_proj: loader.sub("down_proj").linear_layer(i, d, false)?,
            intermediate_size: i,
        })
    }
}

impl<B: KernelBackend> Mlp<B> {
    /// # Shapes
    /// `x` `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [gate, up] = ops::linear_chunks(&self.gate_up_proj, x); // [B, S, I] each
        ops::linear(&self.down_proj, ops::silu_mul(gate, up))
    }
}

/// One pre-norm Phi-3 decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Feed-forward.
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Loads `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let (d, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(&loader.sub("input_layernorm"), d, eps)?,
            self_attn: Attention::load(&loader.sub("self_attn"), config)?,
            post_attention_layernorm: RmsNorm::load(
                &loader.sub("post_attention_layernorm"),
                d,
                eps,
            )?,
            mlp: Mlp::load(&loader.sub("mlp"), config)?,
        })
    }
}

impl<B: KernelBackend> DecoderLayer<B> {
    /// # Shapes
    /// `x` `[B, S, D]` -> (`[B, S, D]`, this layer's new keys/values `[B, H, S, hd]` each).
    pub fn forward(&self, x: Tensor<B, 3>, ctx: AttentionContext<'_, B>) -> LayerOutput<B> {
        let (attn, kv) = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx);
        let h = x + attn;
        let out = h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h));
        (out, kv)
    }
}

/// `Phi3Model` without its causal-mask logic (OmniGen always passes its own mask).
#[derive(Module, Debug)]
pub struct Phi3Model<B: Backend> {
    /// Token embedding table `[vocab, D]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers on the device (empty when they are [`offloaded`](Self::offloaded)).
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm, applied to every token.
    pub norm: RmsNorm<B>,
    /// The decoder layers kept in host memory instead, streamed to the device one ahead of
    /// use (see [`super::offload`]).
    #[module(skip)]
    pub offloaded: Option<Arc<HostLayers>>,
}

impl<B: Backend> Phi3Model<B> {
    /// Loads `embed_tokens`, `layers.N`, `norm`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        Self::load_with(loader, config, false)
    }

    /// [`load`](Self::load), with the decoder layers kept in host memory when `offload` is set.
    pub fn load_with(
        loader: &Loader<B>,
        config: &TransformerConfig,
        offload: bool,
    ) -> Result<Self> {
        let embed_tokens = Embedding {
            // In the weight dtype: on the CPU backends' half-precision mode the looked-up rows
            // are cast to f32, so the table need not be held in f32.
            weight: Param::from_tensor(
                loader
                    .sub("embed_tokens")
                    .table("weight", [config.vocab_size, config.hidden_size])?,
            ),
        };
        let (layers, offloaded) = if offload {
            (
                Vec::new(),
                Some(Arc::new(HostLayers::read(loader, config)?)),
            )
        } else {
            let layers = (0..config.num_hidden_layers)
                .map(|i| DecoderLayer::load(&loader.sub(format!("layers.{i}")), config))
                .collect::<Result<Vec<_>>>()?;
            (layers, None)
        };
        let norm = RmsNorm::load(&loader.sub("norm"), config.hidden_size, config.rms_norm_eps)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            offloaded,
        })
    }

    /// Number of decoder layers, on the device or offloaded.
    pub fn num_layers(&self) -> usize {
        match &self.offloaded {
            Some(host) => host.len(),
            None => self.layers.len(),
        }
    }
}
