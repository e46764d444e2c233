//! Input embedders: latent patch embedding with the cropped 2-D sin-cos position table, and the
//! sinusoidal timestep embedder.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use omnigen_core::{Error, Result, TransformerConfig};

use crate::loader::Loader;
use crate::ops::{self, KernelBackend, LinearLayer};

/// `Conv2d(C, D, kernel = stride = patch)` turning a latent into row-major patch tokens
/// (`PatchEmbedMR`).
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// The patchifying convolution, PyTorch layout `[D, C, p, p]`.
    pub proj: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// Loads `proj.{weight,bias}`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let p = config.patch_size;
        Ok(Self {
            proj: loader
                .sub("proj")
                .conv2d(config.in_channels, config.hidden_size, p, p, 0)?,
        })
    }

    /// `[B, C, h, w]` -> `[B, (h/p)(w/p), D]`, token `r * (w/p) + c`.
    pub fn forward(&self, latent: Tensor<B, 4>) -> Tensor<B, 3> {
        self.proj.forward(latent).flatten::<3>(2, 3).swap_dims(1, 2)
    }
}

/// The fixed `[G*G, D]` sin-cos table and its centred crop per image.
#[derive(Module, Debug)]
pub struct PosEmbed<B: Backend> {
    /// `pos_embed` as stored in the checkpoint, reshaped to `[G, G, D]` (row, column, channel),
    /// in the weight dtype.
    /// A plain tensor, not a parameter: it is a fixed buffer.
    pub table: Tensor<B, 3>,
    /// `G`, the table side in patches.
    pub max_size: usize,
}

impl<B: Backend> PosEmbed<B> {
    /// Loads `pos_embed` `[1, G*G, D]`. It is read from the checkpoint rather than recomputed
    /// because the official pipeline uses the stored (bf16-rounded) buffer.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let g = config.pos_embed_max_size;
        let table = loader
            .table("pos_embed", [1, g * g, config.hidden_size])?
            .reshape([g, g, config.hidden_size]);
        Ok(Self { table, max_size: g })
    }

    /// The centred crop for an `h_patches x w_patches` grid, row-major: `[h*w, D]`, in the
    /// table's dtype (the weight dtype)
    /// (`cropped_pos_embed`: `top = (G - h) / 2`, `left = (G - w) / 2`).
    pub fn crop(&self, h_patches: usize, w_patches: usize) -> Result<Tensor<B, 2>> {
        let g = self.max_size;
        if h_patches > g || w_patches > g || h_patches == 0 || w_patches == 0 {
            return Err(Error::invalid_argument(
                "latent",
                format!(
                    "a {h_patches}x{w_patches} patch grid does not fit the {g}x{g} position table"
                ),
            ));
        }
        let (top, left) = ((g - h_patches) / 2, (g - w_patches) / 2);
        let d = self.table.dims()[2];
        Ok(self
            .table
            .clone()
            .slice([top..top + h_patches, left..left + w_patches, 0..d])
            .reshape([h_patches * w_patches, d]))
    }
}

/// `TimestepEmbedder`: 256-d `[cos, sin]` features of the raw flow time, then
/// `Linear -> SiLU -> Linear`.
#[derive(Module, Debug)]
pub struct TimestepEmbedder<B: Backend> {
    /// `mlp.0`: `[D, 256]`.
    pub mlp_0: LinearLayer<B>,
    /// `mlp.2`: `[D, D]` (`mlp.1` is the SiLU).
    pub mlp_2: LinearLayer<B>,
    /// Width of the sinusoidal features (256).
    pub frequency_dim: usize,
}

impl<B: Backend> TimestepEmbedder<B> {
    /// Loads `mlp.0` and `mlp.2`.
    pub fn load(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let (d, f) = (config.hidden_size, config.time_step_dim);
        Ok(Self {
            mlp_0: loader.sub("mlp.0").linear_layer(f, d, true)?,
            mlp_2: loader.sub("mlp.2").linear_layer(d, d, true)?,
            frequency_dim: f,
        })
    }
}

impl<B: KernelBackend> TimestepEmbedder<B> {
    /// # Shapes
    /// `t` `[B]` (flow time in [0, 1], not scaled by 1000) -> `[B, D]`.
    pub fn forward(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        // The bias is in the compute dtype; the weight may be stored narrower (bf16 weights
        // with f32 compute) or quantized.
        let dtype = self.mlp_0.bias().map_or(t.dtype(), |b| b.val().dtype());
        let features = timestep_features(t, self.frequency_dim).cast(dtype); // [B, 256]
        ops::linear(&self.mlp_2, silu(ops::linear(&self.mlp_0, features)))
    }
}

/// `[cos(t * f_k), sin(t * f_k)]` with `f_k = exp(-ln(10000) * k / half)`, computed in f32 as
/// the official `timestep_embedding` does: `[B]` -> `[B, dim]`.
pub fn timestep_features<B: Backend>(t: Tensor<B, 1>, dim: usize) -> Tensor<B, 2> {
    let half = dim / 2;
    let device = t.device();
    let [b] = t.dims();
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (neg_log * k as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::<B, 2>::from_data(TensorData::new(freqs, [1, half]), &device);
    let args = t.cast(DType::F32).reshape([b, 1]) * freqs; // [B, half]
    let mut parts = vec![args.clone().cos(), args.sin()];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([b, 1], &device));
    }
    Tensor::cat(parts, 1)
}
