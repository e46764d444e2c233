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
//! coefficients of F(4×4) reach 8 and its weight transform's 1/24, F(2×2)'s are ±1 and ½).
//! Measured against burn's direct `conv2d` (f32), 512 → 512 channels at 64×64, input uniform
//! in ±1.7 (std ≈ 1), weights uniform in `±1/sqrt(9·C_in)` (the scale of [`RandomWeights`],
//! PyTorch's default initialisation), outputs of std 0.58 and max |y| ≈ 2.9: F(2×2) max abs
//! difference 3.2e-6 (1.1e-6 of max |y|), F(4×4) 6.1e-5 (2.1e-5), the nine shifted GEMMs of
//! `host.rs` 4.8e-7 (1.7e-7). A whole decode of the SDXL-architecture VAE to 256² (random
//! weights at that scale) differs from one with `conv2d` everywhere by 6.0e-5 at most
//! (1.8e-5 of max |y|; a 255-level image moves by < 0.01 level). See
//! `winograd_error_at_the_vae_scale` and `winograd_vae_decode_matches_direct_convolutions` in
//! `ops/tests.rs`, and docs/performance.md.
//!
//! [`RandomWeights`]: crate::weights::RandomWeights
//!
//! Memory: the transformed weight (`(m+2)²/9` times the weight) is built per call, which is
//! cheap next to the convolution at the VAE's sizes and keeps module records in the
//! checkpoint's layout; its buffer stays with the calling thread between calls. The
//! transformed tiles and GEMM results are held one block of tile rows (at most
//! `TARGET_TILES` tiles) at a time per thread, so the working set does not grow with the
//! image.

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::host::{cast_or_copy, f32_view, gemm_f32, with_float_bytes, Store, Strided};
use super::KernelBackend;

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

/// F(4×4) tiles (over the batch) from which [`conv3x3`](super::conv3x3) runs as F(4×4)
/// rather than F(2×2): a 24×24 image, where the two were measured equal.
pub(super) const F4_MIN_TILES: usize = 36;

/// Tiles per GEMM block: enough columns for the GEMM to run near its peak, few enough that a
/// block's transformed tiles (`(m+2)²·(C_in + C_out)` floats per tile) stay tens of MB.
const TARGET_TILES: usize = 256;

/// `dst[t] = init + Σ_k c[k] · src[k][t]`, in one pass over `dst` (the loop vectorises; a
/// zero coefficient costs a multiply-add like the others, which is cheaper than a pass over
/// `dst` per nonzero term).
#[inline(always)]
fn combine<const N: usize>(dst: &mut [f32], init: f32, c: &[f32; N], src: [&[f32]; N]) {
    let n = dst.len();
    let src = src.map(|s| &s[..n]);
    for (t, d) in dst.iter_mut().enumerate() {
        let mut acc = init;
        for k in 0..N {
            acc += c[k] * src[k][t];
        }
        *d = acc;
    }
}

/// The output, which the blocks write disjoint rows of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every block writes only the output rows of its own tile rows (see `conv3x3`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `values` at `start..start + values.len()` of the output (whose memory may not
    /// be initialised yet: it is only written, never read).
    ///
    /// # Safety
    /// The range lies inside the output's allocation, which outlives the call, and no other
    /// thread touches it meanwhile.
    unsafe fn write(&self, start: usize, values: &[f32]) {
        // SAFETY: as the caller promises; `values` is a live slice, not part of the output.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(start), values.len());
        }
    }
}

thread_local! {
    /// A pool thread's block buffers, kept from one block and one convolution to the next:
    /// `rayon`'s `for_each_init` would make them afresh for every split of the loop, and
    /// growing them zeroes them (5 % of a 512² decode was that `memset`).
    static BLOCK_WORKSPACE: std::cell::RefCell<Workspace> =
        std::cell::RefCell::new(Workspace::default());
    /// The transformed weight's buffer, kept by the calling thread from one convolution to the
    /// next: at 512 channels it is tens of MB, which the allocator would otherwise map and
    /// fault in afresh on every call (a cost of the order of the GEMMs at 64×64).
    static WEIGHT_BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The transformed weight `U = G g Gᵀ` of `weight` `[C_out, C_in, 3, 3]` into `u`, laid out
/// `[C_out, A², C_in]` (so that the GEMM of position `ξ` reads rows with stride `A²·C_in`).
fn transform_weight<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    weight: &[f32],
    c_out: usize,
    c_in: usize,
    u: &mut Vec<f32>,
) {
    resize(u, c_out * A * A * c_in);
    let u = &mut u[..c_out * A * A * c_in];
    let wide = wide_simd();
    u.par_chunks_mut(A * A * c_in)
        .zip(weight.par_chunks(9 * c_in))
        .for_each_init(
            || vec![0f32; (9 + 3 * A) * c_in],
            |scratch, (u, w)| {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU has AVX2 (`wide_simd`).
                    unsafe { transform_filter_avx2(tf, w, u, scratch) };
                    return;
                }
                transform_filter(tf, w, u, scratch);
            },
        );
}

/// `U = G g Gᵀ` of one output channel's filters `w` `[C_in, 3, 3]` into `u` `[A², C_in]`:
/// the nine taps as rows over the input channels, then `G g` row by row and `(G g) Gᵀ`
/// column by column, each a pass over the channels.
#[inline(always)]
fn transform_filter<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    w: &[f32],
    u: &mut [f32],
    scratch: &mut [f32],
) {
    let c_in = w.len() / 9;
    let (taps, gg) = scratch.split_at_mut(9 * c_in); // gg: [A][3][C_in]
    for (ci, k) in w.chunks_exact(9).enumerate() {
        for (t, &v) in k.iter().enumerate() {
            taps[t * c_in + ci] = v;
        }
    }
    let taps = &*taps;
    for i in 0..A {
        for b in 0..3 {
            let dst = &mut gg[(i * 3 + b) * c_in..(i * 3 + b + 1) * c_in];
            let src = std::array::from_fn(|a| &taps[(a * 3 + b) * c_in..]);
            combine(dst, 0.0, &tf.g[i], src);
        }
    }
    let gg = &*gg;
    for i in 0..A {
        for j in 0..A {
            let dst = &mut u[(i * A + j) * c_in..(i * A + j + 1) * c_in];
            let src = std::array::from_fn(|b| &gg[(i * 3 + b) * c_in..]);
            combine(dst, 0.0, &tf.g[j], src);
        }
    }
}

/// Per-thread buffers of one block.
#[derive(Default)]
struct Workspace {
    /// Transformed input tiles, `[A², C_in, tiles]`.
    v: Vec<f32>,
    /// GEMM results, `[A², C_out, tiles]`.
    m: Vec<f32>,
    /// Transform scratch (see [`input_transform`], [`output_transform`]).
    scratch: Vec<f32>,
}

/// Grows `buf` to at least `len` floats; the kernels write every element they read, so the
/// buffers are not cleared between uses.
fn resize(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// The geometry of one convolution: `th`×`tw` tiles per image, padded rows of `lw` floats;
/// `h`×`w` is the convolution's input and output size, `upsample` says the input is the
/// nearest-neighbour 2× of `x` (`h/2`×`w/2`).
#[derive(Clone, Copy)]
struct Geometry {
    upsample: bool,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    lw: usize,
}

/// Whether to run the transforms compiled for AVX2 (their passes 8 lanes wide).
fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `$name` compiled for AVX2 (the `#[inline(always)]` body inlined into it).
macro_rules! avx2_variant {
    ($name:ident => $wide:ident ( $($arg:ident : $ty:ty),* )) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $wide<const M: usize, const A: usize>($($arg: $ty),*) {
            $name::<M, A>($($arg),*)
        }
    };
}

/// `V[ξ][c][tile] = (Bᵀ d B)[ξ]` for the tiles of tile rows `r0..r1` into `ws.v`
/// (`[A², C_in, tiles]`): per channel, the vertical pass `Bᵀ d` over whole zero-padded
/// rows, then the horizontal pass over all tiles of the block at once, each position of the
/// tile (`phase`) first gathered into a contiguous run.
#[inline(always)]
fn input_transform<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    x: &[f32],
    g: Geometry,
    (r0, r1): (usize, usize),
    ws: &mut Workspace,
) {
    let Geometry {
        c_in,
        h,
        w,
        th,
        tw,
        lw,
        ..
    } = g;
    let rows = r1 - r0;
    let nb = rows * tw;
    let (sh, sw) = if g.upsample { (h / 2, w / 2) } else { (h, w) };
    let (pad, rest) = ws.scratch.split_at_mut(A * lw);
    let (vert, phases) = rest.split_at_mut(A * rows * lw);
    let phases = &mut phases[..A * nb];
    for c in 0..c_in {
        for r in r0..r1 {
            let (bi, ty) = (r / th, r % th);
            let plane = &x[(bi * c_in + c) * sh * sw..(bi * c_in + c + 1) * sh * sw];
            pad.fill(0.0);
            for k in 0..A {
                let y = (ty * M + k) as isize - 1;
                if !(0..h as isize).contains(&y) {
                    continue;
                }
                let dst = &mut pad[k * lw + 1..k * lw + 1 + w];
                if g.upsample {
                    // Each source pixel twice across, each source row for two rows: the
                    // nearest-neighbour 2× read in place.
                    let src = &plane[(y as usize / 2) * sw..(y as usize / 2 + 1) * sw];
                    for (pair, &v) in dst.chunks_exact_mut(2).zip(src) {
                        pair[0] = v;
                        pair[1] = v;
                    }
                } else {
                    dst.copy_from_slice(&plane[y as usize * w..(y as usize + 1) * w]);
                }
            }
            let pad = &*pad;
            for i in 0..A {
                let at = (i * rows + r - r0) * lw;
                let src = std::array::from_fn(|k| &pad[k * lw..]);
                combine(&mut vert[at..at + lw], 0.0, &tf.bt[i], src);
            }
        }
        for i in 0..A {
            for (row, loc) in vert[i * rows * lw..(i + 1) * rows * lw]
                .chunks_exact(lw)
                .zip((0..nb).step_by(tw))
            {
                // The A positions of each tile, each into a contiguous run over the tiles.
                for (tx, win) in row.windows(A).step_by(M).enumerate() {
                    for (k, &v) in win.iter().enumerate() {
                        phases[k * nb + loc + tx] = v;
                    }
                }
            }
            let phases = &*phases;
            for j in 0..A {
                let at = ((i * A + j) * c_in + c) * nb;
                let src = std::array::from_fn(|k| &phases[k * nb..]);
                combine(&mut ws.v[at..at + nb], 0.0, &tf.bt[j], src);
            }
        }
    }
}

/// `Aᵀ M A` + bias for the tiles of tile rows `r0..r1`, from `ws.m` (`[A², C_out, tiles]`)
/// into the output rows of those tiles: per output channel, the horizontal and vertical
/// passes over all tiles of the block at once, then the tile positions interleaved into each
/// output row.
#[inline(always)]
fn output_transform<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    bias: &[f32],
    g: Geometry,
    (r0, r1): (usize, usize),
    ws: &mut Workspace,
    out: &OutPtr,
) {
    let Geometry {
        c_out,
        h,
        w,
        th,
        tw,
        ..
    } = g;
    let rows = r1 - r0;
    let nb = rows * tw;
    let (horiz, rest) = ws.scratch.split_at_mut(A * M * nb);
    let (vout, line) = rest.split_at_mut(M * nb);
    let line = &mut line[..M * tw];
    for (co, &bias) in bias.iter().enumerate().take(c_out) {
        for i in 0..A {
            for jo in 0..M {
                let dst = &mut horiz[(i * M + jo) * nb..(i * M + jo + 1) * nb];
                let src = std::array::from_fn(|j| &ws.m[((i * A + j) * c_out + co) * nb..]);
                combine(dst, 0.0, &tf.at[jo], src);
            }
        }
        let horiz = &*horiz;
        for io in 0..M {
            for jo in 0..M {
                let src = std::array::from_fn(|i| &horiz[(i * M + jo) * nb..]);
                combine(&mut vout[jo * nb..(jo + 1) * nb], bias, &tf.at[io], src);
            }
            for r in r0..r1 {
                let (bi, ty) = (r / th, r % th);
                let y = ty * M + io;
                if y >= h {
                    continue;
                }
                let loc = (r - r0) * tw;
                for (jo, src) in vout.chunks_exact(nb).enumerate() {
                    for (p, &v) in line[jo..].iter_mut().step_by(M).zip(&src[loc..loc + tw]) {
                        *p = v;
                    }
                }
                let start = ((bi * c_out + co) * h + y) * w;
                // SAFETY: row `y` of plane (bi, co) lies in output tile row `ty` of image `bi`,
                // i.e. tile row `r`, which only this block handles, and inside the output
                // (`start + w ≤ B·C_out·H·W` as `y < h`), which outlives the parallel loop.
                unsafe { out.write(start, &line[..w]) };
            }
        }
    }
}

avx2_variant!(transform_filter => transform_filter_avx2(
    tf: &Winograd<M, A>,
    w: &[f32],
    u: &mut [f32],
    scratch: &mut [f32]
));
avx2_variant!(input_transform => input_transform_avx2(
    tf: &Winograd<M, A>,
    x: &[f32],
    g: Geometry,
    rows: (usize, usize),
    ws: &mut Workspace
));
avx2_variant!(output_transform => output_transform_avx2(
    tf: &Winograd<M, A>,
    bias: &[f32],
    g: Geometry,
    rows: (usize, usize),
    ws: &mut Workspace,
    out: &OutPtr
));

/// A 3×3, stride-1, padding-1 convolution of `x` `[B, C_in, H, W]` (row-major; with
/// `upsample`, the nearest-neighbour 2× of `x` `[B, C_in, H/2, W/2]`, `H` and `W` even) by
/// `weight` `[C_out, C_in, 3, 3]` plus `bias` `[C_out]` with F(`M`×`M`, 3×3):
/// `[B, C_out, H, W]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    x: &[f32],
    [b, c_in, h, w]: [usize; 4],
    upsample: bool,
    weight: &[f32],
    bias: &[f32],
    c_out: usize,
) -> Vec<f32> {
    debug_assert_eq!(A, M + 2);
    let scale = if upsample { 4 } else { 1 };
    debug_assert!(!upsample || (h % 2 == 0 && w % 2 == 0));
    debug_assert_eq!(x.len() * scale, b * c_in * h * w);
    debug_assert_eq!(weight.len(), c_out * c_in * 9);
    debug_assert_eq!(bias.len(), c_out);
    // A fresh buffer where the thread's own is in use (a convolution run from inside
    // another one's parallel loop).
    WEIGHT_BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut u) => conv3x3_with(
            tf,
            x,
            [b, c_in, h, w],
            upsample,
            weight,
            bias,
            c_out,
            &mut u,
        ),
        Err(_) => {
            let u = &mut Vec::new();
            conv3x3_with(tf, x, [b, c_in, h, w], upsample, weight, bias, c_out, u)
        }
    })
}

/// [`conv3x3`] with `u` as the buffer of the transformed weight.
#[allow(clippy::too_many_arguments)]
fn conv3x3_with<const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    x: &[f32],
    [b, c_in, h, w]: [usize; 4],
    upsample: bool,
    weight: &[f32],
    bias: &[f32],
    c_out: usize,
    u: &mut Vec<f32>,
) -> Vec<f32> {
    transform_weight(tf, weight, c_out, c_in, u);
    let u = &u[..];
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let g = Geometry {
        upsample,
        c_in,
        c_out,
        h,
        w,
        th,
        tw,
        lw: M * tw + 2,
    };
    let tile_rows = b * th;
    // Whole tile rows per block (each block then owns whole output rows), at least one block
    // per thread where the image has the rows.
    let threads = rayon::current_num_threads();
    let rows_per_block = TARGET_TILES
        .div_ceil(tw)
        .min(tile_rows.div_ceil(threads))
        .max(1);
    let blocks = tile_rows.div_ceil(rows_per_block);
    // Not zeroed: the blocks write every output row (below).
    let mut out = Vec::<f32>::with_capacity(b * c_out * h * w);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let out_ptr = &out_ptr;
    let wide = wide_simd();

    (0..blocks).into_par_iter().for_each(|blk| {
        // No rayon call inside (the GEMMs run single-threaded), so this thread cannot pick up
        // another block while it holds its workspace.
        BLOCK_WORKSPACE.with_borrow_mut(|ws| {
            let r0 = blk * rows_per_block;
            let r1 = (r0 + rows_per_block).min(tile_rows);
            let (rows, nb) = (r1 - r0, (r1 - r0) * tw);
            resize(&mut ws.v, A * A * c_in * nb);
            resize(&mut ws.m, A * A * c_out * nb);
            // Every buffer only grows, so the thread's later blocks and calls reuse it as it is.
            let input_len = A * g.lw + A * rows * g.lw + A * nb;
            let output_len = A * M * nb + M * nb + M * tw;
            resize(&mut ws.scratch, input_len.max(output_len));

            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU has AVX2 (`wide_simd`).
                unsafe { input_transform_avx2(tf, x, g, (r0, r1), ws) };
            } else {
                input_transform(tf, x, g, (r0, r1), ws);
            }
            #[cfg(not(target_arch = "x86_64"))]
            input_transform(tf, x, g, (r0, r1), ws);
            for xi in 0..A * A {
                let dst = &mut ws.m[xi * c_out * nb..(xi + 1) * c_out * nb];
                let rhs = &ws.v[xi * c_in * nb..(xi + 1) * c_in * nb];
                // SAFETY: dst is c_out×nb row-major; the lhs is c_out×c_in from element xi·c_in of
                // `u` ([C_out, A², C_in]) with row stride A²·c_in, its last element
                // (c_out-1)·A²·c_in + xi·c_in + c_in - 1 inside `u`; the rhs is c_in×nb
                // row-major; the three do not alias.
                unsafe {
                    gemm_f32(
                        c_out,
                        nb,
                        c_in,
                        Strided::rows(dst.as_mut_ptr(), nb),
                        Strided::rows(u.as_ptr().add(xi * c_in), A * A * c_in),
                        Strided::rows(rhs.as_ptr(), nb),
                        Store::Overwrite(1.0),
                        gemm::Parallelism::None,
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: as above.
                unsafe { output_transform_avx2(tf, bias, g, (r0, r1), ws, out_ptr) };
            } else {
                output_transform(tf, bias, g, (r0, r1), ws, out_ptr);
            }
            #[cfg(not(target_arch = "x86_64"))]
            output_transform(tf, bias, g, (r0, r1), ws, out_ptr);
        })
    });
    // SAFETY: the blocks cover tile rows 0..B·th, and for each tile row `r` (image r / th) and
    // channel `co` the output transform writes the `w` values of every output row
    // y = (r % th)·M + io < h: all B·C_out·H rows of W values.
    unsafe { out.set_len(b * c_out * h * w) };
    out
}

/// [`conv3x3`] on tensors: `x` `[B, C_in, H, W]`, `weight` `[C_out, C_in, 3, 3]`, `bias`
/// `[C_out]` (f32, host memory) -> `[B, C_out, H, W]`; with `upsample`, of the
/// nearest-neighbour 2× of `x`: `[B, C_out, 2H, 2W]`.
pub(super) fn conv3x3_tensor<B: KernelBackend, const M: usize, const A: usize>(
    tf: &Winograd<M, A>,
    x: Tensor<B, 4>,
    upsample: bool,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let device = x.device();
    let [b, c_in, h, w] = x.dims();
    let (h, w) = if upsample { (2 * h, 2 * w) } else { (h, w) };
    let c_out = weight.dims()[0];
    assert_eq!(weight.dims(), [c_out, c_in, 3, 3], "conv3x3: weight shape");
    let bias = f32_view(bias);
    // Borrowed where the backend lends its buffers: no copy of the input or the weight.
    let y = with_float_bytes(x, |xb| {
        with_float_bytes(weight, |wb| {
            conv3x3(
                tf,
                &cast_or_copy::<f32>(xb),
                [b, c_in, h, w],
                upsample,
                &cast_or_copy::<f32>(wb),
                &bias,
                c_out,
            )
        })
    });
    Tensor::from_data(TensorData::new(y, [b, c_out, h, w]), &device)
}
