//! Winograd F(m×m, 3×3) convolution on the host (f32, NCHW), for the VAE's stride-1, padding-1
//! 3×3 convolutions.
//!
//! A direct 3×3 convolution costs `9` multiply-adds per input channel and output pixel; Winograd
//! computes an `m×m` output tile from an `(m+2)×(m+2)` input tile with `(m+2)²` products per
//! channel pair instead of `9m²`: F(2×2, 3×3) does 16 for 36 (2.25× fewer), F(4×4, 3×3) 36
//! for 144 (4×). With the tiles of a block transformed (`V = Bᵀ d B`), the products over
//! input channels are `(m+2)²` GEMMs `[C_out, C_in] × [C_in, tiles]`, one per tile position
//! `ξ`, against the transformed weight `U = G g Gᵀ`; the output transform `Aᵀ M A` (plus bias)
//! gives the tiles back.
//!
//! The price is rounding: the transforms add and scale values of both signs, so the result is
//! less accurate than a direct convolution's, by a factor that grows with `m` (the transform
//! coefficients of F(4×4) reach 8, F(2×2)'s are ±1 and ½). Measured against the portable
//! direct convolution (burn's `conv2d`), 512 → 512 channels at 64×64, unit-variance input and
//! weights at the VAE checkpoint's scale (uniform, std ≈ `1/sqrt(9·C_in)`), outputs of std
//! ≈ 1: F(2×2) max abs error 2.1e-6 (relative to the output's max: 4.7e-7), F(4×4) 5.4e-6
//! (1.2e-6), the direct f32 GEMM convolution of `host.rs` 1.9e-6; see
//! `winograd_error_at_the_vae_scale` in `ops/tests.rs` and docs/performance.md.
//!
//! Memory: the transformed weight (`(m+2)²/9` times the weight) is built per call, which is
//! cheap next to the convolution at the VAE's sizes and keeps module records in the
//! checkpoint's layout; the transformed tiles are held one block of tile rows at a time per
//! thread, so the working set does not grow with the image.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::host::f32_data;

/// The transform matrices of F(`M`×`M`, 3×3); `A = M + 2` is the input tile's side.
pub(super) struct Winograd<const M: usize, const A: usize> {
    /// Input transform `Bᵀ`, `[A, A]`.
    bt: [[f32; A]; A],
    /// Weight transform `G`, `[A, 3]`.
    g: [[f32; 3]; A],
    /// Output transform `Aᵀ`, `[M, A]`.
    at: [[f32; A]; M],
}

/// F(2×2, 3×3) (Lavin & Gray, interpolation points 0, ±1).
pub(super) const F2: Winograd<2, 4> = Winograd {
    bt: [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    g: [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    at: [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
};

/// F(4×4, 3×3) (Lavin & Gray, interpolation points 0, ±1, ±2).
pub(super) const F4: Winograd<4, 6> = Winograd {
    bt: [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
    g: [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ],
    at: [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ],
};

/// Input channels from which [`conv3x3`](super::conv3x3) runs as Winograd.
pub(super) const MIN_CHANNELS: usize = 64;

/// Tiles per GEMM block: enough columns for the GEMM to run near its peak, few enough that a
/// block's transformed tiles (`(m+2)²·(C_in + C_out)` floats per tile) stay tens of MB.
const TARGET_TILES: usize = 256;

/// `dst += c · src`, skipping the transforms' zero coefficients (the loops vectorise; `0·x`
/// cannot be folded away by the compiler since `x` may be infinite).
#[inline(always)]
fn axpy(dst: &mut [f32], c: f32, src: &[f32]) {
    if c == 0.0 {
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += c * s;
    }
}

/// The output, which the blocks write disjoint rows of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every block writes only the output rows of its own tile rows (see `conv3x3`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// `len` floats from `start`.
    ///
    /// # Safety
    /// The range lies inside the output, which outlives the borrow, and no other thread
    /// touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// The transformed weight `U = G g Gᵀ` of `weight` `[C_out, C_in, 3, 3]`, laid out
/// `[C_out, A², C_in]` (so that the GEMM of position `ξ` reads rows with stride `A²·C_in`).
fn transform_weight<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    weight: &[f32],
    c_out: usize,
    c_in: usize,
) -> Vec<f32> {
    let mut u = vec![0f32; c_out * A * A * c_in];
    u.par_chunks_mut(A * A * c_in)
        .zip(weight.par_chunks(9 * c_in))
        .for_each(|(u, w)| {
            // The nine taps as rows over the input channels, then `G g` row by row and
            // `(G g) Gᵀ` column by column, each an axpy over the channels.
            let mut taps = vec![0f32; 9 * c_in];
            for (ci, k) in w.chunks_exact(9).enumerate() {
                for (t, &v) in k.iter().enumerate() {
                    taps[t * c_in + ci] = v;
                }
            }
            let mut gg = vec![0f32; A * 3 * c_in]; // [A][3][C_in]
            for i in 0..A {
                for b in 0..3 {
                    let dst = &mut gg[(i * 3 + b) * c_in..(i * 3 + b + 1) * c_in];
                    for a in 0..3 {
                        axpy(dst, tf.g[i][a], &taps[(a * 3 + b) * c_in..(a * 3 + b + 1) * c_in]);
                    }
                }
            }
            for i in 0..A {
                for j in 0..A {
                    let dst = &mut u[(i * A + j) * c_in..(i * A + j + 1) * c_in];
                    for b in 0..3 {
                        axpy(dst, tf.g[j][b], &gg[(i * 3 + b) * c_in..(i * 3 + b + 1) * c_in]);
                    }
                }
            }
        });
    u
}

/// Per-thread buffers of one block.
#[derive(Default)]
struct Workspace {
    /// Transformed input tiles, `[A², C_in, tiles]`.
    v: Vec<f32>,
    /// GEMM results, `[A², C_out, tiles]`.
    m: Vec<f32>,
    /// `A` zero-padded input rows, then their vertical transform (`A` rows), each `M·tw + 2`.
    rows: Vec<f32>,
    /// Row scratch: `A` phases of `tw` (input), `A·M` rows of `tw` (output), an output row.
    scratch: Vec<f32>,
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// A 3×3, stride-1, padding-1 convolution of `x` `[B, C_in, H, W]` (row-major) by `weight`
/// `[C_out, C_in, 3, 3]` plus `bias` `[C_out]` with F(`M`×`M`, 3×3): `[B, C_out, H, W]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    x: &[f32],
    [b, c_in, h, w]: [usize; 4],
    weight: &[f32],
    bias: &[f32],
    c_out: usize,
) -> Vec<f32> {
    debug_assert_eq!(A, M + 2);
    debug_assert_eq!(x.len(), b * c_in * h * w);
    debug_assert_eq!(weight.len(), c_out * c_in * 9);
    debug_assert_eq!(bias.len(), c_out);
    let u = transform_weight(tf, weight, c_out, c_in);
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let tile_rows = b * th;
    // Whole tile rows per block (each block then owns whole output rows), at least one block
    // per thread where the image has the rows.
    let threads = rayon::current_num_threads();
    let rows_per_block = TARGET_TILES
        .div_ceil(tw)
        .min(tile_rows.div_ceil(threads))
        .max(1);
    let blocks = tile_rows.div_ceil(rows_per_block);
    let mut out = vec![0f32; b * c_out * h * w];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let out_len = out.len();
    let out_ptr = &out_ptr;
    let lw = M * tw + 2; // padded row width covering every tile

    (0..blocks).into_par_iter().for_each_init(Workspace::default, |ws, blk| {
        let r0 = blk * rows_per_block;
        let r1 = (r0 + rows_per_block).min(tile_rows);
        let nb = (r1 - r0) * tw;
        resize(&mut ws.v, A * A * c_in * nb);
        resize(&mut ws.m, A * A * c_out * nb);
        resize(&mut ws.rows, 2 * A * lw);
        resize(&mut ws.scratch, A.max(A * M + 2 * M) * tw);

        // Input transform, `V[ξ][c][tile] = (Bᵀ d B)[ξ]`: the vertical pass `Bᵀ d` over whole
        // padded rows, then the horizontal pass over the tiles of the row, each position of
        // the tile (`phase`) gathered into a contiguous run first.
        for c in 0..c_in {
            for r in r0..r1 {
                let (bi, ty) = (r / th, r % th);
                let plane = &x[(bi * c_in + c) * h * w..(bi * c_in + c + 1) * h * w];
                let (pad, vert) = ws.rows.split_at_mut(A * lw);
                pad.fill(0.0);
                for k in 0..A {
                    let y = (ty * M + k) as isize - 1;
                    if (0..h as isize).contains(&y) {
                        let y = y as usize;
                        pad[k * lw + 1..k * lw + 1 + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                    }
                }
                vert.fill(0.0);
                for i in 0..A {
                    let dst = &mut vert[i * lw..(i + 1) * lw];
                    for k in 0..A {
                        axpy(dst, tf.bt[i][k], &pad[k * lw..(k + 1) * lw]);
                    }
                }
                let phases = &mut ws.scratch[..A * tw];
                let loc = (r - r0) * tw;
                for i in 0..A {
                    let row = &vert[i * lw..(i + 1) * lw];
                    for k in 0..A {
                        for (tx, p) in phases[k * tw..(k + 1) * tw].iter_mut().enumerate() {
                            *p = row[tx * M + k];
                        }
                    }
                    for j in 0..A {
                        let at = ((i * A + j) * c_in + c) * nb + loc;
                        let dst = &mut ws.v[at..at + tw];
                        for k in 0..A {
                            axpy(dst, tf.bt[j][k], &phases[k * tw..(k + 1) * tw]);
                        }
                    }
                }
            }
        }

        for xi in 0..A * A {
            let dst = &mut ws.m[xi * c_out * nb..(xi + 1) * c_out * nb];
            let rhs = &ws.v[xi * c_in * nb..(xi + 1) * c_in * nb];
            // SAFETY: dst is c_out×nb row-major; the lhs is c_out×c_in from element xi·c_in of
            // `u` ([C_out, A², C_in]) with row stride A²·c_in, its last element
            // (c_out-1)·A²·c_in + xi·c_in + c_in - 1 inside `u`; the rhs is c_in×nb
            // row-major; the three do not alias.
            unsafe {
                gemm::gemm(
                    c_out,
                    nb,
                    c_in,
                    dst.as_mut_ptr(),
                    1,
                    nb as isize,
                    false,
                    u.as_ptr().add(xi * c_in),
                    1,
                    (A * A * c_in) as isize,
                    rhs.as_ptr(),
                    1,
                    nb as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }

        // Output transform, `Aᵀ M A` + bias: the horizontal pass per tile row of `M` over
        // contiguous tile runs, the vertical pass, then the tile positions interleaved into
        // an output row.
        let (horiz, rest) = ws.scratch.split_at_mut(A * M * tw);
        let (vout, line) = rest.split_at_mut(M * tw);
        for co in 0..c_out {
            for r in r0..r1 {
                let (bi, ty) = (r / th, r % th);
                let loc = (r - r0) * tw;
                horiz.fill(0.0);
                for i in 0..A {
                    for jo in 0..M {
                        let dst = &mut horiz[(i * M + jo) * tw..(i * M + jo + 1) * tw];
                        for j in 0..A {
                            let at = ((i * A + j) * c_out + co) * nb + loc;
                            axpy(dst, tf.at[jo][j], &ws.m[at..at + tw]);
                        }
                    }
                }
                for io in 0..M {
                    let y = ty * M + io;
                    if y >= h {
                        break;
                    }
                    for jo in 0..M {
                        let dst = &mut vout[jo * tw..(jo + 1) * tw];
                        dst.fill(bias[co]);
                        for i in 0..A {
                            axpy(dst, tf.at[io][i], &horiz[(i * M + jo) * tw..(i * M + jo + 1) * tw]);
                        }
                    }
                    for (tx, px) in line[..M * tw].chunks_exact_mut(M).enumerate() {
                        for (jo, p) in px.iter_mut().enumerate() {
                            *p = vout[jo * tw + tx];
                        }
                    }
                    let start = ((bi * c_out + co) * h + y) * w;
                    debug_assert!(start + w <= out_len);
                    // SAFETY: row `y` of plane (bi, co) lies in output tile row `ty` of image
                    // `bi`, i.e. tile row `r`, which only this block handles; it is inside
                    // `out` (above), which outlives the parallel loop.
                    let row = unsafe { out_ptr.slice(start, w) };
                    row.copy_from_slice(&line[..w]);
                }
            }
        }
    });
    out
}

/// [`conv3x3`] on tensors: `x` `[B, C_in, H, W]`, `weight` `[C_out, C_in, 3, 3]`, `bias`
/// `[C_out]` (f32, host memory) -> `[B, C_out, H, W]`.
pub(super) fn conv3x3_tensor<B: Backend, const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let device = x.device();
    let dims = x.dims();
    let c_out = weight.dims()[0];
    assert_eq!(weight.dims(), [c_out, dims[1], 3, 3], "conv3x3: weight shape");
    let y = conv3x3(
        tf,
        &f32_data(x),
        dims,
        &f32_data(weight),
        &f32_data(bias),
        c_out,
    );
    Tensor::from_data(TensorData::new(y, [dims[0], c_out, dims[2], dims[3]]), &device)
}
