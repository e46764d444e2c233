//! Tiled encoding and decoding with linear overlap blending, as diffusers' `AutoencoderKL`
//! (`_tiled_encode`, `tiled_decode`, `blend_v`, `blend_h`) does it.
//!
//! Tiles start every `stride` input pixels (or latents) and overlap their neighbours; each
//! processed tile is blended into the already-blended tile above and to its left over
//! `blend` output rows/columns, then cropped to `crop` and concatenated. Only one row of
//! processed tiles is kept alive, so activations are bounded by the tile size, not the image.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use omnigen_core::{Error, Result};

/// Tiling of the VAE for large images.
///
/// `tile_sample_size` is the tile side in pixels (the latent tile side is that divided by the
/// VAE's downsample factor); neighbouring tiles overlap by `overlap_factor` of a tile. diffusers
/// uses the config's `sample_size` (1024 for SDXL) and 0.25.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TilingConfig {
    /// Tile side in pixels; a multiple of the downsample factor.
    pub tile_sample_size: usize,
    /// Fraction of a tile shared with each neighbour, in `[0, 1)`.
    pub overlap_factor: f64,
}

impl Default for TilingConfig {
    /// 512-pixel tiles (64 latents) with diffusers' 25 % overlap: a quarter of the activation
    /// memory of diffusers' SDXL default of 1024.
    fn default() -> Self {
        Self {
            tile_sample_size: 512,
            overlap_factor: 0.25,
        }
    }
}

/// The integer geometry of one direction (encode or decode), computed as diffusers does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TilePlan {
    /// Input tile side.
    pub tile: usize,
    /// Input distance between tile origins.
    pub stride: usize,
    /// Output rows/columns blended with the previous tile.
    pub blend: usize,
    /// Output rows/columns kept per tile.
    pub crop: usize,
}

impl TilingConfig {
    /// `(encode, decode)` plans for a VAE with spatial factor `factor`, or an error if the
    /// tiles would not line up (output stride ≠ kept size).
    pub(crate) fn plans(&self, factor: usize) -> Result<(TilePlan, TilePlan)> {
        let bad = |reason: String| Err(Error::invalid_argument("tiling", reason));
        let t = self.tile_sample_size;
        let f = self.overlap_factor;
        if !(0.0..1.0).contains(&f) {
            return bad(format!("overlap_factor {f} is not in [0, 1)"));
        }
        if t == 0 || !t.is_multiple_of(factor) {
            return bad(format!(
                "tile_sample_size {t} is not a positive multiple of the downsample factor {factor}"
            ));
        }
        let tl = t / factor;
        // Python's int() truncation, as in diffusers.
        let encode = TilePlan {
            tile: t,
            stride: (t as f64 * (1.0 - f)) as usize,
            blend: (tl as f64 * f) as usize,
            crop: tl - (tl as f64 * f) as usize,
        };
        let decode = TilePlan {
            tile: tl,
            stride: (tl as f64 * (1.0 - f)) as usize,
            blend: (t as f64 * f) as usize,
            crop: t - (t as f64 * f) as usize,
        };
        if encode.stride == 0 || decode.stride == 0 {
            return bad(format!(
                "tile_sample_size {t} is too small for overlap_factor {f}"
            ));
        }
        if encode.stride != encode.crop * factor || decode.stride * factor != decode.crop {
            return bad(format!(
                "tiles do not line up: the latent overlap (tile_sample_size {t} / {factor} × overlap_factor {f}) \
                 must be a whole number (e.g. 512 and 0.25)"
            ));
        }
        Ok((encode, decode))
    }
}

/// Runs `f` over overlapping tiles of `x` ([B, C, H, W]) and stitches the outputs.
pub(crate) fn tiled<B: Backend>(
    x: Tensor<B, 4>,
    plan: TilePlan,
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    let mut prev_row: Vec<Tensor<B, 4>> = Vec::new();
    let mut out_rows: Vec<Tensor<B, 4>> = Vec::new();
    for i in (0..h).step_by(plan.stride) {
        let mut row: Vec<Tensor<B, 4>> = Vec::new();
        let mut pieces: Vec<Tensor<B, 4>> = Vec::new();
        for j in (0..w).step_by(plan.stride) {
            let tile =
                x.clone()
                    .narrow(2, i, plan.tile.min(h - i))
                    .narrow(3, j, plan.tile.min(w - j));
            let mut t = f(tile); // [B, C', th', tw']
                                 // Blend into the already-blended neighbours (diffusers blends in place).
            if let Some(above) = prev_row.get(j / plan.stride) {
                t = blend(above, t, plan.blend, 2);
            }
            if let Some(left) = row.last() {
                t = blend(left, t, plan.blend, 3);
            }
            let [_, _, th, tw] = t.dims();
            pieces.push(
                t.clone()
                    .narrow(2, 0, plan.crop.min(th))
                    .narrow(3, 0, plan.crop.min(tw)),
            );
            row.push(t);
        }
        out_rows.push(Tensor::cat(pieces, 3)); // [B, C', crop, W']
        prev_row = row;
    }
    Tensor::cat(out_rows, 2) // [B, C', H', W']
}

/// Linear cross-fade of the last `extent` entries of `a` into the first `extent` of `b` along
/// `dim` (2: vertical, diffusers' `blend_v`; 3: horizontal, `blend_h`).
fn blend<B: Backend>(a: &Tensor<B, 4>, b: Tensor<B, 4>, extent: usize, dim: usize) -> Tensor<B, 4> {
    let n_a = a.dims()[dim];
    let n_b = b.dims()[dim];
    let extent = extent.min(n_a).min(n_b);
    if extent == 0 {
        return b;
    }
    let weights = |g: fn(f64) -> f64| {
        let values: Vec<f32> = (0..extent)
            .map(|y| g(y as f64 / extent as f64) as f32)
            .collect();
        let mut shape = [1usize; 4];
        shape[dim] = extent;
        Tensor::<B, 4>::from_data(
            TensorData::new(values, shape).convert_dtype(b.dtype()),
            &b.device(),
        )
    };
    let w_b = weights(|r| r); // [1, 1, extent, 1] or [1, 1, 1, extent]
    let w_a = weights(|r| 1.0 - r);
    let a_tail = a.clone().narrow(dim, n_a - extent, extent);
    let head = a_tail * w_a + b.clone().narrow(dim, 0, extent) * w_b;
    if extent == n_b {
        head
    } else {
        Tensor::cat(vec![head, b.narrow(dim, extent, n_b - extent)], dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DefaultBackend as B;

    fn ramp(shape: [usize; 4]) -> Tensor<B, 4> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// With an identity "model", overlapping tiles carry identical content, so blending and
    /// stitching must give the input back exactly: checks the geometry, including partial
    /// edge tiles and tiles that lie entirely inside their neighbour's overlap.
    #[test]
    fn identity_tiles_reassemble_the_input() {
        for (h, w) in [(16, 16), (17, 23), (6, 30), (8, 7)] {
            let x = ramp([2, 3, h, w]);
            let plan = TilePlan {
                tile: 8,
                stride: 6,
                blend: 2,
                crop: 6,
            };
            let y = tiled(x.clone(), plan, |t| t);
            assert_eq!(y.dims(), x.dims());
            let diff: f32 = (y - x).abs().max().into_scalar();
            assert!(diff < 1e-6, "{h}x{w}: {diff}");
        }
    }

    #[test]
    fn plans_match_diffusers_geometry() {
        // diffusers' SDXL defaults: sample 1024, latent 128, overlap 0.25.
        let cfg = TilingConfig {
            tile_sample_size: 1024,
            overlap_factor: 0.25,
        };
        let (enc, dec) = cfg.plans(8).expect("plans");
        assert_eq!(
            enc,
            TilePlan {
                tile: 1024,
                stride: 768,
                blend: 32,
                crop: 96
            }
        );
        assert_eq!(
            dec,
            TilePlan {
                tile: 128,
                stride: 96,
                blend: 256,
                crop: 768
            }
        );
        assert!(TilingConfig {
            tile_sample_size: 36,
            overlap_factor: 0.25
        }
        .plans(8)
        .is_err());
        assert!(TilingConfig {
            tile_sample_size: 40,
            overlap_factor: 0.25
        }
        .plans(8)
        .is_err());
        assert!(TilingConfig {
            tile_sample_size: 512,
            overlap_factor: 1.0
        }
        .plans(8)
        .is_err());
    }
}
