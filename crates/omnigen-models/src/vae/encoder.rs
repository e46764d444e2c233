//! diffusers' VAE `Encoder`: image `[B, 3, H, W]` to posterior moments `[B, 2·latent, H/f, W/f]`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnigen_core::{Result, VaeConfig};

use super::blocks::{Downsample2D, ResnetBlock2D, UNetMidBlock2D, NORM_EPS};
use crate::loader::Loader;
use crate::ops::{self, KernelBackend};

/// diffusers' `DownEncoderBlock2D`: `layers_per_block` resnets, then a 2× downsampler on every
/// level but the last.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    /// Zero or one downsampler (a list in diffusers, hence the checkpoint's `downsamplers.0`).
    downsamplers: Vec<Downsample2D<B>>,
}

impl<B: KernelBackend> DownEncoderBlock2D<B> {
    fn load(
        ld: &Loader<B>,
        c_in: usize,
        c_out: usize,
        cfg: &VaeConfig,
        downsample: bool,
    ) -> Result<Self> {
        let resnets =
            ResnetBlock2D::load_stack(ld, cfg.layers_per_block, c_in, c_out, cfg.norm_num_groups)?;
        let downsamplers = if downsample {
            vec![Downsample2D::load(&ld.sub("downsamplers").sub(0), c_out)?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            downsamplers,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // [B, C_in, H, W] -> [B, C_out, H, W] -> [B, C_out, H/2, W/2] if downsampling
        let x = self.resnets.iter().fold(x, |h, r| r.forward(h));
        self.downsamplers.iter().fold(x, |h, d| d.forward(h))
    }
}

/// diffusers' `Encoder` with `double_z=True` (mean and log-variance stacked on channels).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    conv_in: Conv2d<B>,
    down_blocks: Vec<DownEncoderBlock2D<B>>,
    mid_block: UNetMidBlock2D<B>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: KernelBackend> Encoder<B> {
    pub(crate) fn load(ld: &Loader<B>, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let last = ch[ch.len() - 1];
        let down_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                DownEncoderBlock2D::load(
                    &ld.sub("down_blocks").sub(i),
                    c_in,
                    c_out,
                    cfg,
                    i + 1 < ch.len(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: ld.sub("conv_in").conv2d(cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: UNetMidBlock2D::load(
                &ld.sub("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: ld.sub("conv_norm_out").group_norm(groups, last, NORM_EPS)?,
            conv_out: ld
                .sub("conv_out")
                .conv2d(last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = ops::conv3x3(&self.conv_in, x); // [B, C0, H, W]
        let h = self.down_blocks.iter().fold(h, |h, b| b.forward(h)); // [B, C_last, H/f, W/f]
        let h = self.mid_block.forward(h); // [B, C_last, H/f, W/f]
        ops::conv3x3(&self.conv_out, ops::group_norm_silu(&self.conv_norm_out, h))
        // [B, 2*latent, H/f, W/f]
    }
}
