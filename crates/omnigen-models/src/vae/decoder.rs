//! diffusers' VAE `Decoder`: latent `[B, latent, h, w]` to image `[B, 3, h·f, w·f]`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnigen_core::{Result, VaeConfig};

use super::blocks::{ResnetBlock2D, UNetMidBlock2D, Upsample2D, NORM_EPS};
use crate::loader::Loader;
use crate::ops::{self, KernelBackend};

/// diffusers' `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then a 2× upsampler on every
/// level but the last.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    /// Zero or one upsampler (a list in diffusers, hence the checkpoint's `upsamplers.0`).
    upsamplers: Vec<Upsample2D<B>>,
}

impl<B: KernelBackend> UpDecoderBlock2D<B> {
    fn load(
        ld: &Loader<B>,
        c_in: usize,
        c_out: usize,
        cfg: &VaeConfig,
        upsample: bool,
    ) -> Result<Self> {
        // the decoder's up blocks have one resnet more than the encoder's down blocks
        let resnets = ResnetBlock2D::load_stack(
            ld,
            cfg.layers_per_block + 1,
            c_in,
            c_out,
            cfg.norm_num_groups,
        )?;
        let upsamplers = if upsample {
            vec![Upsample2D::load(&ld.sub("upsamplers").sub(0), c_out)?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            upsamplers,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // [B, C_in, h, w] -> [B, C_out, h, w] -> [B, C_out, 2h, 2w] if upsampling
        let x = self.resnets.iter().fold(x, |h, r| r.forward(h));
        self.upsamplers.iter().fold(x, |h, u| u.forward(h))
    }
}

/// diffusers' `Decoder` (group norm output, no latent embeddings).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub(super) conv_in: Conv2d<B>,
    mid_block: UNetMidBlock2D<B>,
    up_blocks: Vec<UpDecoderBlock2D<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: KernelBackend> Decoder<B> {
    pub(crate) fn load(ld: &Loader<B>, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let last = ch[ch.len() - 1];
        // Up blocks walk the levels from the deepest (last) back to full resolution.
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let c_in = if i == 0 { reversed[0] } else { reversed[i - 1] };
                UpDecoderBlock2D::load(
                    &ld.sub("up_blocks").sub(i),
                    c_in,
                    c_out,
                    cfg,
                    i + 1 < ch.len(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: ld
                .sub("conv_in")
                .conv2d(cfg.latent_channels, last, 3, 1, 1)?,
            mid_block: UNetMidBlock2D::load(
                &ld.sub("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: ld
                .sub("conv_norm_out")
                .group_norm(groups, ch[0], NORM_EPS)?,
            conv_out: ld
                .sub("conv_out")
                .conv2d(ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub(crate) fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = ops::conv3x3(&self.conv_in, z); // [B, C_last, h, w]
        let h = self.mid_block.forward(h); // [B, C_last, h, w]
        let h = self.up_blocks.iter().fold(h, |h, b| b.forward(h)); // [B, C0, h*f, w*f]
        ops::conv3x3(&self.conv_out, ops::group_norm_silu(&self.conv_norm_out, h))
        // [B, 3, h*f, w*f]
    }
}
