//! Host kernels for backends whose f32 tensors live in host memory
//! ([`KernelBackend::HOST_KERNELS`](super::KernelBackend::HOST_KERNELS): burn-flex, burn-ndarray).
//!
//! burn's CPU backends run each op as a separate, mostly single-threaded pass with a fresh
//! buffer, and compute `exp` with the scalar libm call. These kernels fuse the non-GEMM work
//! (RMSNorm, SiLU·up, RoPE, attention's scale + bias + softmax, GroupNorm + SiLU) into one
//! threaded pass each, with an `exp` that the compiler vectorises, and run the VAE's wide 3×3
//! convolutions as shifted GEMMs. [`super`] calls them only on f32 tensors of such backends.
//!
//! [`linear_rows`] multiplies f32 activations by a bf16, f16 or quantized weight (the mixed
//! linear of [`KernelBackend::MIXED_PRECISION_LINEAR`](super::KernelBackend)): the weight is
//! converted to f32 a block of output features at a time, each block feeding the f32 GEMM, so
//! that no f32 copy of a whole layer ever exists.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{HeadRange, KernelBackend};
use burn::tensor::TensorPrimitive;

/// `exp(x)` for f32 without a libm call, so that loops over it vectorise: Cephes' `expf`
/// (range reduction by `ln 2` in two parts, degree-6 polynomial, about 1 ulp on the
/// normal range). Inputs are clamped to `[-87.3, 88.3]`: below, the result is ~1e-38 instead
/// of a subnormal or 0, which is immaterial next to the terms it is added to (softmax rows
/// hold a 1, SiLU divides by `1 + exp`).
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC; // round(x · log2 e)
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32); // n as an integer
    e * f32::from_bits((ni + 127).wrapping_shl(23) as u32)
}

/// Rows per rayon task for row-wise kernels over `rows` rows of `width` floats: about 16 Ki
/// floats per task, so that small tensors do not pay a hand-off per row.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// An f32 tensor's values as an owned vector: the tensor's own buffer where it is the only
/// owner, else a copy. For values a kernel reads only, [`f32_view`] never copies a buffer the
/// backend lends.
pub(super) fn f32_data<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .into_vec::<f32>()
        .expect("f32 checked by the caller")
}

/// An f32 tensor's values on the host, read-only ([`f32_view`]).
pub(super) enum F32View<B: KernelBackend> {
    /// The backend's own buffer ([`KernelBackend::float_bytes`]), held with its tensor.
    Lent(B::FloatTensorPrimitive),
    /// A copy, where the backend lends no buffer or the tensor is a strided view.
    Copied(Vec<f32>),
}

impl<B: KernelBackend> std::ops::Deref for F32View<B> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Self::Lent(p) => bytemuck::cast_slice(B::float_bytes(p).expect("lent at construction")),
            Self::Copied(values) => values,
        }
    }
}

/// `x`'s values to read: borrowed from the backend's buffer where it lends one, whoever else
/// holds the tensor (a residual's input, a weight, a RoPE table), else copied once. Where
/// [`f32_data`] would copy a shared tensor's buffer (twice: out of the shared storage, then
/// again to realign it), this copies nothing.
pub(super) fn f32_view<B: KernelBackend, const D: usize>(x: Tensor<B, D>) -> F32View<B> {
    let is_f32 = x.dtype() == burn::tensor::DType::F32;
    match x.into_primitive() {
        TensorPrimitive::Float(p)
            if is_f32
                && B::float_bytes(&p)
                    .is_some_and(|b| bytemuck::try_cast_slice::<u8, f32>(b).is_ok()) =>
        {
            F32View::Lent(p)
        }
        primitive => F32View::Copied(f32_data(Tensor::<B, D>::from_primitive(primitive))),
    }
}

/// Phi-3's RMSNorm, `weight · (x / sqrt(mean(x²) + eps))`, over the last dimension of `x`
/// `[B, S, D]`; rows in parallel, statistics accumulated in f32 as the official code does.
pub(super) fn rms_norm<B: KernelBackend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let device = x.device();
    let dims = x.dims();
    let d = dims[2];
    let (xs, w) = (f32_view(x), f32_view(w));
    let (xs, w) = (&*xs, &*w);
    let eps = eps as f32;
    let mut out = vec![0f32; xs.len()];
    let rows = rows_per_task(d);
    out.par_chunks_mut(rows * d)
        .zip(xs.par_chunks(rows * d))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xi.chunks_exact(d)) {
                // Eight partial sums: a vectorisable reduction.
                let mut acc = [0f32; 8];
                let mut chunks = xrow.chunks_exact(8);
                for c in &mut chunks {
                    for (a, &v) in acc.iter_mut().zip(c) {
                        *a += v * v;
                    }
                }
                let mut ss: f32 = acc.iter().sum();
                ss += chunks.remainder().iter().map(|v| v * v).sum::<f32>();
                let inv = 1.0 / (ss / d as f32 + eps).sqrt();
                for ((y, &v), &wv) in orow.iter_mut().zip(xrow).zip(w) {
                    *y = wv * (v * inv);
                }
            }
        });
    Tensor::from_data(TensorData::new(out, dims), &device)
}

/// `up · silu(gate)` for two tensors of the same shape, in one threaded pass.
pub(super) fn silu_mul<B: KernelBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    let device = gate.device();
    let dims = gate.dims();
    let g = f32_view(gate);
    let g = &*g;
    let mut u = f32_data(up);
    u.par_chunks_mut(16_384)
        .zip(g.par_chunks(16_384))
        .for_each(|(uc, gc)| {
            for (y, &t) in uc.iter_mut().zip(gc) {
                *y *= t / (1.0 + exp_f32(-t));
            }
        });
    Tensor::from_data(TensorData::new(u, dims), &device)
}

/// RoPE on a range of `H` heads of `x` `[B, H_total, S, hd]`: `x · cos + rotate_half(x) ·
/// sin`, with `sin_signed` holding rotate-half's sign; tables `[B or 1, H or 1, S, hd]`. One
/// pass, heads in parallel; returns `[B, H, S, hd]`.
pub(super) fn rope<B: KernelBackend>(
    x: HeadRange<B>,
    cos: Tensor<B, 4>,
    sin_signed: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let device = x.tensor.device();
    let (h0, heads) = (x.start, x.len);
    let [b, h_total, s, hd] = x.tensor.dims();
    let [tb, th, ts, thd] = cos.dims();
    assert!(ts == s && thd == hd && (tb == 1 || tb == b) && (th == 1 || th == heads));
    assert!(sin_signed.dims() == cos.dims() && hd.is_multiple_of(2));
    let (xs, cos, sin) = (f32_view(x.tensor), f32_view(cos), f32_view(sin_signed));
    let (xs, cos, sin) = (&*xs, &*cos, &*sin);
    let plane = s * hd;
    let mut out = vec![0f32; b * heads * plane];
    out.par_chunks_mut(plane).enumerate().for_each(|(bh, o)| {
        let (bi, hi) = (bh / heads, bh % heads);
        let xb = &xs[(bi * h_total + h0 + hi) * plane..][..plane];
        let t0 = ((if tb == 1 { 0 } else { bi }) * th + if th == 1 { 0 } else { hi }) * plane;
        let (cb, sb) = (&cos[t0..t0 + plane], &sin[t0..t0 + plane]);
        for (((orow, xrow), crow), srow) in o
            .chunks_exact_mut(hd)
            .zip(xb.chunks_exact(hd))
            .zip(cb.chunks_exact(hd))
            .zip(sb.chunks_exact(hd))
        {
            rope_row(orow, xrow, crow, srow);
        }
    });
    Tensor::from_data(TensorData::new(out, [b, heads, s, hd]), &device)
}

/// One row of RoPE: `out = x · cos + rotate_half(x) · sin` (rotate-half's sign in `sin`).
#[inline(always)]
fn rope_row(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for j in 0..half {
        o1[j] = x1[j] * cos[j] + x2[j] * sin[j];
        o2[j] = x2[j] * cos[half + j] + x1[j] * sin[half + j];
    }
}

/// Pointer to the output buffer, shared by the attention tasks, each of which writes a
/// disjoint set of `[rows, hd]` blocks.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: the tasks write disjoint regions (see `attention`, `linear_rows` and
// `bf16_dot::linear_rows`), and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method rather than the field, so that closures capture the `Sync` wrapper.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An f32 matrix in memory: element `(i, j)` at `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
pub(super) struct Strided<P> {
    pub ptr: P,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<P> Strided<P> {
    /// A row-major matrix whose rows are `ld` floats apart.
    pub(super) fn rows(ptr: P, ld: usize) -> Self {
        Self {
            ptr,
            row_stride: ld as isize,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `ld` floats apart (a `[n, k]` block
    /// read as `k × n`).
    pub(super) fn transposed(ptr: P, ld: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: ld as isize,
        }
    }
}

/// What [`gemm_f32`] does with the destination.
#[derive(Clone, Copy)]
pub(super) enum Store {
    /// `dst ← scale · lhs·rhs` (the old contents are not read).
    Overwrite(f32),
    /// `dst ← dst + lhs·rhs`.
    Accumulate,
}

/// The f32 product of `lhs` (`m × k`) and `rhs` (`k × n`) into `dst` (`m × n`), stored as
/// `store` says, through `gemm`'s packing and micro-kernels.
///
/// # Safety
/// Every element the three matrices address (by their strides, over those shapes) lies inside
/// its allocation, and `dst` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    store: Store,
    threads: gemm::Parallelism,
) {
    let (read_dst, scale) = match store {
        Store::Overwrite(scale) => (false, scale),
        Store::Accumulate => (true, 1.0),
    };
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_stride,
            dst.row_stride,
            read_dst,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            threads,
        );
    }
}

/// `silu(group_norm(x))` for an affine GroupNorm, one thread per (batch, group): statistics
/// accumulated in f64 (over vectorised f32 partial sums), then normalise, affine and SiLU
/// (with [`exp_f32`], so that the pass vectorises) in a single pass. `x` `[B, C, H, W]`.
pub(super) fn group_norm_silu<B: KernelBackend>(
    x: Tensor<B, 4>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<B, 4> {
    let device = x.device();
    let [b, c, h, w] = x.dims();
    let hw = h * w;
    let cpg = c / groups;
    let (gamma, beta, xs) = (f32_view(gamma), f32_view(beta), f32_view(x));
    let (gamma, beta, xs) = (&*gamma, &*beta, &*xs);
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx2");
    let group = |i: usize, o: &mut [MaybeUninit<f32>]| {
        let g = i % groups;
        let xi = &xs[i * cpg * hw..(i + 1) * cpg * hw];
        let (gamma, beta) = (
            &gamma[g * cpg..(g + 1) * cpg],
            &beta[g * cpg..(g + 1) * cpg],
        );
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the CPU has AVX2 (checked above).
            unsafe { group_norm_silu_group_avx2(xi, o, gamma, beta, hw, eps) };
            return;
        }
        group_norm_silu_group(xi, o, gamma, beta, hw, eps);
    };
    // SAFETY: chunk `i` is (batch, group) `i`'s `cpg · hw` values, every one of which
    // `group_norm_silu_group` writes (`cpg` channels of `hw`).
    let out = unsafe { par_write(b * c * hw, cpg * hw, group) };
    Tensor::from_data(TensorData::new(out, [b, c, h, w]), &device)
}

/// `n` f32 values written by `fill` in parallel, `chunk` at a time (`fill(i, values)` for
/// chunk `i`; the last one may be shorter), into memory that is not zeroed first:
/// `vec![0.0; n]` would write the whole buffer once more (a `memset` of reused heap memory)
/// before the kernel overwrites it.
///
/// # Safety
/// `fill` writes every element of each chunk it is given.
pub(super) unsafe fn par_write(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, values)| fill(i, values));
    // SAFETY: the first `n` elements were written (the caller's promise for each chunk).
    unsafe { out.set_len(n) };
    out
}

/// `Σ f(x)` over `xs` in f64, from f32 partial sums over runs of at most 4096 values in 16
/// lanes (so that the loop vectorises; the f32 partials carry at most ~12 bits of growth).
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for run in xs.chunks(4096) {
        let mut acc = [0f32; 16];
        let mut lanes = run.chunks_exact(16);
        for c in &mut lanes {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        let tail: f32 = lanes.remainder().iter().map(|&v| f(v)).sum();
        total += acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail);
    }
    total
}

/// One group of [`group_norm_silu`]: `xi` its `cpg` channels of `hw` values into `o`, with the
/// group's `gamma` and `beta`; statistics two-pass, accumulated in f64.
#[inline(always)]
fn group_norm_silu_group(
    xi: &[f32],
    o: &mut [MaybeUninit<f32>],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
    eps: f64,
) {
    let len = xi.len() as f64;
    let mean = sum_f64(xi, |v| v) / len;
    let m32 = mean as f32;
    // Deviations from the f32-rounded mean; the rounding's share (mean - m32)² is added back.
    let var = sum_f64(xi, |v| (v - m32) * (v - m32)) / len - (mean - f64::from(m32)).powi(2);
    let inv = 1.0 / (var.max(0.0) + eps).sqrt();
    for ((oc, xc), (&ga, &be)) in o
        .chunks_exact_mut(hw)
        .zip(xi.chunks_exact(hw))
        .zip(gamma.iter().zip(beta))
    {
        let a = (f64::from(ga) * inv) as f32;
        let s = (f64::from(be) - mean * f64::from(ga) * inv) as f32;
        for (y, &v) in oc.iter_mut().zip(xc) {
            let t = v * a + s;
            y.write(t / (1.0 + exp_f32(-t)));
        }
    }
}

/// [`group_norm_silu_group`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn group_norm_silu_group_avx2(
    xi: &[f32],
    o: &mut [MaybeUninit<f32>],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
    eps: f64,
) {
    group_norm_silu_group(xi, o, gamma, beta, hw, eps)
}

/// `[B·S, H·hd]` rows (a fused projection's output) as `[B, H, S, hd]`, heads in parallel.
pub(super) fn split_heads(y: &[f32], b: usize, s: usize, heads: usize, hd: usize) -> Vec<f32> {
    split_heads_rope(y, b, s, heads, hd, None)
}

/// RoPE tables for [`split_heads_rope`]: `cos` and `sin_signed` `[B or 1, 1, S, hd]` as host
/// rows, applied to the first `heads` heads.
pub(super) struct RopeRows<'a> {
    pub cos: &'a [f32],
    pub sin_signed: &'a [f32],
    pub per_batch: bool,
    pub heads: usize,
}

/// [`split_heads`] with RoPE applied to the heads `rope` names on the way: one pass instead of
/// a split and a rotation.
pub(super) fn split_heads_rope(
    y: &[f32],
    b: usize,
    s: usize,
    heads: usize,
    hd: usize,
    rope: Option<&RopeRows<'_>>,
) -> Vec<f32> {
    assert_eq!(y.len(), b * s * heads * hd);
    if let Some(r) = rope {
        let rows = if r.per_batch { b * s } else { s };
        assert!(
            r.cos.len() == rows * hd && r.sin_signed.len() == rows * hd && hd.is_multiple_of(2)
        );
    }
    let mut out = vec![0f32; y.len()];
    let n = heads * hd;
    out.par_chunks_mut(s * hd).enumerate().for_each(|(bh, o)| {
        let (bi, h) = (bh / heads, bh % heads);
        let rope = rope.filter(|r| h < r.heads);
        for (si, orow) in o.chunks_exact_mut(hd).enumerate() {
            let start = (bi * s + si) * n + h * hd;
            let src = &y[start..start + hd];
            match rope {
                Some(r) => {
                    let t = ((if r.per_batch { bi } else { 0 }) * s + si) * hd;
                    rope_row(orow, src, &r.cos[t..t + hd], &r.sin_signed[t..t + hd]);
                }
                None => orow.copy_from_slice(src),
            }
        }
    });
    out
}

/// A weight as [`linear_rows`] reads it: rows of `k` values in the PyTorch `[out, in]` layout.
#[derive(Clone, Copy)]
pub(super) enum HostWeight<'a> {
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    /// f16 bit patterns.
    F16(&'a [half::f16]),
    /// int8 values, times the row's scale.
    Int8 { bytes: &'a [u8], scales: &'a [f32] },
    /// One byte per value, decoded through `table`, times the row's scale (fp8 e4m3).
    Quantized {
        bytes: &'a [u8],
        scales: &'a [f32],
        table: &'a [f32; 256],
    },
}

impl HostWeight<'_> {
    /// Rows `rows` of the weight, as f32, into `dst` (`rows.len() · k` values).
    fn decode(&self, rows: std::ops::Range<usize>, k: usize, dst: &mut [f32]) {
        let span = rows.start * k..rows.end * k;
        match *self {
            HostWeight::Bf16(w) => {
                // bf16 is the high half of an f32: a shift, which the compiler vectorises.
                for (d, &b) in dst.iter_mut().zip(&w[span]) {
                    *d = f32::from_bits(u32::from(b) << 16);
                }
            }
            HostWeight::F16(w) => {
                use half::slice::HalfFloatSliceExt;
                w[span].convert_to_f32_slice(dst);
            }
            HostWeight::Int8 { bytes, scales } => {
                // A conversion rather than a table lookup: it vectorises.
                for ((drow, brow), &s) in dst
                    .chunks_exact_mut(k)
                    .zip(bytes[span].chunks_exact(k))
                    .zip(&scales[rows])
                {
                    for (d, &b) in drow.iter_mut().zip(brow) {
                        *d = f32::from(b as i8) * s;
                    }
                }
            }
            HostWeight::Quantized {
                bytes,
                scales,
                table,
            } => {
                for ((drow, brow), &s) in dst
                    .chunks_exact_mut(k)
                    .zip(bytes[span].chunks_exact(k))
                    .zip(&scales[rows])
                {
                    for (d, &b) in drow.iter_mut().zip(brow) {
                        *d = table[b as usize] * s;
                    }
                }
            }
        }
    }
}

/// f32 values a decoded weight block holds (16 MiB / 4): small enough to stay in the last-level
/// cache of one core while the GEMM packs it, large enough that its GEMM is long.
const WEIGHT_BLOCK_FLOATS: usize = 1 << 20;

/// Output features per weight block for rows of `k` values: a multiple of 16 (the GEMM's
/// register tile), between 16 and 512.
pub(super) fn linear_block_rows(k: usize) -> usize {
    ((WEIGHT_BLOCK_FLOATS / k.max(1)) / 16 * 16).clamp(16, 512)
}

/// The `[m, rows.len()]` output of a linear over output features `rows` before any product:
/// `bias[rows]` in every row, or zeros.
pub(super) fn bias_rows(m: usize, bias: Option<&[f32]>, rows: std::ops::Range<usize>) -> Vec<f32> {
    let n = rows.len();
    // Written, not `calloc`ed: kernels add into it, and a fresh page first read then written
    // faults twice (the second time with a TLB flush on every core).
    let mut out = Vec::with_capacity(m * n);
    out.resize(m * n, 0f32);
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(n.max(1)) {
            row.copy_from_slice(&bias[rows.clone()]);
        }
    }
    out
}

/// `x · W[rows]ᵀ (+ bias[rows])` for f32 `x` `[m, k]` and a weight read through `w`:
/// returns `[m, rows.len()]`.
///
/// Blocks of [`linear_block_rows`] output features run in parallel, each decoded into a per-thread
/// f32 buffer and multiplied by one single-threaded `gemm` into its columns of the output; the
/// accumulation is f32 throughout.
pub(super) fn linear_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: HostWeight<'_>,
    rows: std::ops::Range<usize>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let n = rows.len();
    let mut out = bias_rows(m, bias, rows.clone());
    if m == 0 || n == 0 {
        return out;
    }
    let nb = linear_block_rows(k);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(nb))
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, blk| {
            let j0 = blk * nb;
            let jn = nb.min(n - j0);
            buf.resize(jn * k, 0.0);
            let first = rows.start + j0;
            w.decode(first..first + jn, k, buf);
            // SAFETY: the destination is columns j0..j0+jn of the m×n row-major output (row
            // stride n), disjoint between tasks and inside `out`; x is m×k row-major; the rhs
            // is the jn×k row-major block read transposed (column stride k, row stride 1).
            unsafe {
                gemm_f32(
                    m,
                    jn,
                    k,
                    Strided::rows(out_ptr.get().add(j0), n),
                    Strided::rows(x.as_ptr(), k),
                    Strided::transposed(buf.as_ptr(), k),
                    if bias.is_some() {
                        Store::Accumulate
                    } else {
                        Store::Overwrite(1.0)
                    },
                    gemm::Parallelism::None,
                );
            }
        });
    out
}

/// Runs `f` on the bytes of float tensor `t` (contiguous, row-major), borrowed where the
/// backend lends them ([`KernelBackend::float_bytes`]), else copied out once.
pub(super) fn with_float_bytes<B: KernelBackend, const D: usize, R>(
    t: Tensor<B, D>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let primitive = t.into_primitive();
    if let TensorPrimitive::Float(p) = &primitive {
        if let Some(bytes) = B::float_bytes(p) {
            return f(bytes);
        }
    }
    let data = Tensor::<B, D>::from_primitive(primitive).into_data();
    f(&data.bytes)
}

/// [`with_float_bytes`] for an int tensor ([`KernelBackend::int_bytes`]).
pub(super) fn with_int_bytes<B: KernelBackend, const D: usize, R>(
    t: Tensor<B, D, burn::tensor::Int>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let primitive = t.into_primitive();
    if let Some(bytes) = B::int_bytes(&primitive) {
        return f(bytes);
    }
    let data = Tensor::<B, D, burn::tensor::Int>::from_primitive(primitive).into_data();
    f(&data.bytes)
}

/// `bytes` as `T` values: borrowed when aligned (always, for a backend's own buffers), else
/// copied.
pub(super) fn cast_or_copy<T: bytemuck::Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(
            bytes
                .chunks_exact(std::mem::size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect(),
        ),
    }
}

/// diffusers' `Downsample2D` convolution: zero-pad one row at the bottom and one column at the
/// right, then a 3×3 convolution of stride 2 without other padding, for even `H` and `W`.
///
/// Polyphase: the input is split into its four (row parity, column parity) phases, each a
/// half-size plane with one zero row and column appended; tap `(dy, dx)` then reads phase
/// `(dy % 2, dx % 2)` shifted by `(dy / 2, dx / 2)`, so the convolution is nine shifted GEMMs at
/// the output's resolution, accumulated in place as in [`conv3x3`] (stride-2 3×3 has no cheap
/// Winograd form).
///
/// # Shapes
/// `x` `[B, C_in, H, W]`, `weight` `[C_out, C_in, 3, 3]` -> `[B, C_out, H/2, W/2]`.
pub(super) fn downsample_conv3x3<B: KernelBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let device = x.device();
    let [b, c_in, h, w] = x.dims();
    let c_out = weight.dims()[0];
    assert_eq!(
        weight.dims(),
        [c_out, c_in, 3, 3],
        "downsample: weight shape"
    );
    assert!(
        h % 2 == 0 && w % 2 == 0 && h > 0 && w > 0,
        "downsample: odd size"
    );
    let (ho, wo) = (h / 2, w / 2);
    let wq = wo + 1; // phase row stride: one zero column
    let lq = (ho + 2) * wq; // phase plane: one zero row, one more for the last tap's window
    let n = ho * wq; // output on the phase-width grid
    let (xs, ws, bs) = (f32_view(x), f32_view(weight), f32_view(bias));
    let (xs, ws, bs) = (&*xs, &*ws, &*bs);
    // phases[((bi·4 + phase)·c_in + c)·lq ..]: phase 2·(row parity) + (column parity)
    let mut phases = vec![0f32; b * 4 * c_in * lq];
    phases
        .par_chunks_mut(lq)
        .enumerate()
        .for_each(|(plane, dst)| {
            let c = plane % c_in;
            let phase = (plane / c_in) % 4;
            let bi = plane / (4 * c_in);
            let (pr, pc) = (phase / 2, phase % 2);
            let src = &xs[(bi * c_in + c) * h * w..(bi * c_in + c + 1) * h * w];
            for i in 0..ho {
                let row = &src[(2 * i + pr) * w..(2 * i + pr + 1) * w];
                for (d, &v) in dst[i * wq..i * wq + wo]
                    .iter_mut()
                    .zip(row[pc..].iter().step_by(2))
                {
                    *d = v;
                }
            }
        });
    let per_image = c_in * 4 * lq;
    let out = shifted_taps(b, c_in, c_out, n, ws, bs, |bi, dy, dx| {
        let phase = 2 * (dy % 2) + dx % 2;
        let planes = &phases[bi * per_image..(bi + 1) * per_image];
        let src = &planes[phase * c_in * lq..(phase + 1) * c_in * lq];
        (src, (dy / 2) * wq + dx / 2, lq)
    });
    drop(phases);
    let out = drop_columns(&out, wq, wo);
    Tensor::from_data(TensorData::new(out, [b, c_out, ho, wo]), &device)
}

/// A 3×3, stride-1, padding-1 convolution as nine shifted GEMMs accumulated in place: the
/// host kernel before Winograd (`ops/winograd.rs`), which replaced it at every size measured;
/// kept as the tests' and measurements' baseline.
///
/// With the input zero-padded to `[C_in, (H+3)·(W+2)]` (one extra bottom row so every window
/// fits), output pixel `(y, x)` of the padded-width grid `y·(W+2)+x` reads tap `(dy, dx)` at
/// flat index `y·(W+2)+x + dy·(W+2)+dx`: a contiguous column window. Each tap is one GEMM
/// `C += W_tap · X_window` (bias as the initial value) whose left operand is read with strides
/// straight from the PyTorch-layout weight `[C_out, C_in, 3, 3]`; the two junk columns per row
/// are dropped at the end.
#[cfg(test)]
pub(super) fn conv3x3<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let device = x.device();
    let [b, c_in, h, w] = x.dims();
    let c_out = weight.dims()[0];
    assert_eq!(weight.dims(), [c_out, c_in, 3, 3], "conv3x3: weight shape");
    let wp = w + 2;
    let l = (h + 3) * wp; // padded plane
    let n = h * wp; // output on the padded-width grid
    let xs = f32_data(x.pad((1, 1, 1, 2), burn::tensor::ops::PadMode::Constant(0.0)));
    let ws = f32_data(weight);
    let bs = f32_data(bias);
    let out = shifted_taps(b, c_in, c_out, n, &ws, &bs, |bi, dy, dx| {
        (&xs[bi * c_in * l..(bi + 1) * c_in * l], dy * wp + dx, l)
    });
    // Drop the two junk columns of every row: a contiguous result for the ops that follow.
    let out = drop_columns(&out, wp, w);
    Tensor::from_data(TensorData::new(out, [b, c_out, h, w]), &device)
}

/// The nine-tap GEMMs of [`conv3x3`] and [`downsample_conv3x3`]: per image `bi`, the
/// `c_out × n` output (row-major, starting from the bias) accumulates `W_tap · X_tap` for each
/// tap `(dy, dx)`, with `W_tap` read by strides from the PyTorch-layout weight
/// `[C_out, C_in, 3, 3]` and `X_tap` the `c_in × n` window `window(bi, dy, dx)` = (planes,
/// offset of the window's first element, row stride). Returns `[B, C_out, n]`.
#[allow(clippy::too_many_arguments)]
fn shifted_taps<'a>(
    b: usize,
    c_in: usize,
    c_out: usize,
    n: usize,
    ws: &[f32],
    bs: &[f32],
    window: impl Fn(usize, usize, usize) -> (&'a [f32], usize, usize),
) -> Vec<f32> {
    let mut out = vec![0f32; b * c_out * n];
    for bi in 0..b {
        let dst = &mut out[bi * c_out * n..(bi + 1) * c_out * n];
        for (row, &bv) in dst.chunks_exact_mut(n).zip(bs) {
            row.fill(bv);
        }
        for dy in 0..3 {
            for dx in 0..3 {
                let tap = 3 * dy + dx;
                let (src, off, stride) = window(bi, dy, dx);
                // The window's last element, (c_in-1)·stride + off + n - 1, and the tap's last
                // weight, (c_out-1)·9·c_in + (c_in-1)·9 + tap, lie inside their slices.
                assert!((c_in - 1) * stride + off + n <= src.len() && 9 * c_in * c_out <= ws.len());
                // SAFETY: dst is c_out×n row-major; the lhs is c_out×c_in with row stride
                // 9·c_in and column stride 9 from element `tap` of the weight; the rhs window is
                // c_in×n with row stride `stride` from `off`; all within their slices (above),
                // and dst does not alias the inputs.
                unsafe {
                    gemm_f32(
                        c_out,
                        n,
                        c_in,
                        Strided::rows(dst.as_mut_ptr(), n),
                        Strided {
                            ptr: ws.as_ptr().add(tap),
                            row_stride: (9 * c_in) as isize,
                            col_stride: 9,
                        },
                        Strided::rows(src.as_ptr().add(off), stride),
                        Store::Accumulate,
                        gemm::Parallelism::Rayon(0),
                    );
                }
            }
        }
    }
    out
}

/// Rows of `wide` values (`out`) cut to their first `keep`.
fn drop_columns(out: &[f32], wide: usize, keep: usize) -> Vec<f32> {
    let mut kept = vec![0f32; out.len() / wide * keep];
    for (dst, src) in kept.chunks_exact_mut(keep).zip(out.chunks_exact(wide)) {
        dst.copy_from_slice(&src[..keep]);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_matches_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, e) = (exp_f32(x), x.exp());
            assert!(((a - e) / e).abs() < 5e-7, "exp({x}) = {a}, libm {e}");
            x += 0.037;
        }
        assert!(exp_f32(f32::MIN) < 1e-37);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
