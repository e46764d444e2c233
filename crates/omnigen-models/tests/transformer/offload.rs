//! Offload (`--offload model`, `--offload kv`): decoder layers and kv caches held in host memory
//! and streamed to the device compute exactly what resident ones do, on every backend (CI runs
//! this module on lavapipe too; on the CPU backends the pipeline leaves offload off, but the
//! model's streaming runs the same code there).

use burn::tensor::Tensor;
use omnigen_core::{QuantScheme, TransformerConfig};
use omnigen_models::default_device;
use omnigen_models::transformer::{
    KvCache, KvCacheMode, KvPlacement, LoadOptions, OmniGenTransformer,
};
use omnigen_models::weights::{QuantizingReader, RandomWeights};
use omnigen_test_support::test_dtype;

use crate::support::*;

fn load(options: &LoadOptions) -> OmniGenTransformer<B> {
    OmniGenTransformer::from_dir_with(
        fixtures_a().join("model"),
        &default_device(),
        test_dtype(),
        options,
    )
    .expect("model loads")
}

fn offloaded(options: LoadOptions) -> LoadOptions {
    LoadOptions {
        offload_layers: true,
        ..options
    }
}

/// `a` and `b` hold the same numbers.
fn same<const D: usize>(what: &str, a: Tensor<B, D>, b: Tensor<B, D>) {
    check(what, a, b, 0.0);
}

fn prefill(
    model: &OmniGenTransformer<B>,
    call: &Call,
    placement: KvPlacement,
) -> (Tensor<B, 4>, KvCache<B>) {
    let (out, cache) = model
        .prefill_with(
            &call.cond,
            call.x.clone(),
            call.timestep.clone(),
            KvCacheMode::Official,
            placement,
        )
        .expect("prefill");
    assert_eq!(cache.placement(), placement);
    assert_eq!(cache.host_bytes() > 0, placement == KvPlacement::Host);
    (out, cache)
}

/// Every call of the recorded `edit` run (its condition holds an input image) through the
/// uncached forward, the prefill and the cached steps: offloaded layers and a host cache, in
/// every combination, against the resident model with its cache on the device.
fn compare_every_call(resident: &OmniGenTransformer<B>, streamed: &OmniGenTransformer<B>) {
    let fx = Fixture::open(&fixtures_a(), "edit");
    for br in fx.branches() {
        let call = fx.branch_input(&br, 0);
        same(
            &format!("{br} forward, offloaded layers"),
            call.forward(resident).unwrap(),
            call.forward(streamed).unwrap(),
        );
        let (out0, cache) = prefill(resident, &call, KvPlacement::Device);
        for (name, model, placement) in [
            ("host cache", resident, KvPlacement::Host),
            ("offloaded layers", streamed, KvPlacement::Device),
            ("offloaded layers, host cache", streamed, KvPlacement::Host),
        ] {
            let (out, kept) = prefill(model, &call, placement);
            same(&format!("{br} prefill, {name}"), out0.clone(), out);
            for step in 1..fx.steps() {
                let x = fx.f::<4>(&format!("step{step}.{br}.x"));
                let t = fx.f::<1>(&format!("step{step}.{br}.timestep"));
                same(
                    &format!("{br} step {step}, {name}"),
                    resident
                        .forward_cached(&cache, x.clone(), t.clone())
                        .unwrap(),
                    model.forward_cached(&kept, x, t).unwrap(),
                );
            }
        }
    }
}

#[test]
fn offloaded_layers_and_caches_compute_what_resident_ones_do() {
    let resident = load(&LoadOptions::default());
    let streamed = load(&offloaded(LoadOptions::default()));
    assert!(resident.llm.offloaded.is_none() && resident.offloaded_bytes() == 0);
    assert!(
        streamed.llm.layers.is_empty(),
        "no layer stays on the device"
    );
    assert_eq!(streamed.llm.num_layers(), resident.llm.num_layers());
    assert!(streamed.offloaded_bytes() > 0);
    // the host copies are the layers' own tensors, byte for byte
    assert_eq!(streamed.weight_bytes(), resident.weight_bytes());
    assert_eq!(streamed.weight_format(), resident.weight_format());
    compare_every_call(&resident, &streamed);
}

#[test]
fn offload_keeps_lora_merges_and_quantized_layers() {
    // A merged adapter: the host copies are the merged weights.
    let lora = LoadOptions::default().with_lora(fixtures_a().join("lora"), 1.0);
    compare_every_call(&load(&lora), &load(&offloaded(lora.clone())));

    // int8 layers: the host copies are the codes and scales, rebuilt as the device holds them.
    let config = TransformerConfig::from_file(fixtures_a().join("model/config.json")).unwrap();
    let base = RandomWeights { seed: 7 };
    let reader = QuantizingReader {
        base: &base,
        scheme: QuantScheme::Int8,
    };
    let build = |options: &LoadOptions| {
        OmniGenTransformer::<B>::load_with(
            &reader,
            &config,
            &default_device(),
            test_dtype(),
            options,
        )
        .unwrap()
    };
    let resident = build(&LoadOptions::as_stored());
    let streamed = build(&offloaded(LoadOptions::as_stored()));
    assert_eq!(streamed.weight_format(), resident.weight_format());
    // (Bytes are not compared: the host keeps one byte per code, wgpu's device four.)
    compare_every_call(&resident, &streamed);
}
