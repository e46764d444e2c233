//! The bf16 linear on CPUs with AVX512-BF16 (`vdpbf16ps`: Intel Cooper Lake and Sapphire Rapids
//! on, AMD Zen 4 on): `x · Wᵀ` with the f32 activations rounded to bf16 (round to nearest even)
//! and bf16 weights, products summed in f32. int8 and fp8 e4m3 weights run through it too: their
//! codes are exact in bf16 (at most 8 significant bits), and each output feature's scale
//! multiplies its sum, so the weights are used exactly. One `vdpbf16ps` does twice the multiply-adds of an
//! f32 FMA, so this runs the GEMM of a bf16 model at up to twice the f32 rate; the price is the
//! activations' rounding, the same rounding the official pipeline's bf16 matmuls apply (they
//! also round the outputs, which stay f32 here). Its error against f32 is in `docs/parity.md`.
//!
//! Layout: a panel of [`NR`] output features is packed once per task as pairs of consecutive
//! input features (`[k/2][NR]` u32, each the two bf16 of one feature), so that one 512-bit load
//! holds 16 features × 2 inputs, and the micro-kernel of [`MR`] rows × [`NR`] features keeps its
//! 24 accumulators in registers while it walks `KC` input pairs.

use rayon::prelude::*;

/// Output features per panel (four vectors of 16 f32).
pub(super) const NR: usize = 64;
/// Rows per micro-kernel tile.
const MR: usize = 6;
/// Input pairs per pass over a panel: the packed panel (`KC · NR · 4` bytes, 256 KiB) stays in
/// the core's L2 while every row tile reads it.
const KC: usize = 1024;

/// Whether this CPU runs [`linear_rows`].
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bf16")
                && std::env::var_os("OMNIGEN_NO_BF16_DOT").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight `[out, k]` (PyTorch layout) as [`linear_rows`] reads it.
#[derive(Clone, Copy)]
pub(super) enum DotWeight<'a> {
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    /// One byte per value, its bf16 value in `table` (exact for int8 and fp8 e4m3), times the
    /// row's scale.
    Codes {
        bytes: &'a [u8],
        table: &'a [u16; 256],
        scales: &'a [f32],
    },
}

impl DotWeight<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            DotWeight::Bf16(w) => w.len(),
            DotWeight::Codes { bytes, .. } => bytes.len(),
        }
    }

    /// The scales of rows `first..first + cols` (1 for bf16 weights and past `cols`): what
    /// a panel's sums are multiplied by.
    pub(super) fn panel_scales(&self, first: usize, cols: usize) -> [f32; NR] {
        let mut scale = [1f32; NR];
        if let DotWeight::Codes { scales, .. } = self {
            scale[..cols].copy_from_slice(&scales[first..first + cols]);
        }
        scale
    }

    /// bf16 bits of value `c` of row `j`.
    #[inline(always)]
    fn at(&self, j: usize, k: usize, c: usize) -> u16 {
        match self {
            DotWeight::Bf16(w) => w[j * k + c],
            DotWeight::Codes { bytes, table, .. } => table[bytes[j * k + c] as usize],
        }
    }
}

/// The bf16 bits of the 256 codes' unscaled values (`QuantScheme::table`): exact for int8 and
/// fp8 e4m3, whose values have at most 8 significant bits.
pub(super) fn code_table(values: &[f32; 256]) -> [u16; 256] {
    values.map(|v| half::bf16::from_f32(v).to_bits())
}

/// `x · W[rows]ᵀ (+ bias[rows])` for f32 `x` `[m, k]` and a weight `[out, k]`:
/// `[m, rows.len()]`. Only call where [`available`] is true.
pub(super) fn linear_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: DotWeight<'_>,
    rows: std::ops::Range<usize>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(available(), "the bf16 dot-product linear needs AVX512-BF16");
    assert!(x.len() >= m * k && w.len() >= rows.end * k);
    let n = rows.len();
    let mut out = super::host::bias_rows(m, bias, rows.clone());
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let pairs = k.div_ceil(2);
    let xb = activations_bf16(x, m, k, m, pairs);
    let out_ptr = super::host::OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(NR))
        .into_par_iter()
        .for_each_init(Vec::new, |panel: &mut Vec<u32>, p| {
            let j0 = p * NR;
            let cols = NR.min(n - j0);
            let scale = w.panel_scales(rows.start + j0, cols);
            for kc0 in (0..pairs).step_by(KC) {
                let kc = KC.min(pairs - kc0);
                pack_panel(w, k, rows.start + j0, cols, kc0, kc, panel);
                for i0 in (0..m).step_by(MR) {
                    let mr = MR.min(m - i0);
                    // SAFETY: `available` checked the CPU; the tile reads rows i0..i0+mr of
                    // `xb` (pairs u32 each) at pairs kc0..kc0+kc, the packed panel (kc · NR),
                    // and writes columns j0..j0+cols of those rows of the m×n output, disjoint
                    // between tasks (each owns its panel's columns).
                    unsafe {
                        tile(
                            mr,
                            xb.as_ptr().add(i0 * pairs + kc0),
                            pairs,
                            panel.as_ptr(),
                            kc,
                            &scale,
                            out_ptr.get().add(i0 * n + j0),
                            n,
                            cols,
                        );
                    }
                }
            }
        });
    out
}

/// `x` `[m, k]` rounded to bf16, as `[rows][pairs]` u32 pairs of consecutive inputs (`rows ≥ m`,
/// `pairs ≥ ⌈k / 2⌉`; inputs past `k` and rows past `m` are zero).
pub(super) fn activations_bf16(
    x: &[f32],
    m: usize,
    k: usize,
    rows: usize,
    pairs: usize,
) -> Vec<u32> {
    let mut xb = vec![0u32; rows * pairs];
    xb.par_chunks_mut(pairs)
        .zip(x.par_chunks(k))
        .take(m)
        .for_each(|(dst, src)| {
            for (d, two) in dst.iter_mut().zip(src.chunks(2)) {
                let lo = u32::from(half::bf16::from_f32(two[0]).to_bits());
                let hi = two
                    .get(1)
                    .map_or(0, |&v| u32::from(half::bf16::from_f32(v).to_bits()));
                *d = lo | hi << 16;
            }
        });
    xb
}

/// Packs features `first..first + cols` of `w` (rows of `k` values) at input pairs
/// `kc0..kc0 + kc` into `panel` `[kc][NR]`, the tile layout of both bf16 kernels (features past
/// `cols`, inputs past `k` and pairs past `⌈k / 2⌉` are 0).
pub(super) fn pack_panel(
    w: DotWeight<'_>,
    k: usize,
    first: usize,
    cols: usize,
    kc0: usize,
    kc: usize,
    panel: &mut Vec<u32>,
) {
    panel.clear();
    panel.resize(kc * NR, 0);
    let live = k.div_ceil(2).saturating_sub(kc0).min(kc);
    for j in 0..cols {
        for q in 0..live {
            let c = 2 * (kc0 + q);
            let lo = u32::from(w.at(first + j, k, c));
            let hi = if c + 1 < k {
                u32::from(w.at(first + j, k, c + 1))
            } else {
                0
            };
            panel[q * NR + j] = lo | hi << 16;
        }
    }
}

/// One tile of `mr ≤ MR` rows: `out[i][j] += scale[j] · Σ_q xb[i][q] · panel[q][j]` for
/// `j < cols`.
///
/// # Safety
/// The CPU has AVX512-F and AVX512-BF16; `xb` addresses `mr` rows (stride `x_stride` u32) of
/// `kc` pairs, `panel` `kc · NR` u32, `out` `mr` rows (stride `out_stride`) of `cols ≤ NR`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    mr: usize,
    xb: *const u32,
    x_stride: usize,
    panel: *const u32,
    kc: usize,
    scale: &[f32; NR],
    out: *mut f32,
    out_stride: usize,
    cols: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        match mr {
            6 => kernel::<6>(xb, x_stride, panel, kc, scale, out, out_stride, cols),
            5 => kernel::<5>(xb, x_stride, panel, kc, scale, out, out_stride, cols),
            4 => kernel::<4>(xb, x_stride, panel, kc, scale, out, out_stride, cols),
            3 => kernel::<3>(xb, x_stride, panel, kc, scale, out, out_stride, cols),
            2 => kernel::<2>(xb, x_stride, panel, kc, scale, out, out_stride, cols),
            _ => kernel::<1>(xb, x_stride, panel, kc, scale, out, out_stride, cols),
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (mr, xb, x_stride, panel, kc, scale, out, out_stride, cols);
            unreachable!("the bf16 dot-product linear is x86-64 only");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(
    xb: *const u32,
    x_stride: usize,
    panel: *const u32,
    kc: usize,
    scale: &[f32; NR],
    out: *mut f32,
    out_stride: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    // Masks of the valid features of each 16-wide vector.
    let masks: [__mmask16; 4] = std::array::from_fn(|v| {
        let valid = cols.saturating_sub(16 * v).min(16);
        ((1u32 << valid) - 1) as __mmask16
    });
    // SAFETY: the caller's contract bounds every pointer below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for q in 0..kc {
            let b = panel.add(q * NR);
            let bv: [__m512bh; 4] = std::array::from_fn(|v| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.add(16 * v).cast()))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *xb.add(r * x_stride + q) as i32,
                ));
                for (v, s) in row.iter_mut().enumerate() {
                    *s = _mm512_dpbf16_ps(*s, a, bv[v]);
                }
            }
        }
        let scale: [__m512; 4] =
            std::array::from_fn(|v| _mm512_loadu_ps(scale.as_ptr().add(16 * v)));
        for (r, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                let o = out.add(r * out_stride + 16 * v);
                let prev = _mm512_maskz_loadu_ps(masks[v], o);
                _mm512_mask_storeu_ps(o, masks[v], _mm512_fmadd_ps(*a, scale[v], prev));
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A kernel's `linear_rows`: this one's, or the AMX one's, which the same checks run on.
    pub(in crate::ops) type LinearRows =
        fn(&[f32], usize, usize, DotWeight<'_>, std::ops::Range<usize>, Option<&[f32]>) -> Vec<f32>;

    fn round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    /// `linear_rows` with bf16 weights against the same sum in f64 of the bf16-rounded inputs,
    /// for each `(m, k, n, first row)` of `cases`.
    pub(in crate::ops) fn check_bf16_weights(
        linear_rows: LinearRows,
        cases: &[(usize, usize, usize, usize)],
    ) {
        for &(m, k, n, first) in cases {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let w: Vec<u16> = (0..(first + n) * k)
                .map(|i| half::bf16::from_f32(((i * 53 % 89) as f32 - 44.0) / 23.0).to_bits())
                .collect();
            let bias: Vec<f32> = (0..first + n).map(|j| j as f32 * 0.25).collect();
            let got = linear_rows(&x, m, k, DotWeight::Bf16(&w), first..first + n, Some(&bias));
            assert_eq!(got.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let mut want = f64::from(bias[first + j]);
                    for c in 0..k {
                        let wv = half::bf16::from_bits(w[(first + j) * k + c]).to_f32();
                        want += f64::from(round(x[i * k + c])) * f64::from(wv);
                    }
                    let g = f64::from(got[i * n + j]);
                    // f32 sums of exact products: a few ulps of the magnitudes summed
                    let tol = 1e-5 * (k as f64).sqrt() * want.abs().max(10.0);
                    assert!(
                        (g - want).abs() <= tol,
                        "{m}x{k}x{n} [{i},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// `linear_rows` with int8 codes through the table, each row's scale applied to its sum,
    /// against the dequantized weights' product with the rounded activations (`m` rows, 75
    /// inputs, 40 features); returns the product.
    pub(in crate::ops) fn check_int8_codes(linear_rows: LinearRows, m: usize) -> Vec<f32> {
        let (k, n) = (75, 40);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 29 % 97) as f32 - 48.0) / 13.0)
            .collect();
        let bytes: Vec<u8> = (0..n * k).map(|i| (i * 71 % 256) as u8).collect();
        let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
        let table = code_table(omnigen_core::QuantScheme::Int8.table());
        let w = DotWeight::Codes {
            bytes: &bytes,
            table: &table,
            scales: &scales,
        };
        let got = linear_rows(&x, m, k, w, 0..n, None);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| {
                        f64::from(round(x[i * k + c]))
                            * f64::from(bytes[j * k + c] as i8)
                            * f64::from(scales[j])
                    })
                    .sum();
                let g = f64::from(got[i * n + j]);
                assert!(
                    (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "[{i},{j}]: {g} vs {want}"
                );
            }
        }
        got
    }

    /// The kernel over shapes with every remainder: rows past a multiple of [`MR`], features
    /// past a multiple of 16 and [`NR`], an odd input width and more than [`KC`] pairs.
    #[test]
    fn bf16_dot_linear_matches_the_rounded_product() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: the kernel is not run");
            return;
        }
        check_bf16_weights(
            linear_rows,
            &[
                (1, 3, 1, 0),
                (7, 33, 70, 2),
                (13, 2 * KC + 5, 130, 1),
                (6, 64, 64, 0),
            ],
        );
    }

    /// Every int8 and fp8 e4m3 value is exact in bf16, so the codes' table loses nothing.
    #[test]
    fn code_tables_hold_the_quantized_values_exactly() {
        use omnigen_core::QuantScheme;
        for scheme in [QuantScheme::Int8, QuantScheme::Fp8E4M3] {
            let values = scheme.table();
            for (b, (&bits, &v)) in code_table(values).iter().zip(values).enumerate() {
                let back = half::bf16::from_bits(bits).to_f32();
                assert!(
                    back == v || (v.is_nan() && back.is_nan()),
                    "{scheme:?} {b}: {v} -> {back}"
                );
            }
        }
    }

    #[test]
    fn int8_codes_with_row_scales_match_the_dequantized_product() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: the kernel is not run");
            return;
        }
        check_int8_codes(linear_rows, 9);
    }
}
