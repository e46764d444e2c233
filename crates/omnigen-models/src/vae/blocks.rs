//! Building blocks shared by the VAE encoder and decoder: diffusers' `ResnetBlock2D`,
//! single-head spatial `Attention`, `Downsample2D`, `Upsample2D` and `UNetMidBlock2D`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnigen_core::{Error, Result};

use crate::loader::Loader;
use crate::ops::{self, KernelBackend, LinearLayer};

/// diffusers builds every VAE GroupNorm (resnets, attention, `conv_norm_out`) with this epsilon.
pub(crate) const NORM_EPS: f64 = 1e-6;

/// diffusers' `ResnetBlock2D` without time embedding (`temb_channels=None`), as the VAE uses it.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    /// 1×1 projection of the residual, present only when the channel count changes.
    conv_shortcut: Option<Conv2d<B>>,
}

impl<B: KernelBackend> ResnetBlock2D<B> {
    /// The `resnets.{0..n}` of a down, up or mid block: the first maps `c_in` to `c_out`, the
    /// rest keep `c_out`.
    pub(crate) fn load_stack(
        ld: &Loader<B>,
        n: usize,
        c_in: usize,
        c_out: usize,
        groups: usize,
    ) -> Result<Vec<Self>> {
        (0..n)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                Self::load(&ld.sub("resnets").sub(i), c, c_out, groups)
            })
            .collect()
    }

    pub(crate) fn load(ld: &Loader<B>, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(ld.sub("conv_shortcut").conv2d(c_in, c_out, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: ld.sub("norm1").group_norm(groups, c_in, NORM_EPS)?,
            conv1: ld.sub("conv1").conv2d(c_in, c_out, 3, 1, 1)?,
            norm2: ld.sub("norm2").group_norm(groups, c_out, NORM_EPS)?,
            conv2: ld.sub("conv2").conv2d(c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // x: [B, C_in, H, W]
        let h = ops::conv3x3(&self.conv1, ops::group_norm_silu(&self.norm1, x.clone())); // [B, C_out, H, W]
        let h = ops::conv3x3(&self.conv2, ops::group_norm_silu(&self.norm2, h)); // [B, C_out, H, W]
        let residual = match &self.conv_shortcut {
            Some(conv) => ops::conv1x1(conv, x), // [B, C_out, H, W]
            None => x,
        };
        // output_scale_factor is 1 in the VAE, so no division.
        residual + h
    }
}

/// diffusers' `Attention` as built for VAE mid blocks: one head spanning all channels, over the
/// `H·W` spatial tokens, with a GroupNorm in front and a residual connection.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    group_norm: GroupNorm<B>,
    to_q: LinearLayer<B>,
    to_k: LinearLayer<B>,
    to_v: LinearLayer<B>,
    /// `to_out.0` in the checkpoint (`to_out.1` is a parameterless dropout).
    to_out: LinearLayer<B>,
}

impl<B: KernelBackend> Attention<B> {
    pub(crate) fn load(ld: &Loader<B>, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 name the projections `query`/`key`/`value`/
        // `proj_attn`; diffusers renames them on load, so accept both.
        let linear = |new: &str, old: &str| match ld.sub(new).linear_layer(channels, channels, true)
        {
            Err(Error::MissingTensor { .. }) => ld.sub(old).linear_layer(channels, channels, true),
            other => other,
        };
        Ok(Self {
            group_norm: ld
                .sub("group_norm")
                .group_norm(groups, channels, NORM_EPS)?,
            to_q: linear("to_q", "query")?,
            to_k: linear("to_k", "key")?,
            to_v: linear("to_v", "value")?,
            to_out: linear("to_out.0", "proj_attn")?,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .group_norm
            .forward(x.clone()) // [B, C, H, W]
            .reshape([b, c, h * w])
            .swap_dims(1, 2); // [B, H*W, C]
        let q = ops::linear(&self.to_q, tokens.clone()).unsqueeze_dim::<4>(1); // [B, 1, H*W, C]
        let k = ops::linear(&self.to_k, tokens.clone()).unsqueeze_dim::<4>(1); // [B, 1, H*W, C]
        let v = ops::linear(&self.to_v, tokens).unsqueeze_dim::<4>(1); // [B, 1, H*W, C]
                                                                       // One head of C channels: the scale is 1/sqrt(C), as in diffusers.
        let out = ops::full_attention(q, k, v); // [B, H*W, C]
        let out = ops::linear(&self.to_out, out); // [B, H*W, C]
        let out = out.swap_dims(1, 2).reshape([b, c, h, w]); // [B, C, H, W]
        out + x
    }
}

/// diffusers' `Downsample2D` with a convolution: zero-pad one row/column at the bottom/right,
/// then a stride-2 3×3 convolution without padding (halves even sides exactly).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: KernelBackend> Downsample2D<B> {
    pub(crate) fn load(ld: &Loader<B>, channels: usize) -> Result<Self> {
        let mut conv = ld.sub("conv").conv2d(channels, channels, 3, 2, 0)?;
        // diffusers pads (left 0, right 1, top 0, bottom 1); burn's order is (top, left, bottom, right).
        conv.padding = PaddingConfig2d::Explicit(0, 0, 1, 1);
        Ok(Self { conv })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        ops::downsample_conv3x3(&self.conv, x) // [B, C, H/2, W/2]
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour 2× then a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: KernelBackend> Upsample2D<B> {
    pub(crate) fn load(ld: &Loader<B>, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: ld.sub("conv").conv2d(channels, channels, 3, 1, 1)?,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        ops::upsample2x_conv3x3(&self.conv, x) // [B, C, 2H, 2W]
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, (attention, resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D<B: Backend> {
    /// One attention per resnet after the first; empty when `mid_block_add_attention` is false.
    attentions: Vec<Attention<B>>,
    resnets: Vec<ResnetBlock2D<B>>,
}

impl<B: KernelBackend> UNetMidBlock2D<B> {
    pub(crate) fn load(
        ld: &Loader<B>,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let attentions = if add_attention {
            vec![Attention::load(
                &ld.sub("attentions").sub(0),
                channels,
                groups,
            )?]
        } else {
            Vec::new()
        };
        Ok(Self {
            attentions,
            resnets: ResnetBlock2D::load_stack(ld, 2, channels, channels, groups)?,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // x: [B, C, H, W], shape preserved throughout
        let mut h = self.resnets[0].forward(x);
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            if let Some(attn) = self.attentions.get(i - 1) {
                h = attn.forward(h);
            }
            h = resnet.forward(h);
        }
        h
    }
}
