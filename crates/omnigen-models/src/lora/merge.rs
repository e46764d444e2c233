//! The merge maths: `W <- W + scaling · B @ A`, in the official bf16 precision or in f32.

use crate::weights::round_bf16;

/// How the adapter delta is added to the base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMergePrecision {
    /// As the official pipeline (PEFT 0.9 `merge_and_unload` on a bf16 model, CPU path): `A`, `B`
    /// and `W` rounded to bf16, `delta = bf16(f32(B @ A) * scaling)`, `W' = bf16(W + delta)`.
    /// The merged weights are bf16-exact. Bit-exact with the official merge on fixture A.
    #[default]
    Official,
    /// `W' = W + scaling * (B @ A)` in f32 with the tensors as read (no bf16 rounding of the
    /// delta or of the result).
    F32,
}

/// `[m, k] @ [k, n]` in f32, summing over `k` in order.
fn matmul(lhs: &[f32], rhs: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for (row, out_row) in out.chunks_exact_mut(n).enumerate() {
        for kk in 0..k {
            let l = lhs[row * k + kk];
            let r = &rhs[kk * n..(kk + 1) * n];
            for (o, &r) in out_row.iter_mut().zip(r) {
                *o += l * r;
            }
        }
    }
    out
}

/// Adds `scaling · B @ A` to `w` (`[out, in]` row-major), `a` `[r, in]`, `b` `[out, r]`, in
/// `precision`; `dims` = `(out, r, in)`.
pub(super) fn merge_delta(
    w: &mut [f32],
    (a, b): (&[f32], &[f32]),
    (d_out, rank, d_in): (usize, usize, usize),
    scaling: f32,
    precision: LoraMergePrecision,
) {
    debug_assert_eq!(w.len(), d_out * d_in);
    match precision {
        LoraMergePrecision::Official => {
            let a: Vec<f32> = a.iter().map(|&x| round_bf16(x)).collect();
            let b: Vec<f32> = b.iter().map(|&x| round_bf16(x)).collect();
            let delta = matmul(&b, &a, d_out, rank, d_in);
            for (w, d) in w.iter_mut().zip(delta) {
                *w = round_bf16(round_bf16(*w) + round_bf16(d * scaling));
            }
        }
        LoraMergePrecision::F32 => {
            let delta = matmul(b, a, d_out, rank, d_in);
            for (w, d) in w.iter_mut().zip(delta) {
                *w += scaling * d;
            }
        }
    }
}
