//! Both checkpoint key layouts: the official `model.safetensors` and diffusers'
//! `OmniGenTransformer2DModel` copy (BF16, renamed keys, q/k/v split), auto-detected.

use crate::support::*;
use burn::module::Module;
use burn::tensor::DType;
use omnigen_core::{CheckpointLayout, TransformerWeights, WeightSource};
use omnigen_models::default_device;
use omnigen_models::transformer::OmniGenTransformer;

#[test]
fn diffusers_layout_is_detected_and_matches_official() {
    let dir = fixtures_a();
    let diffusers_dir = dir.join("model_diffusers");
    let weights = TransformerWeights::new(
        WeightSource::open_in_dir(diffusers_dir.join("transformer"), "diffusion_pytorch_model")
            .expect("open"),
    )
    .expect("layout");
    assert_eq!(weights.layout(), CheckpointLayout::Diffusers);

    // The repository root resolves `transformer/`; BF16 values are read as F32.
    let diffusers: OmniGenTransformer<B> =
        OmniGenTransformer::from_dir(&diffusers_dir, &default_device(), DType::F32)
            .expect("diffusers loads");
    let official = load_model(&dir.join("model"));
    assert_eq!(diffusers.config, official.config);
    assert_eq!(diffusers.num_params(), official.num_params());

    let fx = Fixture::open(&dir, "transformer_only");
    let out_d = fx.tf_input().forward(&diffusers).expect("forward");
    let out_o = fx.tf_input().forward(&official).expect("forward");
    // The copy is lossless (bf16-exact weights), so both layouts give the same numbers.
    check("diffusers vs official layout", out_d.clone(), out_o, 0.0);
    check("diffusers layout tf.out", out_d, fx.f("tf.out"), TOL);
}

#[test]
fn diffusers_layout_replays_a_cached_case() {
    let dir = fixtures_a();
    let model: OmniGenTransformer<B> = OmniGenTransformer::from_dir(
        dir.join("model_diffusers/transformer"),
        &default_device(),
        DType::F32,
    )
    .expect("diffusers transformer dir loads");
    replay_case(&model, &dir, "edit");
    replay_case(&model, &dir, "t2i_joint_nokv");
}

#[test]
fn missing_model_is_a_typed_error() {
    let err = OmniGenTransformer::<B>::from_dir(
        fixtures_a().join("no_such_model"),
        &default_device(),
        DType::F32,
    )
    .expect_err("must fail");
    assert!(
        matches!(err, omnigen_core::Error::ModelNotFound { .. }),
        "{err}"
    );
}
