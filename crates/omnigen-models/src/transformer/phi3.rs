//! The Phi-3 backbone as OmniGen runs it (transformers 4.45.2 `Phi3Model` under
//! `OmniGen/transformer.py`): RMSNorm, fused-qkv attention with rotary embeddings from explicit
//! position ids and an explicit additive mask, fused gate/up SwiGLU MLP.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor};
use omnigen_core::{Result, TransformerConfig};

use super::rope::{apply_rotary, RopeTables};
use crate::loader::Loader;

/// `Linear::forward` for `[B, S, in]` inputs without burn's per-call weight copy: burn's
/// `linear` unsqueezes the weight to the input's rank, and burn-flex materialises that reshape
/// of the transposed (PyTorch-layout) view on every call. Flattening the input to 2-D instead
/// (free: it is contiguous) lets the GEMM read the transposed weight through its strides.
pub(crate) fn linear3<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, d_in] = x.dims();
    let w = linear.weight.val(); // [in, out]
    let d_out = w.dims()[1];
    let y = x.reshape([b * s, d_in]).matmul(w);
    let y = match &linear.bias {
        Some(bias) => y + bias.val().unsqueeze::<2>(),
        None => y,
    };
    y.reshape([b, s, d_out])
}

/// Whether the host kernels of [`crate::host`] apply: an f32 tensor on a CPU backend.
#[cfg(any(feature = "flex", feature = "ndarray"))]
fn host_f32<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    x.dtype() == DType::F32 && crate::vae::is_cpu_backend::<B>(&x.device())
}

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

    /// `x`: `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        if host_f32(&x) {
            return crate::host::rms_norm(x, self.weight.val(), self.eps);
        }
        let dtype = x.dtype();
        // transformers upcasts to f32 for the statistics, then casts back before the scale.
        let x32 = x.cast(DType::F32);
        let inv_rms = x32
            .clone()
            .square()
            .mean_dim(2)
            .add_scalar(self.eps)
            .sqrt()
            .recip(); // [B, S, 1]
        let normed = (x32 * inv_rms).cast(dtype);
        normed * self.weight.val().unsqueeze::<3>()
    }
}

/// Multi-head self-attention with a fused `qkv_proj` (rows q | k | v) and no biases.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[3D, D]` fused projection.
    pub qkv_proj: Linear<B>,
    /// `[D, D]` output projection.
    pub o_proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Keys and values of one layer after RoPE, `[B, H, S, head_dim]` each.
pub type KeyValue<B> = (Tensor<B, 4>, Tensor<B, 4>);

impl<B: Backend> Attention<B> {
    /// Loads `qkv_proj` and `o_proj`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let d = config.hidden_size;
        Ok(Self {
            qkv_proj: loader.sub("qkv_proj").linear(d, 3 * d, false)?,
            o_proj: loader.sub("o_proj").linear(d, d, false)?,
            num_heads: config.num_attention_heads,
            head_dim: config.head_dim(),
        })
    }

    /// `x` `[B, S, D]` attends to `past` keys/values (if any) followed by its own.
    ///
    /// `rope` holds the tables repeated over `2H` heads ([`RopeTables::repeat_heads`]).
    /// `bias` is the additive mask `[B, 1, S, S_past + S]`. Returns the output `[B, S, D]` and the
    /// new tokens' keys/values after RoPE (what a cache stores).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Tensor<B, 4>,
        past: Option<&KeyValue<B>>,
    ) -> (Tensor<B, 3>, KeyValue<B>) {
        let [b, s, d] = x.dims();
        let (h, hd) = (self.num_heads, self.head_dim);
        // Per-head projection straight into the [B, 3H, S, hd] layout attention wants: the
        // weight's `[3D, D]` storage viewed as `[3H, D, hd]` (no copy) is the right-hand side
        // of one batched product, so no strided [B, S, 3H, hd] -> [B, 3H, S, hd] copy follows.
        // (Reshapes only on the contiguous storage: burn-flex copies when reshaping a view.)
        let w = self
            .qkv_proj
            .weight
            .val() // [D, 3D] (transposed view of the checkpoint's [3D, D])
            .transpose() // [3D, D], contiguous
            .reshape([1, 3 * h, hd, d])
            .swap_dims(2, 3); // [1, 3H, D, hd]
        let qkv = x.unsqueeze_dim::<4>(1).matmul(w); // [B, 3H, S, hd]
                                                     // q and k rotated together; `rope` holds tables repeated over 2H heads.
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        let qk = if host_f32(&qkv) {
            crate::host::rope(
                qkv.clone(),
                2 * h,
                rope.cos.clone(),
                rope.sin_signed.clone(),
            )
        } else {
            apply_rotary(qkv.clone().narrow(1, 0, 2 * h), rope)
        };
        #[cfg(not(any(feature = "flex", feature = "ndarray")))]
        let qk = apply_rotary(qkv.clone().narrow(1, 0, 2 * h), rope); // [B, 2H, S, hd]
        let k = qk.clone().narrow(1, h, h); // [B, H, S, hd]
        let v = qkv.clone().narrow(1, 2 * h, h); // [B, H, S, hd]
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        if host_f32(&qkv) {
            // Host attention reads q, k and v in place from the projection (or from the
            // concatenated cache) and writes [B, S, D] directly.
            use crate::host::Heads;
            let (k_src, v_src) = match past {
                Some((pk, pv)) => (
                    Heads {
                        tensor: Tensor::cat(vec![pk.clone(), k.clone()], 2),
                        h0: 0,
                    },
                    Heads {
                        tensor: Tensor::cat(vec![pv.clone(), v.clone()], 2),
                        h0: 0,
                    },
                ),
                None => (
                    Heads {
                        tensor: qk.clone(),
                        h0: h,
                    },
                    Heads {
                        tensor: qkv.clone(),
                        h0: 2 * h,
                    },
                ),
            };
            let q_src = Heads { tensor: qk, h0: 0 };
            let out = crate::host::attention(q_src, k_src, v_src, bias, h);
            return (linear3(&self.o_proj, out), (k, v));
        }
        let (k_all, v_all) = match past {
            Some((pk, pv)) => (
                Tensor::cat(vec![pk.clone(), k.clone()], 2),
                Tensor::cat(vec![pv.clone(), v.clone()], 2),
            ),
            None => (k.clone(), v.clone()),
        }; // [B, H, S_past + S, hd]
        let q = qk.narrow(1, 0, h); // [B, H, S, hd]
        let out = attention(
            q,
            k_all,
            v_all,
            None,
            Some(bias),
            AttentionModuleOptions::default(),
        ); // [B, H, S, hd]
        let out = out.swap_dims(1, 2).reshape([b, s, d]); // [B, S, D]
        (linear3(&self.o_proj, out), (k, v))
    }
}

/// SwiGLU MLP with fused `gate_up_proj` (rows gate | up): `down(up * silu(gate))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[2I, D]` fused gate and up projections.
    pub gate_up_proj: Linear<B>,
    /// `[D, I]` down projection.
    pub down_proj: Linear<B>,
    /// `I`, the width of one half of `gate_up_proj`.
    pub intermediate_size: usize,
}

impl<B: Backend> Mlp<B> {
    /// Loads `gate_up_proj` and `down_proj`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let (d, i) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_up_proj: loader.sub("gate_up_proj").linear(d, 2 * i, false)?,
            down_proj: loader.sub("down_proj").linear(i, d, false)?,
            intermediate_size: i,
        })
    }

    /// `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let i = self.intermediate_size;
        // Two products with the column halves of the fused weight (views, no copy) give
        // contiguous gate and up: the elementwise ops then run on contiguous data instead of
        // strided halves of one [B, S, 2I] tensor.
        let [b, s, d] = x.dims();
        let x = x.reshape([b * s, d]);
        let w = self.gate_up_proj.weight.val(); // [D, 2I]
        let gate = x.clone().matmul(w.clone().narrow(1, 0, i)); // [B·S, I]
        let up = x.matmul(w.narrow(1, i, i)); // [B·S, I]
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        if host_f32(&gate) {
            return linear3(
                &self.down_proj,
                crate::host::silu_mul(gate, up).reshape([b, s, i]),
            );
        }
        linear3(&self.down_proj, (up * silu(gate)).reshape([b, s, i]))
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

    /// `x` `[B, S, D]` -> (`[B, S, D]`, this layer's new keys/values).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Tensor<B, 4>,
        past: Option<&KeyValue<B>>,
    ) -> (Tensor<B, 3>, KeyValue<B>) {
        let (attn, kv) =
            self.self_attn
                .forward(self.input_layernorm.forward(x.clone()), rope, bias, past);
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
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm, applied to every token.
    pub norm: RmsNorm<B>,
}

impl<B: Backend> Phi3Model<B> {
    /// Loads `embed_tokens`, `layers.N`, `norm`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let embed_tokens = Embedding {
            weight: loader
                .sub("embed_tokens")
                .param("weight", [config.vocab_size, config.hidden_size])?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&loader.sub(format!("layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&loader.sub("norm"), config.hidden_size, config.rms_norm_eps)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
        })
    }
}
