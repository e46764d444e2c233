//! The bf16 linear on CPUs with AMX (Intel Sapphire Rapids on): the products of
//! [`bf16_dot`](super::bf16_dot) — f32 activations rounded to bf16, bf16 weights (or int8 / fp8
//! codes, exact in bf16, times each output feature's scale), sums in f32 — done by the tile
//! unit's `tdpbf16ps`, which multiplies a 16 × 32 bf16 tile by a 32 × 16 one per instruction.
//!
//! Layout: the activations are packed once per call as `[m][pairs]` u32 pairs of consecutive
//! inputs (rows and pairs padded with zeros to whole tiles); a task packs a panel of [`NR`]
//! output features as `[kc][NR]` pairs (the tile unit's pair-interleaved layout for its right
//! operand, which `bf16_dot` also uses) and runs every block of [`MR`] rows over it, keeping a
//! 32 × 32 block of sums in four tile registers.
//!
//! The Linux kernel hands out the tile registers only to processes that ask for them
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`): [`available`] asks once. The instructions are written
//! as inline assembly: Rust's AMX intrinsics are not stable.

use rayon::prelude::*;

use super::bf16_dot::{activations_bf16, pack_panel, DotWeight};

/// Output features per panel (four tiles of 16): `bf16_dot`'s panel, packed by its
/// [`pack_panel`].
const NR: usize = super::bf16_dot::NR;
/// Rows per block (two tiles of 16).
const MR: usize = 32;
/// Input pairs per tile (a tile row is 64 bytes: 16 pairs).
const TK: usize = 16;
/// Input pairs per pass over a panel (`KC · NR · 4` bytes, 128 KiB, stays in L2).
const KC: usize = 512;

/// Whether this CPU, and the kernel, run [`linear_rows`]: AMX-TILE and AMX-BF16, the tile
/// registers granted to this process, and neither `OMNIGEN_NO_AMX` nor `OMNIGEN_NO_BF16_DOT`
/// set.
pub(super) fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            // OMNIGEN_NO_BF16_DOT selects the widening f32 path, which this kernel would bypass.
            if std::env::var_os("OMNIGEN_NO_AMX").is_some()
                || std::env::var_os("OMNIGEN_NO_BF16_DOT").is_some()
            {
                return false;
            }
            // Leaf 7 read only where the CPU has it (its maximum leaf, from leaf 0).
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            let leaf7 = (__cpuid(0).eax >= 7).then(|| __cpuid_count(7, 0));
            let Some(leaf7) = leaf7 else { return false };
            let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
            amx_bf16 && amx_tile && request_tile_permission()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: whether Linux grants this process the
/// tile registers (process-wide, for every thread).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a raw syscall that only changes this process's permitted extended state; it
    // clobbers rcx and r11 as every syscall does.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// `x · W[rows]ᵀ (+ bias[rows])` for f32 `x` `[m, k]` and a weight `[out, k]`:
/// `[m, rows.len()]`, as [`bf16_dot::linear_rows`](super::bf16_dot) computes it. Only call
/// where [`available`] is true.
pub(super) fn linear_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: DotWeight<'_>,
    rows: std::ops::Range<usize>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        available(),
        "the AMX linear needs AMX-BF16 and the tile registers"
    );
    assert!(x.len() >= m * k && w.len() >= rows.end * k);
    let n = rows.len();
    let mut out = super::host::bias_rows(m, bias, rows.clone());
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let pairs = k.div_ceil(2).div_ceil(TK) * TK;
    let padded_rows = m.div_ceil(MR) * MR;
    let xb = activations_bf16(x, m, k, padded_rows, pairs);
    let out_ptr = super::host::OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(NR)).into_par_iter().for_each_init(
        || (Vec::new(), vec![0f32; MR * NR]),
        |(panel, sums): &mut (Vec<u32>, Vec<f32>), p| {
            let j0 = p * NR;
            let cols = NR.min(n - j0);
            let scale = w.panel_scales(rows.start + j0, cols);
            // SAFETY: `available` checked the CPU and the permission; the configuration is
            // this thread's.
            unsafe { configure_tiles() };
            for kc0 in (0..pairs).step_by(KC) {
                let kc = KC.min(pairs - kc0);
                pack_panel(w, k, rows.start + j0, cols, kc0, kc, panel);
                for i0 in (0..padded_rows).step_by(MR) {
                    for half in 0..2 {
                        // SAFETY: the tiles read rows i0..i0+32 of `xb` (padded_rows × pairs
                        // u32) at pairs kc0..kc0+kc, columns 32·half..+32 of the panel
                        // (kc × NR u32), and write the 32 × 32 block at that column of `sums`
                        // (MR × NR f32).
                        unsafe {
                            block(
                                xb.as_ptr().add(i0 * pairs + kc0),
                                pairs,
                                panel.as_ptr().add(32 * half),
                                kc,
                                sums.as_mut_ptr().add(32 * half),
                            );
                        }
                    }
                    let valid = MR.min(m.saturating_sub(i0));
                    for (r, src) in sums.chunks_exact(NR).take(valid).enumerate() {
                        // SAFETY: columns j0..j0+cols of row i0 + r < m of the m×n output,
                        // owned by this task (its panel's columns).
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out_ptr.get().add((i0 + r) * n + j0),
                                cols,
                            )
                        };
                        for ((d, &s), &c) in dst.iter_mut().zip(src).zip(&scale) {
                            *d += s * c;
                        }
                    }
                }
            }
            // SAFETY: the tiles were configured above; releasing them lets the kernel skip
            // saving their state at context switches.
            unsafe { release_tiles() };
        },
    );
    out
}

/// Tile configuration (palette 1): the eight tiles of 16 rows × 64 bytes.
///
/// # Safety
/// AMX-TILE is available and permitted ([`available`]).
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles() {
    let mut config = [0u8; 64];
    config[0] = 1;
    for t in 0..8 {
        config[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        config[48 + t] = 16;
    }
    // SAFETY: the caller's contract; `config` is the 64-byte configuration.
    unsafe {
        std::arch::asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly));
    }
}

/// # Safety
/// As [`configure_tiles`].
#[cfg(target_arch = "x86_64")]
unsafe fn release_tiles() {
    // SAFETY: the caller's contract.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// `sums[r][c] = Σ_q xb[r][q] · panel[q][c]` for a block of 32 rows × 32 columns (`sums` rows
/// [`NR`] floats apart): tiles 0–3 the sums (rows 0–15 and 16–31 × columns 0–15 and 16–31),
/// 4–5 the rows, 6–7 the columns.
///
/// # Safety
/// Tiles configured ([`configure_tiles`]); `xb` addresses 32 rows (stride `x_stride` u32) of `kc`
/// pairs, `kc` a multiple of [`TK`]; `panel` `kc` rows (stride [`NR`] u32) of 32; `sums` 32 rows
/// (stride [`NR`] f32) of 32.
#[cfg(target_arch = "x86_64")]
unsafe fn block(xb: *const u32, x_stride: usize, panel: *const u32, kc: usize, sums: *mut f32) {
    use std::arch::asm;
    let (xs, ps, ss) = (x_stride * 4, NR * 4, NR * 4);
    // SAFETY: the caller's contract bounds every tile load and store below.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for q in (0..kc).step_by(TK) {
            let a0 = xb.add(q);
            let a1 = xb.add(16 * x_stride + q);
            let b0 = panel.add(q * NR);
            let b1 = panel.add(q * NR + 16);
            asm!(
                "tileloadd tmm4, [{a0} + {xs}*1]",
                "tileloadd tmm5, [{a1} + {xs}*1]",
                "tileloadd tmm6, [{b0} + {ps}*1]",
                "tileloadd tmm7, [{b1} + {ps}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                xs = in(reg) xs,
                ps = in(reg) ps,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{s0} + {ss}*1], tmm0",
            "tilestored [{s1} + {ss}*1], tmm1",
            "tilestored [{s2} + {ss}*1], tmm2",
            "tilestored [{s3} + {ss}*1], tmm3",
            s0 = in(reg) sums,
            s1 = in(reg) sums.add(16),
            s2 = in(reg) sums.add(16 * NR),
            s3 = in(reg) sums.add(16 * NR + 16),
            ss = in(reg) ss,
            options(nostack)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure_tiles() {
    unreachable!("AMX is x86-64 only");
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn release_tiles() {}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_: *const u32, _: usize, _: *const u32, _: usize, _: *mut f32) {
    unreachable!("AMX is x86-64 only");
}

#[cfg(test)]
mod tests {
    use super::super::bf16_dot::tests::{check_bf16_weights, check_int8_codes};
    use super::*;

    /// The tile unit over shapes with every remainder: rows past a multiple of 16 and [`MR`],
    /// features past a multiple of 16 and [`NR`], an odd input width, inputs past a whole tile
    /// and more than [`KC`] pairs.
    #[test]
    fn amx_linear_matches_the_rounded_product() {
        if !available() {
            eprintln!("no AMX on this CPU (or not granted): the kernel is not run");
            return;
        }
        check_bf16_weights(
            linear_rows,
            &[
                (1, 3, 1, 0),
                (7, 33, 70, 2),
                (45, 2 * (2 * KC) + 37, 130, 1),
                (32, 64, 64, 0),
                (33, 96, 100, 3),
            ],
        );
    }

    /// int8 codes, and the same call through `bf16_dot` where that runs: the two kernels agree
    /// to f32 rounding.
    #[test]
    fn amx_int8_codes_match_the_dequantized_product_and_bf16_dot() {
        if !available() {
            eprintln!("no AMX on this CPU (or not granted): the kernel is not run");
            return;
        }
        let got = check_int8_codes(linear_rows, 41);
        if super::super::bf16_dot::available() {
            let dot = check_int8_codes(super::super::bf16_dot::linear_rows, 41);
            for (a, b) in got.iter().zip(&dot) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}
