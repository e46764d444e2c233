//! Each op as dispatched (the host kernel, on the default CPU backend in f32) against the
//! portable op it replaces: the parity fixtures' models are too narrow to reach some host paths
//! (the shifted-GEMM convolution), and CI has no GPU to run the portable ones in f32.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::{DType, Tensor, TensorData};

use omnigen_core::{QuantScheme, QuantizedTensor};

use super::{
    host, mask, portable, winograd, Conv3x3Kernel, Conv3x3Rule, HeadRange, KernelBackend,
    KeyRanges, LinearLayer, QuantizedLinear, CONV3X3_RULE,
};
use crate::loader::Loader;
use crate::ops;
use crate::weights::RandomWeights;
use crate::{default_device, DefaultBackend as B};

/// Deterministic values of about unit size that differ for every `seed`.
fn normal<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| 1.7 * ((i as f32 * 0.618 + seed as f32 * 1.3).sin() * 43.758).fract())
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &default_device())
}

fn loader(reader: &RandomWeights) -> Loader<'_, B> {
    Loader::new(reader, &default_device(), DType::F32)
}

fn assert_close<const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>, tol: f32) {
    assert_eq!(got.dims(), want.dims());
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff <= tol, "max abs diff {diff} > {tol}");
}

/// A layer's op as dispatched (`host`) against its portable form (`portable`) on input `x`.
fn assert_layer_op_close<M>(
    layer: &M,
    x: Tensor<B, 4>,
    host: fn(&M, Tensor<B, 4>) -> Tensor<B, 4>,
    portable: fn(&M, Tensor<B, 4>) -> Tensor<B, 4>,
    tol: f32,
) {
    assert_close(host(layer, x.clone()), portable(layer, x), tol);
}

// The parity suites cover the host kernels only if the default CPU backend takes them.
const _: () = assert!(<B as KernelBackend>::HOST_KERNELS && <B as KernelBackend>::HOST_MEMORY);

#[test]
fn rms_norm_host_matches_portable() {
    let (x, w) = (normal([2, 5, 40], 1), normal([40], 2));
    assert_close(
        ops::rms_norm(x.clone(), w.clone(), 1e-5),
        portable::rms_norm(x, w, 1e-5),
        1e-5,
    );
}

#[test]
fn silu_mul_host_matches_portable() {
    let (g, u) = (normal([3, 7, 33], 3), normal([3, 7, 33], 4));
    assert_close(
        ops::silu_mul(g.clone(), u.clone()),
        portable::silu_mul(g, u),
        1e-5,
    );
}

#[test]
fn rope_host_matches_portable_on_a_head_range() {
    let x = normal([2, 6, 5, 8], 5);
    for (cos, sin) in [
        (normal([2, 1, 5, 8], 6), normal([2, 1, 5, 8], 7)),
        (normal([1, 1, 5, 8], 8), normal([1, 1, 5, 8], 9)),
    ] {
        let range = HeadRange::new(x.clone(), 2, 3);
        assert_close(
            ops::rope(range.clone(), cos.clone(), sin.clone()),
            portable::rope(range.narrowed(), cos, sin),
            1e-6,
        );
    }
}

/// The mask's additive bias built directly from its dense form (the official formula).
fn dense_bias(mask: &KeyRanges) -> Tensor<B, 4> {
    let [b, s, t] = mask.dims();
    let bias: Vec<f32> = mask
        .to_dense()
        .unwrap()
        .into_iter()
        .map(|m| (1.0 - m) * f32::MIN)
        .collect();
    Tensor::from_data(TensorData::new(bias, [b, 1, s, t]), &default_device())
}

#[test]
fn attention_host_matches_portable_with_a_mask() {
    // q from heads 0..2 and k, v from heads 2..4 and 4..6 of one fused tensor (S = T); rows
    // causal, bidirectional in a span, or with no visible key at all.
    let (b, h, s, hd) = (2, 2, 9, 8);
    let fused = normal([b, 3 * h, s, hd], 10);
    let ranges = (0..b * s)
        .map(|i| match (i / s, i % s) {
            (_, 4) => (3, 3),
            (0, r) if (2..6).contains(&r) => (1, 6),
            (1, r) => (r / 2, s - r / 3),
            (_, r) => (0, r + 1),
        })
        .collect();
    let mask = KeyRanges::new(b, s, s, ranges).unwrap();
    let q = HeadRange::new(fused.clone(), 0, h);
    let k = HeadRange::new(fused.clone(), h, h);
    let v = HeadRange::new(fused, 2 * h, h);
    let host = ops::attention_bias::<B>(&mask, DType::F32, &default_device());
    assert_eq!(
        host.bytes(),
        (b * s * 8) as u64,
        "the host form keeps only the ranges"
    );
    let (qn, kn, vn) = (
        q.clone().narrowed(),
        k.clone().narrowed(),
        v.clone().narrowed(),
    );
    let whole = portable::attention(
        qn.clone(),
        kn.clone(),
        vn.clone(),
        Some(dense_bias(&mask)),
        None,
    );
    assert_close(
        ops::attention(q.clone(), k.clone(), v.clone(), &host),
        whole.clone(),
        1e-5,
    );
    // The query tiles of the GPU backends (three rows per tile: three tiles) against burn's
    // attention in one piece.
    let tile = (b * h * s * 3) as u64;
    assert_close(
        portable::attention(qn, kn, vn, Some(dense_bias(&mask)), Some(tile)),
        whole,
        1e-5,
    );
    assert_eq!(
        ops::attention_scores_held(tile, b, h, s, s),
        (b * h * 3 * s) as u64
    );
    // Two blocks of query rows over keys spanning three tiles, with ranges starting and ending
    // inside tiles and a block that skips whole tiles (as a cache's T > S does).
    let (s, t) = (70, 600);
    let (q, kv) = (normal([1, h, s, hd], 11), normal([1, h, t, hd], 12) * 3.0);
    let ranges = (0..s)
        .map(|r| match r {
            0..=9 => (0, 5 + r),
            10..=63 => (100 + r, 300 + 4 * r),
            _ => (257, t),
        })
        .collect();
    let mask = KeyRanges::new(1, s, t, ranges).unwrap();
    let host = ops::attention_bias::<B>(&mask, DType::F32, &default_device());
    let want = portable::attention(
        q.clone(),
        kv.clone(),
        kv.clone() * 0.5,
        Some(dense_bias(&mask)),
        None,
    );
    // Tiles of one query row, and a tile smaller than one row (still one row).
    for tile in [(h * t) as u64, 1] {
        assert_close(
            portable::attention(
                q.clone(),
                kv.clone(),
                kv.clone() * 0.5,
                Some(dense_bias(&mask)),
                Some(tile),
            ),
            want.clone(),
            1e-5,
        );
    }
    assert_close(
        ops::attention(
            HeadRange::all(q.clone()),
            HeadRange::all(kv.clone()),
            HeadRange::all(kv.clone() * 0.5),
            &host,
        ),
        want.clone(),
        1e-5,
    );
    // The additive bias other backends get, built on the device from the ranges.
    let bf16_form = ops::attention_bias::<B>(&mask, DType::BF16, &default_device());
    assert_eq!(bf16_form.bytes(), (s * t * 2) as u64);
    assert_close(
        mask::additive_bias::<B>(&mask, DType::F32, &default_device()),
        dense_bias(&mask),
        0.0,
    );
}

fn group_norm(channels: usize, groups: usize) -> GroupNorm<B> {
    GroupNorm {
        gamma: Some(Param::from_tensor(normal([channels], 14))),
        beta: Some(Param::from_tensor(normal([channels], 15))),
        num_groups: groups,
        num_channels: channels,
        epsilon: 1e-6,
        affine: true,
    }
}

#[test]
fn group_norm_silu_host_matches_portable() {
    let gn = group_norm(12, 4);
    let x = normal([2, 12, 5, 3], 16) * 3.0 + 1.0;
    assert_layer_op_close(
        &gn,
        x,
        ops::group_norm_silu,
        portable::group_norm_silu,
        1e-5,
    );
}

#[test]
fn shifted_gemm_conv_matches_conv2d() {
    let (c_in, c_out) = (256, 40);
    let conv: Conv2d<B> = loader(&RandomWeights { seed: 3 })
        .conv2d(c_in, c_out, 3, 1, 1)
        .unwrap();
    for (b, h, w) in [(1, 5, 7), (2, 8, 3)] {
        let x = normal([b, c_in, h, w], 17);
        assert_layer_op_close(&conv, x, ops::conv3x3, portable::conv3x3, 1e-4);
    }
}

/// The dispatch before Winograd: shifted GEMMs from 256 input channels, else burn's conv2d.
fn shifted_gemm_rule(_: usize, c_in: usize, _: usize, _: usize, _: usize) -> Conv3x3Kernel {
    if c_in >= 256 {
        Conv3x3Kernel::ShiftedGemm
    } else {
        Conv3x3Kernel::Portable
    }
}

/// `f` with [`CONV3X3_RULE`] set to `rule` (`None`: the real dispatch).
fn with_conv3x3_rule<R>(rule: Option<Conv3x3Rule>, f: impl FnOnce() -> R) -> R {
    CONV3X3_RULE.set(rule);
    let r = f();
    CONV3X3_RULE.set(None);
    r
}

/// Max abs difference of `got` from `want`, and the same relative to `want`'s max abs value.
fn abs_and_rel_diff(got: Tensor<B, 4>, want: Tensor<B, 4>) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims());
    let scale: f32 = want.clone().abs().max().into_scalar();
    let diff: f32 = (got - want).abs().max().into_scalar();
    (diff, diff / scale.max(f32::MIN_POSITIVE))
}

/// A 3×3 convolution `c_in` → `c_out` with weights at the checkpoint scale of
/// [`RandomWeights`] (uniform in `±1/sqrt(9·c_in)`, bias `±0.1`).
fn conv3x3_layer(c_in: usize, c_out: usize, seed: u64) -> Conv2d<B> {
    loader(&RandomWeights { seed })
        .conv2d(c_in, c_out, 3, 1, 1)
        .unwrap()
}

/// Both Winograd kernels, called directly, against `conv2d`.
fn winograd_kernels(conv: &Conv2d<B>, x: Tensor<B, 4>) -> [(&'static str, Tensor<B, 4>); 2] {
    let (w, b) = (conv.weight.val(), conv.bias.as_ref().unwrap().val());
    [
        (
            "F(2x2)",
            winograd::conv3x3_tensor(&winograd::F2, x.clone(), false, w.clone(), b.clone()),
        ),
        (
            "F(4x4)",
            winograd::conv3x3_tensor(&winograd::F4, x, false, w, b),
        ),
    ]
}

#[test]
fn winograd_conv_matches_conv2d_on_odd_shapes() {
    // Sizes that are not multiples of either tile (and a 1×1 image, all border), one and
    // several images, channel counts on both sides of the dispatch thresholds.
    for (b, c_in, c_out, h, w) in [
        (1, 3, 5, 7, 9),
        (2, 17, 6, 5, 3),
        (1, 8, 4, 1, 1),
        (3, 70, 33, 13, 11),
        (2, 300, 20, 6, 10),
        (1, 64, 64, 18, 17),
    ] {
        let conv = conv3x3_layer(c_in, c_out, 21);
        let x = normal([b, c_in, h, w], 22);
        let want = portable::conv3x3(&conv, x.clone());
        for (name, got) in winograd_kernels(&conv, x) {
            let (abs, rel) = abs_and_rel_diff(got, want.clone());
            assert!(
                rel < 1e-5,
                "{name} {b}×{c_in}→{c_out}×{h}×{w}: max abs diff {abs:e} (rel {rel:e})"
            );
        }
    }
}

#[test]
fn conv3x3_dispatch_matches_conv2d() {
    // Each kernel the dispatch picks, with channel counts and image sizes on both sides of
    // its thresholds.
    let mut seen = Vec::new();
    for (b, c_in, c_out, h, w) in [
        (2, 4, 16, 9, 7),
        (1, 32, 8, 10, 10),
        (2, 64, 24, 11, 6),
        (1, 128, 16, 24, 25),
        (1, 256, 16, 5, 7),
        (2, 512, 8, 4, 6),
        (3, 300, 7, 17, 9),
    ] {
        let conv = conv3x3_layer(c_in, c_out, 23);
        let x = normal([b, c_in, h, w], 24);
        let (abs, rel) =
            abs_and_rel_diff(ops::conv3x3(&conv, x.clone()), portable::conv3x3(&conv, x));
        let kernel = Conv3x3Kernel::choose(b, c_in, c_out, h, w);
        assert!(
            rel < 1e-5,
            "{kernel:?} {b}×{c_in}→{c_out}×{h}×{w}: max abs diff {abs:e} (rel {rel:e})"
        );
        seen.push(kernel);
    }
    assert!(seen.contains(&Conv3x3Kernel::Winograd2) && seen.contains(&Conv3x3Kernel::Winograd4));
}

#[test]
fn upsample_conv_matches_conv2d_of_the_upsampled_input() {
    for (b, c_in, c_out, h, w) in [(1, 5, 3, 3, 4), (2, 40, 9, 7, 5), (1, 64, 16, 16, 12)] {
        let conv = conv3x3_layer(c_in, c_out, 31);
        let x = normal([b, c_in, h, w], 32);
        let want = portable::conv3x3(&conv, portable::upsample_nearest2x(x.clone()));
        let (abs, rel) = abs_and_rel_diff(ops::upsample2x_conv3x3(&conv, x), want);
        assert!(
            rel < 1e-5,
            "{b}×{c_in}→{c_out}×{h}×{w}: max abs diff {abs:e} (rel {rel:e})"
        );
    }
}

/// A `Downsample2D` convolution `c_in` → `c_out` (3×3, stride 2, padding bottom/right).
fn downsample_layer(c_in: usize, c_out: usize, seed: u64) -> Conv2d<B> {
    let mut conv = loader(&RandomWeights { seed })
        .conv2d(c_in, c_out, 3, 2, 0)
        .unwrap();
    conv.padding = burn::nn::PaddingConfig2d::Explicit(0, 0, 1, 1);
    conv
}

#[test]
fn downsample_conv_matches_conv2d() {
    // Even sizes take the polyphase kernel; odd ones fall back to conv2d (checked too).
    for (b, c_in, c_out, h, w) in [
        (1, 3, 5, 2, 2),
        (2, 40, 9, 8, 6),
        (1, 64, 64, 16, 20),
        (1, 8, 4, 7, 5),
    ] {
        let conv = downsample_layer(c_in, c_out, 41);
        let x = normal([b, c_in, h, w], 42);
        let want = conv.forward(x.clone());
        let got = ops::downsample_conv3x3(&conv, x);
        assert_eq!(got.dims(), [b, c_out, h / 2, w / 2]);
        let (abs, rel) = abs_and_rel_diff(got, want);
        assert!(
            rel < 1e-5,
            "{b}×{c_in}→{c_out}×{h}×{w}: max abs diff {abs:e} (rel {rel:e})"
        );
    }
}

/// CPU time of the encoder's stride-2 convolutions, burn's `conv2d` against the polyphase
/// kernel, at the SDXL encoder's sizes for a 512² image (best of 3).
/// `RAYON_NUM_THREADS=1 cargo test --release -p omnigen-models --lib downsample_cpu_time --
/// --ignored --nocapture`
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
#[ignore = "a measurement, seconds of CPU time"]
fn downsample_cpu_time() {
    crate::tune_host_allocator();
    for [c, h] in [[128, 512], [256, 256], [512, 128]] {
        let conv = downsample_layer(c, c, 43);
        let x = normal([1, c, h, h], 44);
        let gflop = 2.0 * 9.0 * (c * c * (h / 2) * (h / 2)) as f64 * 1e-9;
        let kernels: [(&str, &dyn Fn() -> Tensor<B, 4>); 2] = [
            ("burn conv2d", &|| conv.forward(x.clone())),
            ("polyphase GEMMs", &|| {
                ops::downsample_conv3x3(&conv, x.clone())
            }),
        ];
        let mut best = [f64::INFINITY; 2];
        for _ in 0..3 {
            for ((_, run), best) in kernels.iter().zip(&mut best) {
                let t0 = cpu_seconds();
                let y = run();
                *best = best.min(cpu_seconds() - t0);
                drop(y);
            }
        }
        for ((name, _), t) in kernels.iter().zip(best) {
            println!(
                "{c}ch {h}²→{}²  {name:<16} {t:.3} cpu-s  {:.1} GFLOP/cpu-s",
                h / 2,
                gflop / t
            );
        }
    }
}

/// The error figures of `ops/winograd.rs` and docs/performance.md: each host kernel against
/// the portable direct convolution at a VAE size (512 → 512 channels, 64×64).
/// `cargo test --release -p omnigen-models --lib winograd_error -- --ignored --nocapture`
#[test]
#[ignore = "seconds of convolution; prints the error figures"]
fn winograd_error_at_the_vae_scale() {
    let conv = conv3x3_layer(512, 512, 25);
    let x = normal([1, 512, 64, 64], 26);
    let want = portable::conv3x3(&conv, x.clone());
    let std: f32 = want.clone().powf_scalar(2.0).mean().sqrt().into_scalar();
    eprintln!("output std {std:.3}");
    let (w, b) = (conv.weight.val(), conv.bias.as_ref().unwrap().val());
    let shifted = host::conv3x3(x.clone(), w, b);
    for (name, got) in winograd_kernels(&conv, x)
        .into_iter()
        .chain([("shifted GEMM", shifted)])
    {
        let (abs, rel) = abs_and_rel_diff(got, want.clone());
        eprintln!("{name}: max abs diff {abs:.2e}, relative to max |y| {rel:.2e}");
        assert!(rel < 1e-4);
    }
}

/// A whole decode of the SDXL-architecture VAE (the committed medium config, random weights
/// at the checkpoint scale) with the dispatched kernels against one with burn's direct
/// `conv2d` for every 3×3 convolution: the error the Winograd kernels add end to end.
/// `cargo test --release -p omnigen-models --lib winograd_vae_decode -- --ignored --nocapture`
#[test]
#[ignore = "seconds: two decodes at the real width"]
fn winograd_vae_decode_matches_direct_convolutions() {
    let config = omnigen_core::VaeConfig::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benches/configs/medium/vae/config.json"
    ))
    .unwrap();
    let vae = crate::vae::AutoencoderKL::<B>::load(
        &RandomWeights { seed: 0 },
        &config,
        &default_device(),
        DType::F32,
    )
    .unwrap();
    let z = normal([1, 4, 32, 32], 29);
    let decode = |rule| with_conv3x3_rule(rule, || vae.decode(z.clone()).unwrap());
    let want = decode(Some(|_, _, _, _, _| Conv3x3Kernel::Portable));
    let rules: [(&str, Option<Conv3x3Rule>); 4] = [
        (
            "shifted GEMM",
            Some(|_, _, _, _, _| Conv3x3Kernel::ShiftedGemm),
        ),
        (
            "Winograd F(2x2)",
            Some(|_, _, _, _, _| Conv3x3Kernel::Winograd2),
        ),
        (
            "Winograd F(4x4)",
            Some(|_, _, _, _, _| Conv3x3Kernel::Winograd4),
        ),
        ("as dispatched", None),
    ];
    for (name, rule) in rules {
        let (abs, rel) = abs_and_rel_diff(decode(rule), want.clone());
        eprintln!("decode 256x256, {name}: max abs diff {abs:.2e} (relative to max |y| {rel:.2e})");
        assert!(rel < 1e-3);
    }
}

/// CPU seconds of a whole decode of the SDXL-architecture VAE (medium config, random weights)
/// to `OMNIGEN_DECODE_PX`² pixels (default 512), with the 3×3 kernels as dispatched against
/// the dispatch before Winograd ([`shifted_gemm_rule`]), in alternating rounds (best of 3;
/// `OMNIGEN_DECODE_RULE=Winograd` for the one whose name contains it).
/// `RAYON_NUM_THREADS=1 cargo test --release -p omnigen-models --lib vae_decode_cpu_time --
/// --ignored --nocapture`
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
#[ignore = "a measurement, minutes of CPU time"]
fn vae_decode_cpu_time() {
    crate::tune_host_allocator();
    let px: usize = std::env::var("OMNIGEN_DECODE_PX").map_or(512, |v| v.parse().unwrap());
    let config = omnigen_core::VaeConfig::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benches/configs/medium/vae/config.json"
    ))
    .unwrap();
    let vae = crate::vae::AutoencoderKL::<B>::load(
        &RandomWeights { seed: 0 },
        &config,
        &default_device(),
        DType::F32,
    )
    .unwrap();
    let z = normal([1, 4, px / 8, px / 8], 30);
    let rules: [(&str, Option<Conv3x3Rule>); 2] = [
        (
            "before (shifted GEMM >= 256 ch, else burn)",
            Some(shifted_gemm_rule),
        ),
        ("Winograd (as dispatched)", None),
    ];
    let only = std::env::var("OMNIGEN_DECODE_RULE").unwrap_or_default();
    let rules: Vec<_> = rules
        .into_iter()
        .filter(|(n, _)| n.contains(only.as_str()))
        .collect();
    let mut best = vec![f64::INFINITY; rules.len()];
    for _ in 0..3 {
        for ((_, rule), best) in rules.iter().zip(&mut best) {
            let t0 = cpu_seconds();
            let y = with_conv3x3_rule(*rule, || vae.decode(z.clone()).unwrap());
            *best = best.min(cpu_seconds() - t0);
            drop(y);
        }
    }
    for ((name, _), best) in rules.iter().zip(best) {
        eprintln!("decode {px}x{px}, {name}: {best:.2} CPU s");
    }
}

/// Process CPU time (all threads), seconds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// CPU seconds per call of each 3×3 kernel at the VAE's layer sizes, and the
/// direct-convolution GFLOP per CPU-second (best of 5); the data behind [`Conv3x3Kernel::choose`].
/// `RAYON_NUM_THREADS=1 cargo test --release -p omnigen-models --lib conv3x3_kernel_cpu_time
/// -- --ignored --nocapture` (`OMNIGEN_CONV_SIZES=c_in,c_out,h,w;...` for other sizes,
/// `OMNIGEN_CONV_KERNEL=F(4` for the kernels whose name contains it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
#[ignore = "a measurement, minutes of CPU time"]
fn conv3x3_kernel_cpu_time() {
    // As in the pipeline and the benches: freed buffers are reused rather than unmapped.
    crate::tune_host_allocator();
    let sizes: Vec<[usize; 4]> = match std::env::var("OMNIGEN_CONV_SIZES") {
        Ok(s) => s
            .split(';')
            .map(|t| {
                let v: Vec<usize> = t.split(',').map(|n| n.trim().parse().unwrap()).collect();
                [v[0], v[1], v[2], v[3]]
            })
            .collect(),
        Err(_) => vec![
            [512, 512, 64, 64],
            [256, 256, 128, 128],
            [128, 128, 128, 128],
        ],
    };
    for [c_in, c_out, h, w] in sizes {
        let conv = conv3x3_layer(c_in, c_out, 27);
        let x = normal([1, c_in, h, w], 28);
        let gflop = 2.0 * 9.0 * (c_in * c_out * h * w) as f64 * 1e-9;
        let (wt, bs) = (conv.weight.val(), conv.bias.as_ref().unwrap().val());
        let kernels: [(&str, &dyn Fn() -> Tensor<B, 4>); 4] = [
            ("burn conv2d", &|| portable::conv3x3(&conv, x.clone())),
            ("shifted GEMM", &|| {
                host::conv3x3(x.clone(), wt.clone(), bs.clone())
            }),
            ("Winograd F(2x2)", &|| {
                winograd::conv3x3_tensor(&winograd::F2, x.clone(), false, wt.clone(), bs.clone())
            }),
            ("Winograd F(4x4)", &|| {
                winograd::conv3x3_tensor(&winograd::F4, x.clone(), false, wt.clone(), bs.clone())
            }),
        ];
        let only = std::env::var("OMNIGEN_CONV_KERNEL").unwrap_or_default();
        let kernels: Vec<_> = kernels
            .into_iter()
            .filter(|(n, _)| n.contains(only.as_str()))
            .collect();
        // Rounds over all kernels in turn, so that a burst of load elsewhere on a shared
        // machine hits each of them alike; the best of the rounds is reported.
        let mut best = vec![f64::INFINITY; kernels.len()];
        for _ in 0..5 {
            for ((_, run), best) in kernels.iter().zip(&mut best) {
                let t0 = cpu_seconds();
                let y = run();
                *best = best.min(cpu_seconds() - t0);
                drop(y);
            }
        }
        for ((name, _), best) in kernels.iter().zip(best) {
            eprintln!(
                "{c_in}->{c_out} {h}x{w} {name}: {best:.4} CPU s, {:.1} GFLOP/CPU-s",
                gflop / best
            );
        }
    }
}

#[test]
fn linear_chunks_and_heads_match_linear() {
    let reader = RandomWeights { seed: 4 };
    let ld = loader(&reader);
    let with_bias: Linear<B> = ld.sub("a").linear(16, 24, true).unwrap();
    let x = normal([2, 3, 16], 18);
    let full = portable::linear(&with_bias, x.clone());
    let parts: [_; 2] = portable::linear_chunks(&with_bias, x.clone());
    assert_close(Tensor::cat(parts.to_vec(), 2), full, 1e-5);
    let no_bias: Linear<B> = ld.sub("b").linear(16, 24, false).unwrap();
    let full = portable::linear(&no_bias, x.clone()); // [B, S, 4·6]
    let heads = portable::linear_heads(&no_bias, x, 4); // [B, 4, S, 6]
    assert_close(heads.swap_dims(1, 2).reshape([2, 3, 24]), full, 1e-5);
}

/// Whether the backend lends `t`'s storage as is: a contiguous row-major tensor.
fn is_contiguous(t: Tensor<B, 2>) -> bool {
    match t.into_primitive() {
        burn::tensor::TensorPrimitive::Float(p) => <B as KernelBackend>::float_bytes(&p).is_some(),
        _ => false,
    }
}

#[test]
fn input_major_f32_weights_are_contiguous_and_compute_the_same() {
    let reader = RandomWeights { seed: 31 };
    let view = loader(&reader);
    let input_major = loader(&reader).with_f32_linear_input_major(true);
    assert!(!view.f32_linear_input_major() && input_major.f32_linear_input_major());
    assert_eq!(
        loader(&reader)
            .with_kernel_layout()
            .f32_linear_input_major(),
        <B as KernelBackend>::F32_LINEAR_INPUT_MAJOR
    );
    // Sides that are not multiples of the transpose's 32-element blocks.
    let (d_in, heads, hd) = (70, 3, 22);
    let x = normal([2, 5, d_in], 32);
    for (name, d_out, bias) in [("a", 99, true), ("b", 3 * heads * hd, false)] {
        let dense = |ld: &Loader<'_, B>| ld.sub(name).linear(d_in, d_out, bias).unwrap();
        let layer = |ld: &Loader<'_, B>| ld.sub(name).linear_layer(d_in, d_out, bias).unwrap();
        let (a, b) = (dense(&view), dense(&input_major));
        assert_eq!(b.weight.dims(), [d_in, d_out]);
        assert!(
            is_contiguous(b.weight.val()),
            "input-major weight is a view"
        );
        assert!(
            !is_contiguous(a.weight.val()),
            "default weight is not the transposed view"
        );
        assert_eq!(a.weight.val().into_data(), b.weight.val().into_data());
        let (a, b) = (layer(&view), layer(&input_major));
        let LinearLayer::Dense(dense_b) = &b else {
            panic!("an f32 checkpoint gave a quantized layer")
        };
        assert!(is_contiguous(dense_b.weight.val()));
        assert_close(ops::linear(&b, x.clone()), ops::linear(&a, x.clone()), 1e-5);
        let got: [_; 3] = ops::linear_chunks(&b, x.clone());
        let want: [_; 3] = ops::linear_chunks(&a, x.clone());
        for (g, w) in got.into_iter().zip(want) {
            assert_close(g, w, 1e-5);
        }
        if !bias {
            assert_close(
                ops::linear_heads(&b, x.clone(), 3 * heads),
                ops::linear_heads(&a, x.clone(), 3 * heads),
                1e-5,
            );
            let (cos, sin) = (normal([1, 1, 5, hd], 33), normal([1, 1, 5, hd], 34));
            let got = ops::qkv_heads(&b, x.clone(), heads, cos.clone(), sin.clone());
            let want = ops::qkv_heads(&a, x.clone(), heads, cos, sin);
            for (g, w) in [(got.q, want.q), (got.k, want.k), (got.v, want.v)] {
                assert_close(g.narrowed(), w.narrowed(), 1e-5);
            }
        }
    }
    // Half-precision weights keep the checkpoint's `[out, in]` storage the mixed kernels read.
    let bf16 = |ld: Loader<'_, B>| {
        ld.with_weight_dtype(DType::BF16)
            .sub("a")
            .linear_layer(d_in, 99, true)
            .unwrap()
    };
    let (a, b) = (
        bf16(loader(&reader)),
        bf16(loader(&reader).with_f32_linear_input_major(true)),
    );
    assert_close(ops::linear(&b, x.clone()), ops::linear(&a, x), 0.0);
}

/// The dense f32 layer with the same values as `layer` (a converted or dequantised weight).
fn as_f32(layer: &LinearLayer<B>) -> Linear<B> {
    match layer {
        LinearLayer::Dense(l) => Linear {
            weight: Param::from_tensor(l.weight.val().cast(DType::F32)),
            bias: l.bias.clone(),
        },
        LinearLayer::Quantized(q) => q.dequantize(DType::F32),
    }
}

/// Every stored form of one random weight: bf16, f16, int8 and fp8 e4m3.
fn stored_forms(d_in: usize, d_out: usize, bias: bool) -> Vec<LinearLayer<B>> {
    let reader = RandomWeights { seed: 21 };
    let ld = loader(&reader).sub("layer");
    let mut layers = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        let ld = loader(&reader).with_weight_dtype(dtype).sub("layer");
        layers.push(ld.linear_layer(d_in, d_out, bias).unwrap());
    }
    let w = crate::weights::read_f32(&reader, "layer.weight", &[d_out, d_in]).unwrap();
    for scheme in [QuantScheme::Int8, QuantScheme::Fp8E4M3] {
        let q = QuantizedTensor::quantize("layer.weight", scheme, &[d_out, d_in], &w).unwrap();
        let b = bias.then(|| ld.param("bias", [d_out]).unwrap());
        layers.push(LinearLayer::Quantized(QuantizedLinear::new(
            q.values,
            q.scales,
            [d_out, d_in],
            scheme,
            b,
            &default_device(),
        )));
    }
    layers
}

#[test]
fn mixed_linear_matches_the_f32_product_of_the_converted_weight() {
    assert_eq!(ops::compute_dtype::<B>(DType::BF16), DType::F32);
    assert_eq!(ops::compute_dtype::<B>(DType::F32), DType::F32);
    // 1100 output features: two full blocks of 512 and a remainder.
    let (d_in, d_out) = (40, 1100);
    assert_eq!(host::linear_block_rows(d_in), 512);
    let x = normal([2, 3, d_in], 22);
    for layer in stored_forms(d_in, d_out, true) {
        assert!(super::mixed_on_host(&layer, &x), "{:?}", layer.format());
        let dense = as_f32(&layer);
        let xr = as_multiplied(&layer, x.clone());
        assert_close(
            ops::linear(&layer, x.clone()),
            portable::linear(&dense, xr.clone()),
            1e-5,
        );
        let got: [_; 2] = ops::linear_chunks(&layer, x.clone());
        let want: [_; 2] = portable::linear_chunks(&dense, xr);
        for (g, w) in got.into_iter().zip(want) {
            assert_close(g, w, 1e-5);
        }
    }
    for layer in stored_forms(d_in, 96, false) {
        let dense = as_f32(&layer);
        assert_close(
            ops::linear_heads(&layer, x.clone(), 4),
            portable::linear_heads(&dense, as_multiplied(&layer, x.clone()), 4),
            1e-5,
        );
    }
}

/// `x` as the mixed linear multiplies it by `layer`'s weight: rounded to bf16 where the bf16
/// dot-product GEMM runs (bf16, int8 and fp8 weights on an AVX512-BF16 CPU), else as is.
fn as_multiplied(layer: &LinearLayer<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    use super::quant::WeightFormat;
    if !super::bf16_dot::available() || layer.format() == WeightFormat::Dense(DType::F16) {
        return x;
    }
    let dims = x.dims();
    let rounded: Vec<f32> = x
        .into_data()
        .into_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(crate::weights::round_bf16)
        .collect();
    Tensor::from_data(TensorData::new(rounded, dims), &default_device())
}

#[test]
fn quantized_layers_dequantise_on_the_portable_path() {
    // The portable dequantisation (what GPU backends run) against the host decode table.
    let (d_in, d_out) = (24, 10);
    for layer in stored_forms(d_in, d_out, false).into_iter().skip(2) {
        let LinearLayer::Quantized(q) = &layer else {
            panic!("quantized forms come last");
        };
        let values = q.values.val().into_data().bytes.to_vec();
        let scales = q.scales.val().into_data().into_vec::<f32>().unwrap();
        let table = q.scheme.table();
        let want: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, &b)| table[b as usize] * scales[i / d_in])
            .collect();
        let got = q.dequantize(DType::F32).weight.val().transpose();
        let want =
            Tensor::<B, 2>::from_data(TensorData::new(want, [d_out, d_in]), &default_device());
        assert_close(got, want, 0.0);
        // Half-precision activations get a weight in their dtype.
        assert_eq!(q.dequantize(DType::BF16).weight.val().dtype(), DType::BF16);
        assert_eq!(layer.bytes(), (d_in * d_out + 4 * d_out) as u64);
    }
}

/// The GPU backends' 1×1 convolution (one product of the weight with the input's columns, an
/// inner size of 8 or 40 zero-padded to 128 by `portable::matmul`) against burn's `conv2d`.
#[test]
fn conv1x1_product_matches_conv2d() {
    for (c_in, c_out, seed) in [(8, 8, 1), (40, 16, 2), (33, 7, 3)] {
        let conv: Conv2d<B> = loader(&RandomWeights { seed })
            .conv2d(c_in, c_out, 1, 1, 0)
            .unwrap();
        let x = normal([2, c_in, 5, 6], seed + 10);
        assert_close(portable::conv1x1(&conv, x.clone()), conv.forward(x), 1e-5);
    }
}

/// The unmasked attention of the VAE as the GPU backends run it (query tiles; a head size of 24
/// and 40 keys, multiples of 8 but not of 128, so both products are padded) against burn's
/// attention in one piece.
#[test]
fn full_attention_tiles_match_burns_attention() {
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (b, s, c) = (2, 40, 24);
    let (q, k, v) = (
        normal([b, 1, s, c], 1),
        normal([b, 1, s, c], 2),
        normal([b, 1, s, c], 3),
    );
    let want = burn_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        None,
        None,
        AttentionModuleOptions::default(),
    )
    .swap_dims(1, 2)
    .reshape([b, s, c]);
    let tile = (b * s * 7) as u64; // seven query rows per tile: six tiles, the last of five
    assert_close(
        portable::attention(q.clone(), k.clone(), v.clone(), None, Some(tile)),
        want.clone(),
        1e-5,
    );
    assert_close(ops::full_attention(q, k, v), want, 1e-5);
}

/// The portable product pads an inner size of 40 with zeros of the operands' own dtype: the
/// product of half-precision operands stays in that dtype (burn's `pad` makes its padding in the
/// default float dtype, which a half-precision tensor cannot be joined with on the GPU backends).
#[test]
fn padded_products_keep_the_operands_dtype() {
    let device = default_device();
    let (a, b) = (normal([3, 40], 1), normal([40, 5], 2));
    let want = a.clone().matmul(b.clone());
    assert_close(portable::matmul(a.clone(), b.clone()), want.clone(), 1e-5);
    for dtype in [DType::BF16, DType::F16] {
        if !<B as burn::tensor::backend::Backend>::supports_dtype(&device, dtype) {
            continue;
        }
        let got = portable::matmul(a.clone().cast(dtype), b.clone().cast(dtype));
        assert_eq!(got.dtype(), dtype);
        assert_close(got.cast(DType::F32), want.clone(), 0.25);
    }
}
