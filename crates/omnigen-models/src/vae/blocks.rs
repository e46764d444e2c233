//! Building blocks shared by the VAE encoder and decoder: diffusers' `ResnetBlock2D`,
//! single-head spatial `Attention`, `Downsample2D`, `Upsample2D` and `UNetMidBlock2D`.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use burn::tensor::Tensor;
use omnigen_core::{Error, Result};

use crate::loader::Loader;

/// diffusers builds every VAE GroupNorm (resnets, attention, `conv_norm_out`) with this epsilon.
pub(crate) const NORM_EPS: f64 = 1e-6;

/// Input channels from which a 3×3 convolution runs as nine shifted GEMMs on CPU backends.
///
/// burn-flex's convolution builds an im2col copy of every output tile (`9·C_in` floats per
/// output pixel) and scatters the GEMM result back; at 256+ input channels the nine GEMMs
/// `[C_out, C_in] × [C_in, H·(W+2)]` over shifted views of the padded input, accumulated in
/// place, do the same work without that traffic (SDXL decode 256×256: 3.98 -> 3.58 s on a
/// 2-core Zen 5, see docs/performance.md). Below 256 channels (K = C_in too short for an
/// efficient GEMM) burn's convolution is faster.
const SHIFTED_GEMM_MIN_CHANNELS: usize = 256;

/// A 3×3, stride-1, padding-1 convolution (every 3×3 convolution of the VAE resnets and
/// upsamplers), computed either by burn's `conv2d` or as nine shifted GEMMs.
///
/// Shifted GEMMs: with the input zero-padded to `[C_in, (H+3)·(W+2)]` (one extra bottom row
/// so every window fits), output pixel `(y, x)` of the padded-width grid `y·(W+2)+x` reads tap
/// `(dy, dx)` at flat index `y·(W+2)+x + dy·(W+2)+dx`: a contiguous column window. Each tap
/// is one GEMM on a strided view (no copy); the two junk columns per row are dropped at the end.
#[derive(Module, Debug)]
pub struct Conv3x3<B: Backend> {
    /// burn's convolution, when the shifted-GEMM path does not apply.
    conv: Option<Conv2d<B>>,
    /// Tap weights `[9, C_out, C_in]` (tap `3·dy + dx`), for the shifted-GEMM path.
    taps: Option<Param<Tensor<B, 3>>>,
    /// Bias `[C_out]` of the shifted-GEMM path.
    bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Conv3x3<B> {
    pub(crate) fn load(ld: &Loader<B>, c_in: usize, c_out: usize) -> Result<Self> {
        let conv = ld.conv2d(c_in, c_out, 3, 1, 1)?;
        let cpu = is_cpu_backend::<B>(ld.device());
        if !cpu || c_in < SHIFTED_GEMM_MIN_CHANNELS {
            return Ok(Self {
                conv: Some(conv),
                taps: None,
                bias: None,
            });
        }
        let taps = conv
            .weight
            .val()
            .permute([2, 3, 0, 1]) // [3, 3, C_out, C_in]
            .reshape([9, c_out, c_in]);
        Ok(Self {
            conv: None,
            taps: Some(Param::from_tensor(taps)),
            bias: conv.bias,
        })
    }

    /// `[B, C_in, H, W]` -> `[B, C_out, H, W]`.
    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (Some(taps), Some(bias)) = (&self.taps, &self.bias) else {
            let conv = self.conv.as_ref().expect("Conv3x3 has a conv or taps");
            return conv.forward(x);
        };
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        if x.dtype() == burn::tensor::DType::F32 {
            return conv3x3_host(x, taps.val(), bias.val());
        }
        let [b, c_in, h, w] = x.dims();
        let taps = taps.val();
        let c_out = taps.dims()[1];
        let wp = w + 2;
        let n = h * wp;
        // burn's pad order: (left, right, top, bottom).
        let xp = x
            .pad((1, 1, 1, 2), PadMode::Constant(0.0))
            .reshape([b, c_in, (h + 3) * wp]);
        let mut out: Option<Tensor<B, 3>> = None;
        for dy in 0..3 {
            for dx in 0..3 {
                let k = 3 * dy + dx;
                let wk = taps.clone().narrow(0, k, 1); // [1, C_out, C_in]
                let win = xp.clone().narrow(2, dy * wp + dx, n); // [B, C_in, H·(W+2)]
                let r = wk.matmul(win); // [B, C_out, H·(W+2)]
                out = Some(match out {
                    None => r,
                    Some(o) => o + r,
                });
            }
        }
        let out = out.expect("nine taps") + bias.val().reshape([1, c_out, 1]);
        out.reshape([b, c_out, h, wp]).narrow(3, 0, w)
    }
}

/// The shifted-GEMM convolution on host memory (CPU backends, f32): the nine taps accumulate
/// in place into one output buffer (`C = C + W_tap · X_window`, bias as its initial value), so
/// no per-tap temporaries or additions over the output are needed. `taps` `[9, C_out, C_in]`.
#[cfg(any(feature = "flex", feature = "ndarray"))]
fn conv3x3_host<B: Backend>(
    x: Tensor<B, 4>,
    taps: Tensor<B, 3>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 4> {
    use burn::tensor::TensorData;
    let device = x.device();
    let [b, c_in, h, w] = x.dims();
    let c_out = taps.dims()[1];
    let wp = w + 2;
    let l = (h + 3) * wp; // padded plane, one extra bottom row so every window fits
    let n = h * wp; // output on the padded-width grid
    let xp = x.pad((1, 1, 1, 2), PadMode::Constant(0.0)).into_data();
    let taps = taps.into_data();
    let bias = bias.into_data();
    let (Ok(xs), Ok(ts), Ok(bs)) = (
        xp.as_slice::<f32>(),
        taps.as_slice::<f32>(),
        bias.as_slice::<f32>(),
    ) else {
        unreachable!("f32 checked by the caller")
    };
    let mut out = vec![0f32; b * c_out * n];
    for bi in 0..b {
        let dst = &mut out[bi * c_out * n..(bi + 1) * c_out * n];
        for (row, &bv) in dst.chunks_exact_mut(n).zip(bs) {
            row.fill(bv);
        }
        let src = &xs[bi * c_in * l..(bi + 1) * c_in * l];
        for dy in 0..3 {
            for dx in 0..3 {
                let tap = &ts[(3 * dy + dx) * c_out * c_in..(3 * dy + dx + 1) * c_out * c_in];
                let off = dy * wp + dx;
                // The window's last element, (c_in-1)·l + off + n - 1, lies inside `src`.
                debug_assert!((c_in - 1) * l + off + n <= src.len());
                // SAFETY: dst is c_out×n row-major, tap c_out×c_in row-major, and the rhs
                // window c_in×n with row stride l starts at `off`; all within their slices
                // (asserted above), and dst does not alias the inputs.
                unsafe {
                    gemm::gemm(
                        c_out,
                        n,
                        c_in,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        tap.as_ptr(),
                        1,
                        c_in as isize,
                        src.as_ptr().add(off),
                        1,
                        l as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    );
                }
            }
        }
    }
    // Drop the two junk columns of every row: a contiguous result for the ops that follow.
    let mut cropped = vec![0f32; b * c_out * h * w];
    for (dst, src) in cropped.chunks_exact_mut(w).zip(out.chunks_exact(wp)) {
        dst.copy_from_slice(&src[..w]);
    }
    Tensor::<B, 4>::from_data(TensorData::new(cropped, [b, c_out, h, w]), &device)
}

/// Whether `B` computes on the host (burn-flex or burn-ndarray), where the VAE's host kernels
/// apply.
pub(crate) fn is_cpu_backend<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device).to_lowercase();
    name.contains("flex") || name.contains("ndarray")
}

/// `silu(group_norm(x))`, every GroupNorm → SiLU pair of the VAE.
///
/// On CPU backends in f32 it runs fused on host memory, one thread per group: group statistics
/// accumulated in f64, then normalise, affine and SiLU in a single pass (burn's GroupNorm plus
/// SiLU make about seven single-threaded passes over the tensor on burn-flex). Elsewhere it is
/// burn's `GroupNorm` followed by `silu`.
pub(crate) fn group_norm_silu<B: Backend>(gn: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    if x.dtype() == burn::tensor::DType::F32
        && gn.affine
        && gn.gamma.is_some()
        && gn.beta.is_some()
        && is_cpu_backend::<B>(&x.device())
    {
        return group_norm_silu_host(gn, x);
    }
    silu(gn.forward(x))
}

#[cfg(any(feature = "flex", feature = "ndarray"))]
fn group_norm_silu_host<B: Backend>(gn: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    use burn::tensor::TensorData;
    use rayon::prelude::*;
    let device = x.device();
    let [b, c, h, w] = x.dims();
    let (groups, hw) = (gn.num_groups, h * w);
    let cpg = c / groups;
    let (Some(gamma), Some(beta)) = (&gn.gamma, &gn.beta) else {
        unreachable!("checked by the caller")
    };
    let (gamma, beta, x) = (
        gamma.val().into_data(),
        beta.val().into_data(),
        x.into_data(),
    );
    let (Ok(gamma), Ok(beta), Ok(xs)) = (
        gamma.as_slice::<f32>(),
        beta.as_slice::<f32>(),
        x.as_slice::<f32>(),
    ) else {
        unreachable!("f32 checked by the caller")
    };
    let eps = gn.epsilon;
    let mut out = vec![0f32; b * c * hw];
    out.par_chunks_mut(cpg * hw)
        .zip(xs.par_chunks(cpg * hw))
        .enumerate()
        .for_each(|(i, (o, xi))| {
            let g = i % groups;
            let len = xi.len() as f64;
            let mean = xi.iter().map(|&v| f64::from(v)).sum::<f64>() / len;
            let var = xi
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / len;
            let inv = 1.0 / (var + eps).sqrt();
            for (ch, (oc, xc)) in o.chunks_exact_mut(hw).zip(xi.chunks_exact(hw)).enumerate() {
                let cidx = g * cpg + ch;
                let a = (f64::from(gamma[cidx]) * inv) as f32;
                let s = (f64::from(beta[cidx]) - mean * f64::from(gamma[cidx]) * inv) as f32;
                for (y, &v) in oc.iter_mut().zip(xc) {
                    let t = v * a + s;
                    *y = t / (1.0 + (-t).exp());
                }
            }
        });
    Tensor::<B, 4>::from_data(TensorData::new(out, [b, c, h, w]), &device)
}

/// diffusers' `ResnetBlock2D` without time embedding (`temb_channels=None`), as the VAE uses it.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv3x3<B>,
    norm2: GroupNorm<B>,
    conv2: Conv3x3<B>,
    /// 1×1 projection of the residual, present only when the channel count changes.
    conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// The `resnets.{0..n}` of a down or up block: the first maps `c_in` to `c_out`, the rest
    /// keep `c_out`.
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
            conv1: Conv3x3::load(&ld.sub("conv1"), c_in, c_out)?,
            norm2: ld.sub("norm2").group_norm(groups, c_out, NORM_EPS)?,
            conv2: Conv3x3::load(&ld.sub("conv2"), c_out, c_out)?,
            conv_shortcut,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // x: [B, C_in, H, W]
        let h = self.conv1.forward(group_norm_silu(&self.norm1, x.clone())); // [B, C_out, H, W]
        let h = self.conv2.forward(group_norm_silu(&self.norm2, h)); // [B, C_out, H, W]
        let residual = match &self.conv_shortcut {
            Some(conv) => conv.forward(x), // [B, C_out, H, W]
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
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    /// `to_out.0` in the checkpoint (`to_out.1` is a parameterless dropout).
    to_out: Linear<B>,
}

impl<B: Backend> Attention<B> {
    pub(crate) fn load(ld: &Loader<B>, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 name the projections `query`/`key`/`value`/
        // `proj_attn`; diffusers renames them on load, so accept both.
        let linear = |new: &str, old: &str| match ld.sub(new).linear(channels, channels, true) {
            Err(Error::MissingTensor { .. }) => ld.sub(old).linear(channels, channels, true),
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
        let q = self.to_q.forward(tokens.clone()).unsqueeze_dim::<4>(1); // [B, 1, H*W, C]
        let k = self.to_k.forward(tokens.clone()).unsqueeze_dim::<4>(1); // [B, 1, H*W, C]
        let v = self.to_v.forward(tokens).unsqueeze_dim::<4>(1); // [B, 1, H*W, C]
                                                                 // Default scale is 1/sqrt(head_dim) with head_dim = C, as in diffusers.
        let out = attention(q, k, v, None, None, AttentionModuleOptions::default()); // [B, 1, H*W, C]
        let out = self.to_out.forward(out.squeeze_dim::<3>(1)); // [B, H*W, C]
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

impl<B: Backend> Downsample2D<B> {
    pub(crate) fn load(ld: &Loader<B>, channels: usize) -> Result<Self> {
        let mut conv = ld.sub("conv").conv2d(channels, channels, 3, 2, 0)?;
        // diffusers pads (left 0, right 1, top 0, bottom 1); burn's order is (top, left, bottom, right).
        conv.padding = PaddingConfig2d::Explicit(0, 0, 1, 1);
        Ok(Self { conv })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // [B, C, H, W] -> [B, C, H/2, W/2]
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour 2× then a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    conv: Conv3x3<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub(crate) fn load(ld: &Loader<B>, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv3x3::load(&ld.sub("conv"), channels, channels)?,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        // Nearest 2× by broadcasting each pixel to a 2×2 block: exact, no interpolation arithmetic.
        let up = x
            .reshape([b, c, h, 1, w, 1])
            .expand([b, c, h, 2, w, 2])
            .reshape([b, c, 2 * h, 2 * w]); // [B, C, 2H, 2W]
        self.conv.forward(up) // [B, C, 2H, 2W]
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, (attention, resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D<B: Backend> {
    /// One attention per resnet after the first; empty when `mid_block_add_attention` is false.
    attentions: Vec<Attention<B>>,
    resnets: Vec<ResnetBlock2D<B>>,
}

impl<B: Backend> UNetMidBlock2D<B> {
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
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::load(&ld.sub("resnets").sub(i), channels, channels, groups))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            attentions,
            resnets,
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

#[cfg(all(test, any(feature = "flex", feature = "ndarray")))]
mod tests {
    use super::*;
    use crate::loader::RandomWeights;
    use crate::{default_device, DefaultBackend};
    use burn::tensor::{DType, Distribution};

    /// The shifted-GEMM path equals burn's convolution (the parity fixtures' VAEs are too
    /// narrow to reach it).
    #[test]
    fn shifted_gemm_conv_matches_conv2d() {
        let device = default_device();
        let reader = RandomWeights { seed: 3 };
        let ld = Loader::<DefaultBackend>::new(&reader, &device, DType::F32);
        let (c_in, c_out) = (SHIFTED_GEMM_MIN_CHANNELS, 40);
        let fast = Conv3x3::load(&ld, c_in, c_out).unwrap();
        assert!(
            fast.taps.is_some(),
            "shifted path expected on a CPU backend"
        );
        let reference = ld.conv2d(c_in, c_out, 3, 1, 1).unwrap();
        for (b, h, w) in [(1, 5, 7), (2, 8, 3)] {
            let x = Tensor::<DefaultBackend, 4>::random(
                [b, c_in, h, w],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let got = fast.forward(x.clone());
            let want = reference.forward(x);
            assert_eq!(got.dims(), want.dims());
            let diff: f32 = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-4, "max diff {diff}");
        }
    }
}
