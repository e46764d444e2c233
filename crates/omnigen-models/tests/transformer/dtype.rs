//! Weight precision: the official bf16 rounding of the weights, and the transformer run with
//! bf16 / f16 parameters against the f32 reference (fixture A).

use crate::support::*;
use burn::tensor::{DType, Tensor, TensorData};
use omnigen_core::WeightSource;
use omnigen_models::default_device;
use omnigen_models::ops::{self, WeightFormat};
use omnigen_models::transformer::{LoadOptions, OmniGenTransformer, TransformerCondition};
use omnigen_models::weights::{Bf16RoundedReader, RandomWeights, WeightReader};

fn values(data: TensorData) -> Vec<f32> {
    data.into_vec::<f32>().unwrap()
}

/// Reference f32 -> bf16 rounding written on the bits (round to nearest, ties to even, as
/// torch's `c10::BFloat16` does for finite values).
fn bf16_bits_rne(x: f32) -> f32 {
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    f32::from_bits(bits.wrapping_add(0x7fff + lsb) & 0xffff_0000)
}

#[test]
fn bf16_rounding_is_a_no_op_on_the_bf16_exact_model() {
    let source = WeightSource::open(fixtures_a().join("model/model.safetensors")).unwrap();
    let rounded = Bf16RoundedReader { base: &source };
    let mut n = 0;
    for key in source.keys() {
        let shape = source.shape(key).unwrap();
        let raw = source.read_f32(key, &shape).unwrap();
        let got = values(rounded.read(key, &shape, DType::F32).unwrap());
        assert_eq!(got, raw, "{key} changed");
        n += raw.len();
    }
    println!("{} tensors, {n} values unchanged", source.keys().len());
}

#[test]
fn bf16_rounding_of_random_f32_weights_is_round_to_nearest_even() {
    let random = RandomWeights { seed: 7 };
    let rounded = Bf16RoundedReader { base: &random };
    let shape = [64, 96];
    let key = "llm.layers.0.mlp.down_proj.weight";
    let raw = values(random.read(key, &shape, DType::F32).unwrap());
    let got = values(rounded.read(key, &shape, DType::F32).unwrap());
    let mut changed = 0;
    for (r, g) in raw.iter().zip(&got) {
        assert_eq!(*g, bf16_bits_rne(*r), "{r:e}");
        assert_eq!(g.to_bits() & 0xffff, 0, "not bf16-exact");
        changed += usize::from(r != g);
    }
    assert!(
        changed > raw.len() / 2,
        "random f32 values should mostly change"
    );
    let worst_rel = raw
        .iter()
        .zip(&got)
        .map(|(r, g)| ((r - g) / r).abs())
        .fold(0f32, f32::max);
    assert!(worst_rel <= 2f32.powi(-8), "relative error {worst_rel}");
    // Reading at bf16 directly is the same rounding; at f16 the bf16 values are converted.
    let as_bf16 = rounded.read(key, &shape, DType::BF16).unwrap();
    assert_eq!(as_bf16.dtype, DType::BF16);
    assert_eq!(values(as_bf16.convert_dtype(DType::F32)), got);
    let as_f16 = rounded.read(key, &shape, DType::F16).unwrap();
    let expected_f16 = TensorData::new(got.clone(), shape.to_vec()).convert_dtype(DType::F16);
    assert_eq!(as_f16.bytes, expected_f16.bytes);
    // Ties: exactly halfway values go to the even bf16 mantissa.
    for (x, want) in [
        (1.0 + 2f32.powi(-8), 1.0),
        (1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)),
        (-(1.0 + 2f32.powi(-8)), -1.0),
    ] {
        assert_eq!(bf16_bits_rne(x), want);
        assert_eq!(omnigen_models::weights::round_bf16(x), want);
    }
}

/// The `transformer_only` inputs, float tensors cast to `dtype` (what the pipeline does).
fn input(fx: &Fixture, dtype: DType) -> Call {
    cast_input(fx.tf_input(), dtype)
}

/// The `transformer_only` forward with `dtype` parameters against the f32 reference, within
/// that dtype's tolerance.
fn half_forward(dtype: DType) {
    if refused_on_this_backend(dtype) {
        return;
    }
    let dir = fixtures_a();
    let model = OmniGenTransformer::<B>::from_dir_with(
        dir.join("model"),
        &default_device(),
        dtype,
        &LoadOptions::default(),
    )
    .expect("model loads");
    // Weights in `dtype`; activations in f32 where the backend's linear takes half-precision
    // weights (the CPU backends), else in `dtype`.
    assert_eq!(model.weight_format(), WeightFormat::Dense(dtype));
    assert_eq!(model.dtype(), ops::compute_dtype::<B>(dtype));
    let fx = Fixture::open(&dir, "transformer_only");
    let out = input(&fx, model.dtype()).forward(&model).expect("forward");
    assert_eq!(out.dtype(), model.dtype());
    let out: Tensor<B, 4> = out.cast(DType::F32);
    let expected: Tensor<B, 4> = fx.f("tf.out");
    let scale: f32 = expected.clone().abs().max().into_scalar();
    let d = max_abs(out, expected);
    println!(
        "{dtype:?} forward: max abs diff {d:.3e} vs f32 reference (max |tf.out| = {scale:.3})"
    );
    assert_within_tol(dtype, d);
}

#[test]
fn bf16_forward_is_close_to_f32_reference() {
    half_forward(DType::BF16);
}

#[test]
fn f16_forward_is_close_to_f32_reference() {
    half_forward(DType::F16);
}

/// Float inputs cast to `dtype`.
fn cast_input(input: Call, dtype: DType) -> Call {
    let cond = input.cond;
    Call {
        cond: TransformerCondition {
            input_img_latents: cond
                .input_img_latents
                .into_iter()
                .map(|l| l.cast(dtype))
                .collect(),
            ..cond
        },
        x: input.x.cast(dtype),
        timestep: input.timestep.cast(dtype),
    }
}

/// Every call of the KV-cached `edit` case (prefill + cached steps, three CFG branches) with
/// `dtype` parameters, against the recorded f32 outputs: the worst diff within that dtype's
/// tolerance.
fn half_kv_replay(dtype: DType) {
    use omnigen_models::transformer::KvCacheMode;
    if refused_on_this_backend(dtype) {
        return;
    }
    let dir = fixtures_a();
    let model = OmniGenTransformer::<B>::from_dir(dir.join("model"), &default_device(), dtype)
        .expect("model loads");
    let fx = Fixture::open(&dir, "edit");
    assert!(fx.uses_kv_cache());
    let mut worst = 0f32;
    for br in fx.branches() {
        let expected = |step: usize| fx.f::<4>(&format!("step{step}.{br}.out"));
        let (out0, cache) = cast_input(fx.branch_input(&br, 0), model.dtype())
            .prefill(&model, KvCacheMode::Official)
            .expect("prefill");
        assert_eq!(out0.dtype(), model.dtype());
        worst = worst.max(max_abs(out0.cast(DType::F32), expected(0)));
        for step in 1..fx.steps() {
            let x = fx.f::<4>(&format!("step{step}.{br}.x")).cast(model.dtype());
            let t = fx
                .f::<1>(&format!("step{step}.{br}.timestep"))
                .cast(model.dtype());
            let out = model.forward_cached(&cache, x, t).expect("cached step");
            worst = worst.max(max_abs(out.cast(DType::F32), expected(step)));
        }
    }
    println!("{dtype:?} edit (KV cache, every call): max abs diff {worst:.3e} vs f32 reference");
    assert_within_tol(dtype, worst);
}

#[test]
fn bf16_kv_cached_calls_are_close_to_f32_reference() {
    half_kv_replay(DType::BF16);
}

#[test]
fn f16_kv_cached_calls_are_close_to_f32_reference() {
    half_kv_replay(DType::F16);
}

/// On a backend that cannot compute in `dtype` (wgpu: WGSL has no bf16), checks that loading in
/// it is refused with the option named, and returns true: there is no run to compare.
fn refused_on_this_backend(dtype: DType) -> bool {
    let device = default_device();
    let compute = omnigen_models::ops::compute_dtype::<B>(dtype);
    if <B as burn::tensor::backend::Backend>::supports_dtype(&device, compute) {
        return false;
    }
    let err = OmniGenTransformer::<B>::from_dir(fixtures_a().join("model"), &device, dtype)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("dtype") && err.contains("not supported"),
        "{err}"
    );
    println!("{dtype:?}: not supported by this backend, refused at load: {err}");
    true
}

/// Panics unless `d`, the worst diff of a run with `dtype` parameters, is within that dtype's
/// tolerance ([`BF16_TOL`], [`F16_TOL`]).
fn assert_within_tol(dtype: DType, d: f32) {
    let (name, tol) = match dtype {
        DType::BF16 => ("bf16", BF16_TOL),
        DType::F16 => ("f16", F16_TOL),
        other => panic!("no tolerance for {other:?}"),
    };
    assert!(d <= tol, "{name}: {d} > {tol}");
}

/// With half-precision compute (GPU backends; on the CPU backends the weights are half precision
/// and the activations f32, and fixture A's bf16-exact weights make the bf16 run exact).
/// Measured on fixture A (x86-64, flex backend, bf16 compute): bf16 3.1e-2 on `transformer_only` (max |out|
/// 2.95) and 3.7e-2 over the KV-cached `edit` calls; f16 3.0e-3 and 5.3e-3; about 3x / 2x headroom. bf16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3),
/// f16 11 bits (2^-11 = 4.9e-4): the errors are ~8x and ~6x those steps relative to |out|.
const BF16_TOL: f32 = 0.1;
const F16_TOL: f32 = 0.01;

/// The `transformer_only` forward with the decoder layers' linears quantized (int8, fp8 e4m3,
/// per output channel; f32 compute) against the f32 reference: max abs and relative L2.
#[test]
fn quantized_forward_is_close_to_f32_reference() {
    use omnigen_core::{QuantScheme, TransformerConfig, TransformerWeights};
    use omnigen_models::weights::QuantizingReader;
    let dir = fixtures_a();
    let config = TransformerConfig::from_file(dir.join("model/config.json")).unwrap();
    let weights =
        TransformerWeights::new(WeightSource::open(dir.join("model/model.safetensors")).unwrap())
            .unwrap();
    let fx = Fixture::open(&dir, "transformer_only");
    let expected: Vec<f32> = values(fx.f::<4>("tf.out").into_data());
    // int8 keeps 8 bits per row (a relative step of 1/127 of the row's largest weight), fp8
    // e4m3 a 3-bit mantissa (2^-4 relative): errors about 4x apart, as measured (docs/parity.md).
    for (scheme, tol) in [(QuantScheme::Int8, 0.05f32), (QuantScheme::Fp8E4M3, 0.2)] {
        let reader = QuantizingReader {
            base: &weights,
            scheme,
        };
        let model = OmniGenTransformer::<B>::load_with(
            &reader,
            &config,
            &default_device(),
            DType::F32,
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(model.weight_format(), WeightFormat::Quantized(scheme));
        let out = values(input(&fx, DType::F32).forward(&model).unwrap().into_data());
        let d = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let num: f32 = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        let den: f32 = expected.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        println!("{scheme} forward: max abs diff {d:.3e}, rel L2 {rel:.3e} vs f32 reference");
        assert!(d > 0.0 && d <= tol, "{scheme}: {d} (tolerance {tol})");
    }
}
