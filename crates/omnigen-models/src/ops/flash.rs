//! Flash-style attention on the host: `softmax(q·kᵀ/sqrt(hd) + mask)·v` in tiles of 64 queries
//! × 512 keys with an online softmax, reading OmniGen's mask as [`KeyRanges`] (one run of
//! visible keys per query) instead of a dense tensor, and writing straight into `[B, S, H·hd]`.
//!
//! Two kernels do a tile's products. On CPUs with AVX-512F, and a head width that is a multiple
//! of 16, the keys of every head are first transposed once into panels of [`PANEL`] keys
//! (`[hd][64]`, the layout that lets a score be a broadcast query value times a vector of keys),
//! and two register-blocked micro-kernels read the queries, the panels and the values in place:
//! no per-tile packing. Elsewhere each tile is two calls of `gemm`'s f32 GEMM, which packs its
//! operands per call.

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::host::{cast_or_copy, exp_f32, gemm_f32, with_float_bytes, OutPtr, Store, Strided};
use super::mask::KeyRanges;
use super::{HeadRange, KernelBackend};

/// Query rows per attention task.
const ATTN_ROWS: usize = 64;
/// Keys per tile of the online softmax: a tile's scores, keys and values (about 0.5 MB with
/// 64 rows and head_dim 96) stay in a core's L2 cache.
const ATTN_KEYS: usize = 512;
/// Keys per transposed panel of the AVX-512 kernel (four vectors of 16).
const PANEL: usize = 64;

/// Which kernel does a tile's two products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileKernel {
    /// `gemm`'s f32 GEMM, any CPU, any head width.
    Gemm,
    /// The AVX-512 micro-kernels over transposed key panels.
    Avx512,
}

impl TileKernel {
    /// The AVX-512 kernel where the CPU has AVX-512F, `hd` is a multiple of 16 and
    /// `OMNIGEN_NO_AVX512_ATTENTION` is unset; else `gemm`.
    fn for_head_dim(hd: usize) -> Self {
        if hd.is_multiple_of(16) && hd > 0 && avx512_available() {
            Self::Avx512
        } else {
            Self::Gemm
        }
    }
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::env::var_os("OMNIGEN_NO_AVX512_ATTENTION").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `H` heads of a `[B, H_total, L, hd]` tensor, read in place.
struct Heads<'a> {
    data: &'a [f32],
    h_total: usize,
    h0: usize,
    heads: usize,
    len: usize,
    hd: usize,
}

impl<'a> Heads<'a> {
    fn new(data: &'a [f32], dims: [usize; 4], h0: usize, heads: usize) -> Self {
        let [b, h_total, len, hd] = dims;
        assert_eq!(data.len(), b * h_total * len * hd, "attention: tensor size");
        Self {
            data,
            h_total,
            h0,
            heads,
            len,
            hd,
        }
    }

    /// The `[L, hd]` block of batch `b`, head `h` (counted from `h0`).
    fn block(&self, b: usize, h: usize) -> &'a [f32] {
        let start = ((b * self.h_total + self.h0 + h) * self.len) * self.hd;
        &self.data[start..start + self.len * self.hd]
    }
}

/// `softmax(q·kᵀ/sqrt(hd) + mask)·v` for `H` heads, written straight into `[B, S, H·hd]`, with
/// the mask read from its [`KeyRanges`] rather than a dense tensor. q, k and v are read in
/// place where the backend lends its buffers (three ranges of one fused tensor share it).
///
/// Tasks are (batch, head, block of 64 query rows) in parallel; each walks the keys its rows
/// may see in tiles of [`ATTN_KEYS`], keeping a running maximum and sum per row (the online
/// softmax), so no score buffer is larger than one tile. Tiles no row of the block sees are
/// skipped (the causal text part). A row with no visible key is uniform over all keys, as the
/// official finite mask makes it.
pub(super) fn attention<B: KernelBackend>(
    q: HeadRange<B>,
    k: HeadRange<B>,
    v: HeadRange<B>,
    mask: &KeyRanges,
) -> Tensor<B, 3> {
    let device = q.tensor.device();
    let dims = (q.tensor.dims(), k.tensor.dims(), v.tensor.dims());
    let [b, _, s, hd] = dims.0;
    let kernel = TileKernel::for_head_dim(hd);
    let out = with_float_bytes(q.tensor, |qb| {
        with_float_bytes(k.tensor, |kb| {
            with_float_bytes(v.tensor, |vb| {
                let (qd, kd, vd) = (cast_or_copy(qb), cast_or_copy(kb), cast_or_copy(vb));
                attention_rows(
                    Heads::new(&qd, dims.0, q.start, q.len),
                    Heads::new(&kd, dims.1, k.start, k.len),
                    Heads::new(&vd, dims.2, v.start, v.len),
                    mask,
                    kernel,
                )
            })
        })
    });
    Tensor::from_data(TensorData::new(out, [b, s, q.len * hd]), &device)
}

/// [`attention`] on host slices: `[B, S, H·hd]` row-major.
fn attention_rows(
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    mask: &KeyRanges,
    kernel: TileKernel,
) -> Vec<f32> {
    let b = q.data.len() / (q.h_total * q.len * q.hd);
    let (h, s, t, hd) = (q.heads, q.len, k.len, q.hd);
    assert!(
        k.len == v.len && k.hd == hd && v.hd == hd && k.heads == h && v.heads == h,
        "attention: k/v shapes"
    );
    assert_eq!(mask.dims(), [b, s, t], "attention: mask shape");
    let d = h * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let panels = key_panels(&k, b, kernel);
    let mut out = vec![0f32; b * s * d];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let blocks = s.div_ceil(ATTN_ROWS);
    (0..b * h * blocks).into_par_iter().for_each_init(
        || AttentionScratch::new(hd),
        |scratch, task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let r0 = blk * ATTN_ROWS;
            let rows = ATTN_ROWS.min(s - r0);
            let qb = &q.block(bi, hi)[r0 * hd..(r0 + rows) * hd];
            let (kb, vb) = (k.block(bi, hi), v.block(bi, hi));
            let range = |r| mask.range(bi, r0 + r);
            match &panels {
                Some(p) => {
                    let per_head = p.len() / (b * h);
                    let kt = &p[bh * per_head..(bh + 1) * per_head];
                    scratch.run(qb, KeyTiles::Panels(kt), vb, range, rows, t, scale);
                }
                None => scratch.run(qb, KeyTiles::Rows(kb), vb, range, rows, t, scale),
            }
            // SAFETY: the destination is rows r0..r0+rows of batch bi, columns
            // hi·hd..(hi+1)·hd of the [B, S, D] buffer (row stride d): in bounds, and disjoint
            // between tasks.
            unsafe {
                let dst = out_ptr.get().add((bi * s + r0) * d + hi * hd);
                for (r, acc) in scratch.acc.chunks_exact(hd).take(rows).enumerate() {
                    let inv = 1.0 / scratch.sum[r];
                    let row = std::slice::from_raw_parts_mut(dst.add(r * d), hd);
                    for (o, &a) in row.iter_mut().zip(acc) {
                        *o = a * inv;
                    }
                }
            }
        },
    );
    out
}

/// For the AVX-512 kernel: every head's keys as `⌈T / 64⌉` panels `[hd][64]` (keys past `T`
/// zero), heads one after another; `None` for the `gemm` kernel.
fn key_panels(k: &Heads<'_>, b: usize, kernel: TileKernel) -> Option<Vec<f32>> {
    if kernel != TileKernel::Avx512 {
        return None;
    }
    let (t, hd) = (k.len, k.hd);
    let (panel, panels) = (hd * PANEL, t.div_ceil(PANEL));
    let mut out = vec![0f32; b * k.heads * panels * panel];
    out.par_chunks_mut(panel).enumerate().for_each(|(i, dst)| {
        let (bh, p) = (i / panels, i % panels);
        let keys = k.block(bh / k.heads, bh % k.heads);
        let (j0, n) = (p * PANEL, PANEL.min(t - p * PANEL));
        for (j, key) in keys[j0 * hd..(j0 + n) * hd].chunks_exact(hd).enumerate() {
            for (c, &x) in key.iter().enumerate() {
                dst[c * PANEL + j] = x;
            }
        }
    });
    Some(out)
}

/// A head's keys as a tile kernel reads them.
#[derive(Clone, Copy)]
enum KeyTiles<'a> {
    /// `[T, hd]` row-major (the `gemm` kernel).
    Rows(&'a [f32]),
    /// Transposed panels from [`key_panels`] (the AVX-512 kernel).
    Panels(&'a [f32]),
}

/// One attention task's buffers, reused by the tasks a rayon worker runs.
struct AttentionScratch {
    hd: usize,
    /// Scores, then probabilities, of one tile: `[ATTN_ROWS, ATTN_KEYS]`.
    tile: Vec<f32>,
    /// Unnormalised outputs `[ATTN_ROWS, hd]`.
    acc: Vec<f32>,
    /// Running maximum and sum of exponentials per row.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Per row: the visible keys, and whether the row is uniform (no visible key).
    ranges: Vec<(usize, usize, bool)>,
}

impl AttentionScratch {
    fn new(hd: usize) -> Self {
        Self {
            hd,
            tile: vec![0.0; ATTN_ROWS * ATTN_KEYS],
            acc: vec![0.0; ATTN_ROWS * hd],
            max: vec![f32::NEG_INFINITY; ATTN_ROWS],
            sum: vec![0.0; ATTN_ROWS],
            ranges: Vec::with_capacity(ATTN_ROWS),
        }
    }

    /// Attention of the `rows × hd` queries `qb` over `t` keys and the `t × hd` values `vb`,
    /// row `r` seeing keys `range(r)`; leaves the unnormalised outputs in `acc` and their
    /// normalisers in `sum`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        qb: &[f32],
        keys: KeyTiles<'_>,
        vb: &[f32],
        range: impl Fn(usize) -> (usize, usize),
        rows: usize,
        t: usize,
        scale: f32,
    ) {
        let hd = self.hd;
        self.acc[..rows * hd].fill(0.0);
        self.max[..rows].fill(f32::NEG_INFINITY);
        self.sum[..rows].fill(0.0);
        self.ranges.clear();
        for r in 0..rows {
            let (lo, hi) = range(r);
            self.ranges.push(if lo < hi {
                (lo, hi, false)
            } else {
                (0, t, true)
            });
        }
        let lo = self.ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = self.ranges.iter().map(|r| r.1).max().unwrap_or(0);
        // Panels start at multiples of PANEL: a tile then covers whole panels.
        let mut c0 = match keys {
            KeyTiles::Rows(_) => lo,
            KeyTiles::Panels(_) => lo / PANEL * PANEL,
        };
        while c0 < hi {
            let cols = ATTN_KEYS.min(hi - c0);
            let stride = match keys {
                KeyTiles::Rows(kb) => {
                    let tile = &mut self.tile[..rows * cols];
                    // SAFETY: tile is rows×cols row-major; the q block rows×hd row-major; kᵀ
                    // is read from rows c0..c0+cols of the t×hd row-major k block (column
                    // stride hd, row stride 1); all within their slices.
                    unsafe {
                        gemm_f32(
                            rows,
                            cols,
                            hd,
                            Strided::rows(tile.as_mut_ptr(), cols),
                            Strided::rows(qb.as_ptr(), hd),
                            Strided::transposed(kb.as_ptr().add(c0 * hd), hd),
                            Store::Overwrite(scale),
                            gemm::Parallelism::None,
                        );
                    }
                    cols
                }
                KeyTiles::Panels(kt) => {
                    let panels = cols.div_ceil(PANEL);
                    let first = c0 / PANEL * hd * PANEL;
                    avx512::scores(qb, hd, &kt[first..], panels, &mut self.tile, rows, scale);
                    ATTN_KEYS
                }
            };
            for r in 0..rows {
                let (rlo, rhi, uniform) = self.ranges[r];
                let visible = (rlo.clamp(c0, c0 + cols) - c0, rhi.clamp(c0, c0 + cols) - c0);
                let state = (&mut self.max[r], &mut self.sum[r]);
                softmax_tile_row(
                    &mut self.tile[r * stride..r * stride + cols],
                    visible,
                    uniform,
                    state,
                    &mut self.acc[r * hd..(r + 1) * hd],
                );
            }
            match keys {
                // SAFETY: acc is rows×hd row-major; the probabilities rows×cols row-major; v
                // rows c0..c0+cols of the t×hd row-major block.
                KeyTiles::Rows(_) => unsafe {
                    gemm_f32(
                        rows,
                        hd,
                        cols,
                        Strided::rows(self.acc.as_mut_ptr(), hd),
                        Strided::rows(self.tile.as_ptr(), cols),
                        Strided::rows(vb.as_ptr().add(c0 * hd), hd),
                        Store::Accumulate,
                        gemm::Parallelism::None,
                    );
                },
                KeyTiles::Panels(_) => avx512::weighted_values(
                    &self.tile,
                    &vb[c0 * hd..(c0 + cols) * hd],
                    hd,
                    &mut self.acc,
                    rows,
                ),
            }
            c0 += cols;
        }
    }
}

/// The AVX-512 tile kernels. Their safe wrappers check every bound, and are only reached
/// through [`TileKernel::Avx512`], which [`avx512_available`] gates.
mod avx512 {
    use super::{ATTN_KEYS, PANEL};
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Keys per pass of [`weighted_values`] (their values, 48 KiB at hd = 96, stay in L1/L2
    /// while every row block reads them).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const KEY_CHUNK: usize = 128;

    /// `tile[r][64p..64p + 64] = scale · Σ_c q[r][c] · kt[p][c][..]` for `r < rows`,
    /// `p < panels`: the scores of `rows` queries (`[rows, hd]`) against `panels` key panels
    /// (`[hd][64]` each), rows [`ATTN_KEYS`] apart.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(super) fn scores(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        panels: usize,
        tile: &mut [f32],
        rows: usize,
        scale: f32,
    ) {
        assert!(rows > 0 && panels * PANEL <= ATTN_KEYS);
        assert!(q.len() >= rows * hd && kt.len() >= panels * hd * PANEL);
        assert!(tile.len() >= rows * ATTN_KEYS);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(super::avx512_available());
            for p in 0..panels {
                let panel = kt[p * hd * PANEL..].as_ptr();
                let mut r = 0;
                while r < rows {
                    let (qr, out) = (
                        q[r * hd..].as_ptr(),
                        tile[r * ATTN_KEYS + p * PANEL..].as_mut_ptr(),
                    );
                    // SAFETY: AVX-512F is available (asserted); the kernel reads R rows of hd
                    // queries from qr, hd × 64 keys from panel and writes R × 64 scores from
                    // out (rows ATTN_KEYS apart), all within the slices checked above.
                    unsafe {
                        match rows - r {
                            6.. => score_rows::<6>(qr, hd, panel, out, scale),
                            4 | 5 => score_rows::<4>(qr, hd, panel, out, scale),
                            _ => score_rows::<1>(qr, hd, panel, out, scale),
                        }
                    }
                    r += match rows - r {
                        6.. => 6,
                        4 | 5 => 4,
                        _ => 1,
                    };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the AVX-512 attention kernel is x86-64 only");
    }

    /// `acc[r][..] += Σ_j p[r][j] · v[j][..]` for `r < rows` and the `n = v.len() / hd` keys
    /// of `v` (`[n, hd]`); `p` rows [`ATTN_KEYS`] apart, `acc` rows `hd` apart; `hd` a multiple
    /// of 16.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(super) fn weighted_values(p: &[f32], v: &[f32], hd: usize, acc: &mut [f32], rows: usize) {
        let n = v.len() / hd;
        assert!(hd.is_multiple_of(16) && rows > 0 && n <= ATTN_KEYS);
        assert!(p.len() >= (rows - 1) * ATTN_KEYS + n && acc.len() >= rows * hd);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(super::avx512_available());
            for j0 in (0..n).step_by(KEY_CHUNK) {
                let keys = KEY_CHUNK.min(n - j0);
                for c0 in (0..hd).step_by(96) {
                    let vectors = (hd - c0).min(96) / 16;
                    let mut r = 0;
                    while r < rows {
                        let four = rows - r >= 4;
                        let pr = p[r * ATTN_KEYS + j0..].as_ptr();
                        let vr = v[j0 * hd + c0..].as_ptr();
                        let ar = acc[r * hd + c0..].as_mut_ptr();
                        // SAFETY: AVX-512F is available (asserted); the kernel reads 4 (or 1)
                        // rows of `keys` probabilities from pr, `keys` rows of 16·vectors
                        // values from vr (hd apart) and updates as many rows of 16·vectors
                        // sums from ar (hd apart): within the slices checked above.
                        unsafe {
                            macro_rules! by_width {
                                ($rows:literal) => {
                                    match vectors {
                                        1 => weighted_rows::<$rows, 1>(pr, vr, hd, keys, ar),
                                        2 => weighted_rows::<$rows, 2>(pr, vr, hd, keys, ar),
                                        3 => weighted_rows::<$rows, 3>(pr, vr, hd, keys, ar),
                                        4 => weighted_rows::<$rows, 4>(pr, vr, hd, keys, ar),
                                        5 => weighted_rows::<$rows, 5>(pr, vr, hd, keys, ar),
                                        _ => weighted_rows::<$rows, 6>(pr, vr, hd, keys, ar),
                                    }
                                };
                            }
                            if four {
                                by_width!(4)
                            } else {
                                by_width!(1)
                            }
                        }
                        r += if four { 4 } else { 1 };
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the AVX-512 attention kernel is x86-64 only");
    }

    /// `R` rows × 64 scores: 4·R accumulators, each step a broadcast query value times four
    /// vectors of keys.
    ///
    /// # Safety
    /// AVX-512F; `q` addresses `R` rows of `hd` (`hd` apart), `panel` `hd × 64`, `out` `R` rows
    /// of 64 ([`ATTN_KEYS`] apart).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn score_rows<const R: usize>(
        q: *const f32,
        hd: usize,
        panel: *const f32,
        out: *mut f32,
        scale: f32,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for c in 0..hd {
                let k = panel.add(c * PANEL);
                let k = [
                    _mm512_loadu_ps(k),
                    _mm512_loadu_ps(k.add(16)),
                    _mm512_loadu_ps(k.add(32)),
                    _mm512_loadu_ps(k.add(48)),
                ];
                for (i, row) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*q.add(i * hd + c));
                    for (s, &kv) in row.iter_mut().zip(&k) {
                        *s = _mm512_fmadd_ps(a, kv, *s);
                    }
                }
            }
            let scale = _mm512_set1_ps(scale);
            for (i, row) in acc.iter().enumerate() {
                for (j, &s) in row.iter().enumerate() {
                    _mm512_storeu_ps(out.add(i * ATTN_KEYS + 16 * j), _mm512_mul_ps(s, scale));
                }
            }
        }
    }

    /// `R` rows × `16·C` outputs over `n` keys: R·C accumulators, each step a broadcast
    /// probability times C vectors of one value row.
    ///
    /// # Safety
    /// AVX-512F; `p` addresses `R` rows of `n` ([`ATTN_KEYS`] apart), `v` `n` rows of `16·C`
    /// (`hd` apart), `acc` `R` rows of `16·C` (`hd` apart).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_rows<const R: usize, const C: usize>(
        p: *const f32,
        v: *const f32,
        hd: usize,
        n: usize,
        acc: *mut f32,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut sums = [[_mm512_setzero_ps(); C]; R];
            for (i, row) in sums.iter_mut().enumerate() {
                for (c, s) in row.iter_mut().enumerate() {
                    *s = _mm512_loadu_ps(acc.add(i * hd + 16 * c));
                }
            }
            for j in 0..n {
                let vr = v.add(j * hd);
                let mut vals = [_mm512_setzero_ps(); C];
                for (c, x) in vals.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(vr.add(16 * c));
                }
                for (i, row) in sums.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*p.add(i * ATTN_KEYS + j));
                    for (s, &x) in row.iter_mut().zip(&vals) {
                        *s = _mm512_fmadd_ps(a, x, *s);
                    }
                }
            }
            for (i, row) in sums.iter().enumerate() {
                for (c, &s) in row.iter().enumerate() {
                    _mm512_storeu_ps(acc.add(i * hd + 16 * c), s);
                }
            }
        }
    }
}

/// The largest element, in eight lanes (a vectorised reduction; `-inf` for an empty slice).
#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let rest = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// One row of an attention tile through the online softmax: its scores `row` become
/// probabilities (exponentials relative to the row's running maximum; 0 outside the visible
/// keys `visible`, all scores 0 for a `uniform` row), the running `(max, sum)` is updated, and
/// the row's unnormalised output `acc` rescaled when the maximum moved.
#[inline]
fn softmax_tile_row(
    row: &mut [f32],
    visible: (usize, usize),
    uniform: bool,
    state: (&mut f32, &mut f32),
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { softmax_tile_row_avx2(row, visible, uniform, state, acc) };
    }
    softmax_tile_row_portable(row, visible, uniform, state, acc)
}

/// [`softmax_tile_row`] compiled for AVX2: the exponentials in eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_tile_row_avx2(
    row: &mut [f32],
    visible: (usize, usize),
    uniform: bool,
    state: (&mut f32, &mut f32),
    acc: &mut [f32],
) {
    softmax_tile_row_portable(row, visible, uniform, state, acc)
}

#[inline(always)]
fn softmax_tile_row_portable(
    row: &mut [f32],
    (a, e): (usize, usize),
    uniform: bool,
    (max, sum): (&mut f32, &mut f32),
    acc: &mut [f32],
) {
    if a >= e {
        row.fill(0.0);
        return;
    }
    row[..a].fill(0.0);
    row[e..].fill(0.0);
    let seen = &mut row[a..e];
    if uniform {
        seen.fill(0.0);
    }
    let old = *max;
    let new = old.max(max_of(seen));
    let tile_sum = exp_sum(seen, new);
    if old != new && old != f32::NEG_INFINITY {
        let correction = exp_f32(old - new);
        *sum *= correction;
        for x in acc.iter_mut() {
            *x *= correction;
        }
    }
    *max = new;
    *sum += tile_sum;
}

/// `xs[i] = exp(xs[i] - m)`, returning their sum: one pass, eight lanes.
#[inline(always)]
fn exp_sum(xs: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c.iter_mut()) {
            *x = exp_f32(*x - m);
            *l += *x;
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - m);
        total += *x;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of one (batch, head) in f64, from the definition: row `r` over keys
    /// `ranges[r]`, or uniform over all keys when that range is empty.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        hd: usize,
        ranges: &[(usize, usize)],
    ) -> Vec<f64> {
        let t = k.len() / hd;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = Vec::new();
        for (r, &(lo, hi)) in ranges.iter().enumerate() {
            let (lo, hi, uniform) = if lo < hi {
                (lo, hi, false)
            } else {
                (0, t, true)
            };
            let scores: Vec<f64> = (lo..hi)
                .map(|j| {
                    if uniform {
                        return 0.0;
                    }
                    (0..hd)
                        .map(|c| f64::from(q[r * hd + c]) * f64::from(k[j * hd + c]))
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..hd {
                let y: f64 = (lo..hi)
                    .zip(&e)
                    .map(|(j, w)| w * f64::from(v[j * hd + c]))
                    .sum();
                out.push(y / z);
            }
        }
        out
    }

    /// Both tile kernels against the definition, over head widths of one to seven vectors
    /// (one and two column passes), query blocks with every row remainder, key counts around
    /// the panel and tile sizes, and ranges that start and end inside panels, skip whole
    /// tiles, or are empty.
    #[test]
    fn both_tile_kernels_match_the_definition() {
        let mut kernels = vec![TileKernel::Gemm];
        if avx512_available() {
            kernels.push(TileKernel::Avx512);
        } else {
            eprintln!("no AVX-512F on this CPU: only the gemm kernel is run");
        }
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        for &(h, s, t, hd) in &[
            (1usize, 1usize, 1usize, 16usize),
            (2, 5, 63, 32),
            (1, 70, 65, 96),
            (2, 131, 600, 96),
            (1, 9, 1100, 112),
            (1, 64, 640, 48),
        ] {
            let ranges: Vec<(usize, usize)> = (0..s)
                .map(|r| match r % 7 {
                    0 => (0, (r + 1).min(t)),
                    1 => (3 % t, t),
                    2 => (t / 2, t / 2), // empty: uniform
                    3 => ((r * 13) % t, t.min((r * 13) % t + 70)),
                    4 => (t.saturating_sub(1), t),
                    _ => (0, t),
                })
                .collect();
            let mask = KeyRanges::new(1, s, t, ranges.clone()).unwrap();
            let q: Vec<f32> = (0..h * s * hd).map(|_| next()).collect();
            let kv: Vec<f32> = (0..2 * h * t * hd).map(|_| next()).collect();
            for &kernel in &kernels {
                let got = attention_rows(
                    Heads::new(&q, [1, h, s, hd], 0, h),
                    Heads::new(&kv, [1, 2 * h, t, hd], 0, h),
                    Heads::new(&kv, [1, 2 * h, t, hd], h, h),
                    &mask,
                    kernel,
                );
                for hi in 0..h {
                    let want = reference(
                        &q[hi * s * hd..(hi + 1) * s * hd],
                        &kv[hi * t * hd..(hi + 1) * t * hd],
                        &kv[(h + hi) * t * hd..(h + hi + 1) * t * hd],
                        hd,
                        &ranges,
                    );
                    for r in 0..s {
                        for c in 0..hd {
                            let g = f64::from(got[r * h * hd + hi * hd + c]);
                            let w = want[r * hd + c];
                            assert!(
                                (g - w).abs() <= 2e-5 * w.abs().max(1.0),
                                "{kernel:?} h{h} s{s} t{t} hd{hd}: head {hi} [{r},{c}] {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
