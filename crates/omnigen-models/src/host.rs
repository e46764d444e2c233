//! Host kernels for the transformer on the CPU backends (burn-flex, burn-ndarray), f32 only.
//!
//! burn's CPU backends run each op as a separate, mostly single-threaded pass with a fresh
//! buffer, and compute `exp` with the scalar libm call. These kernels fuse the transformer's
//! non-GEMM work (RMSNorm, SiLU·up, attention's scale + bias + softmax) into one threaded pass
//! each, with an `exp` that the compiler vectorises. The callers keep burn's ops for the other
//! backends and dtypes.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

/// `exp(x)` for f32 without a libm call, so that loops over it vectorise: Cephes' `expf`
/// (range reduction by `ln 2` in two parts, degree-6 polynomial, about 1 ulp on the
/// normal range). Inputs are clamped to `[-87.3, 88.3]`: below, the result is ~1e-38 instead
/// of a subnormal or 0, which is immaterial next to the terms it is added to (softmax rows
/// hold a 1, SiLU divides by `1 + exp`).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
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

fn f32_data<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .into_vec::<f32>()
        .expect("f32 checked by the caller")
}

/// Phi-3's RMSNorm, `weight · (x / sqrt(mean(x²) + eps))`, over the last dimension of `x`
/// `[B, S, D]`; rows in parallel, statistics accumulated in f32 as the official code does.
pub(crate) fn rms_norm<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let device = x.device();
    let dims = x.dims();
    let d = dims[2];
    let xs = f32_data(x);
    let w = f32_data(weight);
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
                for ((y, &v), &wv) in orow.iter_mut().zip(xrow).zip(&w) {
                    *y = wv * (v * inv);
                }
            }
        });
    Tensor::from_data(TensorData::new(out, dims), &device)
}

/// `up · silu(gate)` for two tensors of the same shape, in one threaded pass.
pub(crate) fn silu_mul<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    let device = gate.device();
    let dims = gate.dims();
    let g = f32_data(gate);
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

/// RoPE on the first `heads` heads of `x` `[B, H_total, S, hd]`:
/// `x · cos + rotate_half(x) · sin`, with `sin_signed` holding rotate-half's sign (see
/// [`crate::transformer::RopeTables`]); tables `[B or 1, heads or 1, S, hd]`. One pass, heads in
/// parallel; returns `[B, heads, S, hd]`.
pub(crate) fn rope<B: Backend>(
    x: Tensor<B, 4>,
    heads: usize,
    cos: Tensor<B, 4>,
    sin_signed: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let device = x.device();
    let [b, h_total, s, hd] = x.dims();
    let [tb, th, ts, thd] = cos.dims();
    assert!(ts == s && thd == hd && (tb == 1 || tb == b) && (th == 1 || th == heads));
    assert!(sin_signed.dims() == cos.dims() && hd % 2 == 0);
    let (xs, cos, sin) = (f32_data(x), f32_data(cos), f32_data(sin_signed));
    let half = hd / 2;
    let plane = s * hd;
    let mut out = vec![0f32; b * heads * plane];
    out.par_chunks_mut(plane).enumerate().for_each(|(bh, o)| {
        let (bi, hi) = (bh / heads, bh % heads);
        let xb = &xs[(bi * h_total + hi) * plane..][..plane];
        let t0 = ((if tb == 1 { 0 } else { bi }) * th + if th == 1 { 0 } else { hi }) * plane;
        let (cb, sb) = (&cos[t0..t0 + plane], &sin[t0..t0 + plane]);
        for (((orow, xrow), crow), srow) in o
            .chunks_exact_mut(hd)
            .zip(xb.chunks_exact(hd))
            .zip(cb.chunks_exact(hd))
            .zip(sb.chunks_exact(hd))
        {
            let (x1, x2) = xrow.split_at(half);
            let (o1, o2) = orow.split_at_mut(half);
            for j in 0..half {
                o1[j] = x1[j] * crow[j] + x2[j] * srow[j];
                o2[j] = x2[j] * crow[half + j] + x1[j] * srow[half + j];
            }
        }
    });
    Tensor::from_data(TensorData::new(out, [b, heads, s, hd]), &device)
}

/// Heads `h0..h0 + H` of a contiguous `[B, H_total, L, hd]` buffer.
pub(crate) struct Heads<B: Backend> {
    /// The whole `[B, H_total, L, hd]` tensor.
    pub tensor: Tensor<B, 4>,
    /// Index of the first head used.
    pub h0: usize,
}

struct HeadsData {
    data: Vec<f32>,
    h_total: usize,
    h0: usize,
    len: usize,
    hd: usize,
}

impl HeadsData {
    fn new<B: Backend>(heads: Heads<B>) -> Self {
        let [_, h_total, len, hd] = heads.tensor.dims();
        Self {
            data: f32_data(heads.tensor),
            h_total,
            h0: heads.h0,
            len,
            hd,
        }
    }

    /// The `[L, hd]` block of batch `b`, head `h` (counted from `h0`).
    fn block(&self, b: usize, h: usize) -> &[f32] {
        let start = ((b * self.h_total + self.h0 + h) * self.len) * self.hd;
        &self.data[start..start + self.len * self.hd]
    }
}

/// Pointer to the output buffer, shared by the attention tasks, each of which writes a
/// disjoint set of `[rows, hd]` blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint regions (see `attention`), and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method rather than the field, so that closures capture the `Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Query rows per attention task.
const ATTN_ROWS: usize = 64;

/// `softmax(q·kᵀ/sqrt(hd) + bias)·v` for `num_heads` heads, written straight into `[B, S, H·hd]`.
///
/// `q` holds `S` rows per head, `k` and `v` `T`; `bias` is `[B or 1, H or 1, S, T]`. Tasks are
/// (batch, head, block of 64 query rows) in parallel: scores = bias + scale·q·kᵀ in one GEMM
/// that reads the bias as its initial value, row softmax with [`exp_f32`], then one GEMM with
/// `v` into the output's columns of that head.
pub(crate) fn attention<B: Backend>(
    q: Heads<B>,
    k: Heads<B>,
    v: Heads<B>,
    bias: Tensor<B, 4>,
    num_heads: usize,
) -> Tensor<B, 3> {
    let device = bias.device();
    let [bb, hb, bs, bt] = bias.dims();
    let bias = f32_data(bias);
    let (q, k, v) = (HeadsData::new(q), HeadsData::new(k), HeadsData::new(v));
    let b = q.data.len() / (q.h_total * q.len * q.hd);
    let (h, s, t, hd) = (num_heads, q.len, k.len, q.hd);
    assert!(
        k.len == v.len && k.hd == hd && v.hd == hd,
        "attention: k/v shapes"
    );
    assert!(bs == s && bt == t && (bb == 1 || bb == b) && (hb == 1 || hb == h));
    let d = h * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; b * s * d];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let blocks = s.div_ceil(ATTN_ROWS);
    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let r0 = blk * ATTN_ROWS;
        let rows = ATTN_ROWS.min(s - r0);
        let qb = &q.block(bi, hi)[r0 * hd..(r0 + rows) * hd];
        let (kb, vb) = (k.block(bi, hi), v.block(bi, hi));
        let bias_start =
            ((if bb == 1 { 0 } else { bi }) * hb + if hb == 1 { 0 } else { hi }) * s * t;
        let mut scores = bias[bias_start + r0 * t..bias_start + (r0 + rows) * t].to_vec();
        // SAFETY: scores is rows×t row-major; q block rows×hd row-major; kᵀ is read from the
        // t×hd row-major k block (column stride hd, row stride 1); all within their slices.
        unsafe {
            gemm::gemm(
                rows,
                t,
                hd,
                scores.as_mut_ptr(),
                1,
                t as isize,
                true,
                qb.as_ptr(),
                1,
                hd as isize,
                kb.as_ptr(),
                hd as isize,
                1,
                1.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for row in scores.chunks_exact_mut(t) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = exp_f32(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
        // SAFETY: the destination is rows r0..r0+rows of batch bi, columns hi·hd..(hi+1)·hd of
        // the [B, S, D] buffer (row stride d): in bounds, and disjoint between tasks. The
        // probabilities are rows×t row-major, v t×hd row-major.
        unsafe {
            let dst = out_ptr.get().add((bi * s + r0) * d + hi * hd);
            gemm::gemm(
                rows,
                hd,
                t,
                dst,
                1,
                d as isize,
                false,
                scores.as_ptr(),
                1,
                t as isize,
                vb.as_ptr(),
                1,
                hd as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    Tensor::from_data(TensorData::new(out, [b, s, d]), &device)
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
