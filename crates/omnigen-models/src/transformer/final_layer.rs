//! adaLN final layer and unpatchify.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use omnigen_core::{Result, TransformerConfig};

use crate::loader::Loader;
use crate::ops::{self, KernelBackend, LinearLayer};

/// `FinalLayer`: `LayerNorm(no affine, eps 1e-6)`, modulated by `(shift, scale)` from the
/// timestep embedding, then `Linear(D -> p*p*C)`.
#[derive(Module, Debug)]
pub struct FinalLayer<B: Backend> {
    /// `adaLN_modulation.1`: `[2D, D]`, output rows shift | scale (`adaLN_modulation.0` is SiLU).
    pub ada_ln_modulation_1: LinearLayer<B>,
    /// `linear`: `[p*p*C, D]`.
    pub linear: LinearLayer<B>,
    /// Model width `D`.
    pub hidden_size: usize,
}

const NORM_EPS: f64 = 1e-6;

impl<B: Backend> FinalLayer<B> {
    /// Loads `adaLN_modulation.1` and `linear`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let d = config.hidden_size;
        let out = config.patch_size * config.patch_size * config.in_channels;
        Ok(Self {
            ada_ln_modulation_1: loader
                .sub("adaLN_modulation.1")
                .linear_layer(d, 2 * d, true)?,
            linear: loader.sub("linear").linear_layer(d, out, true)?,
            hidden_size: d,
        })
    }
}

impl<B: KernelBackend> FinalLayer<B> {
    /// Modulated norm and projection of the image tokens.
    ///
    /// # Shapes
    /// `x` `[B, N, D]` image tokens, `temb` `[B, D]` -> `[B, N, p*p*C]`.
    pub fn forward(&self, x: Tensor<B, 3>, temb: Tensor<B, 2>) -> Tensor<B, 3> {
        let d = self.hidden_size;
        let modulation = ops::linear(&self.ada_ln_modulation_1, silu(temb)).unsqueeze_dim::<3>(1); // [B, 1, 2D]
        let shift = modulation.clone().narrow(2, 0, d);
        let scale = modulation.narrow(2, d, d);
        let y = layer_norm_no_affine(x) * scale.add_scalar(1.0) + shift; // [B, N, D]
        ops::linear(&self.linear, y)
    }
}

/// `LayerNorm(elementwise_affine=False)` over the last axis, statistics in f32.
fn layer_norm_no_affine<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let (var, mean) = x.clone().var_mean_bias(2); // [B, N, 1] each
    ((x - mean) / var.add_scalar(NORM_EPS).sqrt()).cast(dtype)
}

/// `[B, h*w, p*p*C]` (per-token order `(pr, pc, c)`) -> `[B, C, h*p, w*p]`
/// (`nhwpqc -> nchpwq`).
pub fn unpatchify<B: Backend>(
    x: Tensor<B, 3>,
    h: usize,
    w: usize,
    p: usize,
    c: usize,
) -> Tensor<B, 4> {
    let [b, _, _] = x.dims();
    x.reshape([b, h, w, p, p, c])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([b, c, h * p, w * p])
}
