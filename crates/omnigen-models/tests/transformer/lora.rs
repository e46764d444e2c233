//! LoRA merge parity with the official `merge_lora` (fixture `A/lora`, `A/lora_ref.*`), and the
//! adapter loader's errors.

use std::path::{Path, PathBuf};

use crate::support::*;
use burn::tensor::{DType, Tensor, TensorData};
use omnigen_core::{Error, TransformerWeights, WeightSource};
use omnigen_models::default_device;
use omnigen_models::lora::{LoraAdapter, LoraMergePrecision, LoraMergedReader};
use omnigen_models::transformer::{LoadOptions, OmniGenTransformer};
use omnigen_models::weights::{Bf16RoundedReader, WeightReader};
use omnigen_test_support::{max_abs_diff, write_f32_safetensors};

const D: usize = 48;

fn lora_dir() -> PathBuf {
    fixtures_a().join("lora")
}

fn weights_a() -> TransformerWeights {
    TransformerWeights::new(
        WeightSource::open(fixtures_a().join("model/model.safetensors")).unwrap(),
    )
    .unwrap()
}

fn targets() -> Vec<(String, [usize; 2])> {
    let mut out = Vec::new();
    for layer in 0..2 {
        out.push((
            format!("llm.layers.{layer}.self_attn.qkv_proj.weight"),
            [3 * D, D],
        ));
        out.push((
            format!("llm.layers.{layer}.self_attn.o_proj.weight"),
            [D, D],
        ));
    }
    out
}

fn values(data: TensorData) -> Vec<f32> {
    data.into_vec::<f32>().unwrap()
}

/// Max |a - b| of merged weights read through the LoRA reader vs the reference `prefix.*`.
fn merged_weights_diff(precision: LoraMergePrecision, prefix: &str) -> f32 {
    let weights = weights_a();
    let rounded = Bf16RoundedReader { base: &weights };
    let adapter =
        LoraAdapter::open(lora_dir(), 1.0, &omnigen_models::transformer::MODULES).unwrap();
    assert_eq!(adapter.modules().count(), 4);
    let reader = LoraMergedReader::new(&rounded, vec![adapter], precision);
    let reference = WeightSource::open(fixtures_a().join("lora_ref.safetensors")).unwrap();
    let mut worst = 0f32;
    for (key, shape) in targets() {
        let got = values(reader.read(&key, &shape, DType::F32).unwrap());
        let want = reference
            .read_f32(&format!("{prefix}.{key}"), &shape)
            .unwrap();
        let base = weights.source().read_f32(&key, &shape).unwrap();
        let d = max_abs_diff(&got, &want);
        let moved = max_abs_diff(&got, &base);
        println!("{precision:?} {key}: max |ours - {prefix}| = {d:.3e} (merge moved weights by up to {moved:.3e})");
        assert!(moved > 1e-2, "{key}: the merge changed nothing");
        worst = worst.max(d);
    }
    reader.finish().unwrap();
    // Keys the adapter does not target pass through untouched.
    let key = "llm.layers.0.mlp.down_proj.weight";
    let shape = [D, 128];
    assert_eq!(
        values(reader.read(key, &shape, DType::F32).unwrap()),
        weights.source().read_f32(key, &shape).unwrap()
    );
    worst
}

#[test]
fn official_merge_is_bit_exact() {
    let d = merged_weights_diff(LoraMergePrecision::Official, "merged");
    assert_eq!(d, 0.0, "official bf16 merge must be bit-exact");
}

#[test]
fn f32_merge_matches_float32_reference() {
    let d = merged_weights_diff(LoraMergePrecision::F32, "fp32merge");
    assert!(d <= 1e-6, "f32 merge differs by {d}");
}

fn forward_with(options: &LoadOptions) -> Tensor<B, 4> {
    let dir = fixtures_a();
    let model = OmniGenTransformer::<B>::from_dir_with(
        dir.join("model"),
        &default_device(),
        DType::F32,
        options,
    )
    .expect("model with LoRA loads");
    let fx = Fixture::open(&dir, "transformer_only");
    fx.tf_input().forward(&model).expect("forward")
}

#[test]
fn forward_with_official_merge_matches() {
    let out = forward_with(&LoadOptions::default().with_lora(lora_dir(), 1.0));
    let fx = Fixture::open(&fixtures_a(), "lora_ref");
    check(
        "lora.tf.out (official merge)",
        out,
        fx.f("lora.tf.out"),
        TOL,
    );
}

#[test]
fn forward_with_f32_merge_matches() {
    let options = LoadOptions {
        lora_precision: LoraMergePrecision::F32,
        ..LoadOptions::default().with_lora(lora_dir(), 1.0)
    };
    let out = forward_with(&options);
    let fx = Fixture::open(&fixtures_a(), "lora_ref");
    check(
        "lora.tf.out_fp32merge (f32 merge)",
        out,
        fx.f("lora.tf.out_fp32merge"),
        TOL,
    );
}

#[test]
fn user_scale_multiplies_the_delta() {
    // With scale 0 the merge is the identity (up to the bf16 rounding of W, a no-op here).
    let weights = weights_a();
    let adapter =
        LoraAdapter::open(lora_dir(), 0.0, &omnigen_models::transformer::MODULES).unwrap();
    let reader = LoraMergedReader::new(&weights, vec![adapter], LoraMergePrecision::F32);
    let (key, shape) = &targets()[0];
    assert_eq!(
        values(reader.read(key, shape, DType::F32).unwrap()),
        weights.source().read_f32(key, shape).unwrap()
    );
    // Scale 2 doubles the f32 delta.
    let two = LoraMergedReader::new(
        &weights,
        vec![LoraAdapter::open(lora_dir(), 2.0, &omnigen_models::transformer::MODULES).unwrap()],
        LoraMergePrecision::F32,
    );
    let one = LoraMergedReader::new(
        &weights,
        vec![LoraAdapter::open(lora_dir(), 1.0, &omnigen_models::transformer::MODULES).unwrap()],
        LoraMergePrecision::F32,
    );
    let base = weights.source().read_f32(key, shape).unwrap();
    let w2 = values(two.read(key, shape, DType::F32).unwrap());
    let w1 = values(one.read(key, shape, DType::F32).unwrap());
    let worst = base
        .iter()
        .zip(w1.iter().zip(&w2))
        .map(|(b, (a1, a2))| ((a2 - b) - 2.0 * (a1 - b)).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "scale 2 delta is not twice scale 1: {worst}");
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A copy of the fixture adapter with its config and tensors edited.
fn edited_adapter(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = lora_dir();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_config(&mut config);
    std::fs::write(tmp.path().join("adapter_config.json"), config.to_string()).unwrap();
    let source = WeightSource::open(src.join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = source
        .keys()
        .into_iter()
        .map(|k| {
            let shape = source.shape(k).unwrap();
            (
                k.to_string(),
                shape.clone(),
                source.read_f32(k, &shape).unwrap(),
            )
        })
        .collect();
    edit_tensors(&mut tensors);
    write_f32_safetensors(tmp.path().join("adapter_model.safetensors"), &tensors);
    tmp
}

/// A copy of the fixture adapter whose tensor ending in `suffix` is cut down to `shape`.
fn reshaped_adapter(suffix: &str, shape: [usize; 2]) -> tempfile::TempDir {
    edited_adapter(
        |_| {},
        |t| {
            for (k, old_shape, v) in t.iter_mut() {
                if k.ends_with(suffix) {
                    *old_shape = shape.to_vec();
                    v.truncate(shape.iter().product());
                }
            }
        },
    )
}

fn load_error(adapter: &Path) -> Error {
    let options = LoadOptions::default().with_lora(adapter, 1.0);
    match OmniGenTransformer::<B>::from_dir_with(
        fixtures_a().join("model"),
        &default_device(),
        DType::F32,
        &options,
    ) {
        Ok(_) => panic!("loading adapter {} should fail", adapter.display()),
        Err(e) => {
            println!("{e}");
            e
        }
    }
}

#[test]
fn missing_adapter_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_error(&tmp.path().join("nope"));
    assert!(
        matches!(&e, Error::Io { path, .. } if path.ends_with("nope")),
        "{e:?}"
    );

    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::Io { path, .. } if path.ends_with("adapter_config.json")),
        "{e:?}"
    );

    std::fs::copy(
        lora_dir().join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::Io { path, .. } if path.ends_with("adapter_model.safetensors")),
        "{e:?}"
    );

    std::fs::write(tmp.path().join("adapter_model.bin"), b"pickle").unwrap();
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::InvalidArgument { name: "lora", reason } if reason.contains("only adapter_model.safetensors")),
        "{e:?}"
    );
}

#[test]
fn shape_mismatch_names_the_adapter_tensor() {
    // lora_A of o_proj made for a model of width 32 instead of 48.
    let tmp = reshaped_adapter("layers.1.self_attn.o_proj.lora_A.weight", [4, 32]);
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::ShapeMismatch { name, expected, found, .. }
            if name == "base_model.model.llm.layers.1.self_attn.o_proj.lora_A.weight"
            && *expected == [4, 48] && *found == [4, 32]),
        "{e:?}"
    );
    // lora_B of qkv_proj with too few rows.
    let tmp = reshaped_adapter("layers.0.self_attn.qkv_proj.lora_B.weight", [48, 4]);
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::ShapeMismatch { name, expected, .. }
            if name.ends_with("layers.0.self_attn.qkv_proj.lora_B.weight") && *expected == [144, 4]),
        "{e:?}"
    );
}

#[test]
fn rank_mismatch_with_config_is_refused() {
    let tmp = edited_adapter(|c| c["r"] = 8.into(), |_| {});
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::Config { path, reason }
            if path.ends_with("adapter_config.json") && reason.contains(".lora_A.weight`")
            && reason.contains("rank 4") && reason.contains("rank 8")),
        "{e:?}"
    );
    // lora_B of one module with rank 2 while its lora_A has rank 4.
    let tmp = reshaped_adapter("layers.1.self_attn.qkv_proj.lora_B.weight", [144, 2]);
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::Config { reason, .. }
            if reason.contains("layers.1.self_attn.qkv_proj.lora_B.weight`") && reason.contains("rank 2")),
        "{e:?}"
    );
}

#[test]
fn unsupported_targets_and_modules_are_refused() {
    for target in ["proj", "embed_tokens", "q_proj"] {
        let tmp = edited_adapter(
            |c| c["target_modules"] = serde_json::json!([target, "o_proj"]),
            |_| {},
        );
        let e = load_error(tmp.path());
        assert!(
            matches!(&e, Error::Config { reason, .. } if reason.contains(&format!("`{target}`"))),
            "{e:?}"
        );
    }
    // DoRA.
    let tmp = edited_adapter(|c| c["use_dora"] = true.into(), |_| {});
    assert!(matches!(load_error(tmp.path()), Error::Config { .. }));
    // A module of a deeper model: layer 5 does not exist in the 2-layer model A.
    let tmp = edited_adapter(
        |_| {},
        |t| {
            for (k, _, _) in t.iter_mut() {
                *k = k.replace("layers.1.", "layers.5.");
            }
        },
    );
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::InvalidArgument { name: "lora", reason } if reason.contains("llm.layers.5.self_attn")),
        "{e:?}"
    );
    // An adapter tensor on a convolution.
    let tmp = edited_adapter(
        |_| {},
        |t| {
            t.push((
                "base_model.model.x_embedder.proj.lora_A.weight".into(),
                vec![4, 4],
                vec![0.0; 16],
            ));
        },
    );
    let e = load_error(tmp.path());
    assert!(
        matches!(&e, Error::CorruptWeights { reason, .. } if reason.contains("x_embedder.proj")),
        "{e:?}"
    );
}
