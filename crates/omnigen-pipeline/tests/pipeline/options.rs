//! Pipeline options beyond parity: progress, cancellation, memory guard, dtype, LoRA, errors.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use omnigen_core::Error;
use omnigen_models::ops::{self, WeightFormat};
use omnigen_models::scheduler::FlowMatchEulerScheduler;
use omnigen_models::DefaultBackend as B;
use omnigen_pipeline::{
    CancellationToken, ConditionImage, GenerationRequest, Hooks, InitialLatents, OmniGenPipeline,
    Progress, Prompt,
};
use omnigen_test_support::max_abs_diff;

fn fixtures() -> PathBuf {
    omnigen_test_support::fixtures_root()
}

fn model() -> PathBuf {
    fixtures().join("A/model")
}

fn t2i() -> GenerationRequest {
    GenerationRequest::new("a red cat sitting on a blue mat")
        .size(64, 64)
        .steps(4)
        .seed(5)
}

fn latents(g: &omnigen_pipeline::Generation<B>) -> Vec<f32> {
    g.latents
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap()
}

#[test]
fn progress_is_reported_every_step() {
    let pipe = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let mut seen = Vec::new();
    let mut cb = |p: Progress| seen.push((p.step, p.total));
    let hooks = Hooks {
        on_progress: Some(&mut cb),
        ..Hooks::default()
    };
    pipe.generate_with(&t2i(), &mut FlowMatchEulerScheduler::new(), hooks)
        .unwrap();
    assert_eq!(seen, [(1, 4), (2, 4), (3, 4), (4, 4)]);
}

#[test]
fn cancellation_stops_at_the_next_step() {
    let pipe = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let token = CancellationToken::new();
    let t2 = token.clone();
    let mut cb = move |p: Progress| {
        if p.step == 2 {
            t2.cancel();
        }
    };
    let hooks = Hooks {
        on_progress: Some(&mut cb),
        cancel: Some(token),
        ..Hooks::default()
    };
    let err = pipe
        .generate_with(&t2i(), &mut FlowMatchEulerScheduler::new(), hooks)
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { step: 2 }), "{err}");
}

#[test]
fn memory_guard_refuses_what_cannot_fit_and_names_an_option() {
    let pipe = OmniGenPipeline::<B>::builder(model())
        .memory_limit(Some(1 << 20))
        .build()
        .unwrap();
    let err = pipe.generate(&t2i()).unwrap_err();
    match &err {
        Error::OutOfMemory {
            needed_mib,
            available_mib,
            hint,
        } => {
            assert_eq!(*available_mib, 1);
            assert!(*needed_mib >= 1);
            assert!(
                hint.contains("output size") || hint.contains("tiled VAE"),
                "{hint}"
            );
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    // big input images in a small budget point at max_input_image_size
    let big = image::RgbImage::from_fn(1024, 1024, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let req = GenerationRequest::new(
        Prompt::from_text("<img><|image_1|></img> x", vec![ConditionImage::from(big)]).unwrap(),
    )
    .size(64, 64)
    .steps(1);
    let pipe = OmniGenPipeline::<B>::builder(model())
        .memory_limit(Some(64 << 20))
        .build()
        .unwrap();
    let err = pipe.generate(&req).unwrap_err();
    assert!(err.to_string().contains("max_input_image_size"), "{err}");
    // a generous budget lets the same request through
    let pipe = OmniGenPipeline::<B>::builder(model())
        .memory_limit(Some(64 << 30))
        .build()
        .unwrap();
    pipe.generate(&t2i()).unwrap();
}

#[test]
fn half_precision_transformer_stays_close_to_f32() {
    let f32p = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let reference = latents(&f32p.generate(&t2i()).unwrap());
    for (dtype, tol) in [(DType::BF16, 0.25f32), (DType::F16, 0.05)] {
        if !computes_in(dtype) {
            let err = OmniGenPipeline::<B>::builder(model())
                .dtype(dtype)
                .build()
                .err();
            let err = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                err.contains("dtype") && err.contains("not supported"),
                "{err}"
            );
            continue;
        }
        let pipe = OmniGenPipeline::<B>::builder(model())
            .dtype(dtype)
            .build()
            .unwrap();
        assert_eq!(
            pipe.transformer().weight_format(),
            WeightFormat::Dense(dtype)
        );
        assert_eq!(pipe.transformer().dtype(), ops::compute_dtype::<B>(dtype));
        let ours = latents(&pipe.generate(&t2i()).unwrap());
        let d = max_abs_diff(&ours, &reference);
        println!("{dtype:?}: max |latents - f32| = {d:.3e}");
        assert!(d < tol, "{dtype:?} drifted {d} from f32");
        assert!(ours.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn a_bf16_vae_decodes_close_to_f32_and_f16_is_refused() {
    let refused = |dtype| {
        OmniGenPipeline::<B>::builder(model())
            .vae_dtype(dtype)
            .build()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let err = refused(DType::F16);
    assert!(err.contains("vae_dtype") && err.contains("f16"), "{err}");
    if !<B as burn::tensor::backend::Backend>::supports_dtype(&Default::default(), DType::BF16) {
        let err = refused(DType::BF16);
        assert!(
            err.contains("vae_dtype") && err.contains("not supported"),
            "{err}"
        );
        return;
    }
    let f32p = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let reference = f32p.generate(&t2i()).unwrap();
    let pipe = OmniGenPipeline::<B>::builder(model())
        .vae_dtype(DType::BF16)
        .build()
        .unwrap();
    let ours = pipe.generate(&t2i()).unwrap();
    // The transformer is untouched (f32), so the latents are identical; only the decode differs.
    assert_eq!(latents(&ours), latents(&reference));
    let levels =
        omnigen_test_support::max_level_diff(ours.images[0].as_raw(), reference.images[0].as_raw());
    println!("bf16 VAE: max level difference {levels}");
    assert!(levels <= 8, "a bf16 VAE decode is {levels} levels from f32");
}

/// The default dtype is the device's (f32 on the CPU backends, bf16 on a GPU that has it).
#[test]
fn the_default_dtype_follows_the_backend() {
    let pipe = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let want = ops::compute_dtype::<B>(ops::default_dtype::<B>(&Default::default()));
    assert_eq!(pipe.transformer().dtype(), want);
    if <B as ops::KernelBackend>::HOST_MEMORY {
        assert_eq!(want, DType::F32);
    }
}

/// Relative L2 distance `|a - b| / |b|`.
fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn quantized_folders_load_and_generate_close_to_f32_in_both_layouts() {
    use omnigen_core::{quantize_folder, QuantScheme, QuantizeOptions};
    let tmp = tempfile::tempdir().unwrap();
    for (layout, dir) in [
        ("official", model()),
        ("diffusers", fixtures().join("A/model_diffusers")),
    ] {
        let f32p = OmniGenPipeline::<B>::from_dir(&dir, &Default::default()).unwrap();
        let reference = latents(&f32p.generate(&t2i()).unwrap());
        for (scheme, tol) in [(QuantScheme::Int8, 0.25f32), (QuantScheme::Fp8E4M3, 0.6)] {
            let out = tmp.path().join(format!("{layout}-{scheme}"));
            let options = QuantizeOptions::new(scheme);
            let report = quantize_folder(&dir, &out, &options).unwrap();
            assert_eq!(report.shards, 1);
            // Two layers of four projections (diffusers stores q, k and v apart).
            let per_layer = if layout == "official" { 4 } else { 6 };
            assert_eq!(report.quantized, 2 * per_layer, "{layout}");
            assert!(report.bytes_out < report.bytes_in, "{report:?}");
            // An existing output is never overwritten.
            match quantize_folder(&dir, &out, &options) {
                Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "output"),
                other => panic!("{other:?}"),
            }
            let pipe = OmniGenPipeline::<B>::from_dir(&out, &Default::default()).unwrap();
            let t = pipe.transformer();
            assert_eq!(t.weight_format(), WeightFormat::Quantized(scheme));
            let ours = latents(&pipe.generate(&t2i()).unwrap());
            let (d, r) = (max_abs_diff(&ours, &reference), rel_l2(&ours, &reference));
            println!("{layout} {scheme}: 4-step latents max abs {d:.3e}, rel L2 {r:.3e} vs f32");
            assert!(d > 0.0, "{scheme}: quantization changed nothing");
            assert!(d < tol, "{layout} {scheme} drifted {d} from f32");
            // Quantizing a quantized folder is refused.
            let again = tmp.path().join(format!("{layout}-{scheme}-again"));
            assert!(quantize_folder(&out, &again, &options).is_err());
            assert!(!again.exists());
            // Written as shards (a weight and its scale in one), the same model loads and gives
            // the same image.
            let sharded = tmp.path().join(format!("{layout}-{scheme}-shards"));
            let small = options.max_shard_bytes(64 << 10);
            let split = quantize_folder(&dir, &sharded, &small).unwrap();
            assert!(split.shards > 2, "{split:?}");
            assert_eq!(
                (split.quantized, split.copied, split.bytes_out),
                (report.quantized, report.copied, report.bytes_out)
            );
            assert!(
                split
                    .weights
                    .to_string_lossy()
                    .ends_with(".safetensors.index.json"),
                "{split:?}"
            );
            let pipe = OmniGenPipeline::<B>::from_dir(&sharded, &Default::default()).unwrap();
            assert_eq!(
                latents(&pipe.generate(&t2i()).unwrap()),
                ours,
                "{layout} {scheme} shards"
            );
        }
    }
}

#[test]
fn lora_changes_the_output_and_a_zero_scale_does_not() {
    let base = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let want = latents(&base.generate(&t2i()).unwrap());
    let lora = fixtures().join("A/lora");
    let merged = OmniGenPipeline::<B>::builder(model())
        .lora(&lora, 1.0)
        .build()
        .unwrap();
    let got = latents(&merged.generate(&t2i()).unwrap());
    // max_abs_diff counts NaN as infinite: the merged result must be finite for the bound to mean
    // "changed".
    assert!(
        got.iter().all(|v| v.is_finite()),
        "merged adapter gave non-finite latents"
    );
    let d = max_abs_diff(&got, &want);
    assert!(
        d > 1e-3,
        "a merged adapter must change the result (diff {d})"
    );
    let zero = OmniGenPipeline::<B>::builder(model())
        .lora(&lora, 0.0)
        .build()
        .unwrap();
    assert_eq!(latents(&zero.generate(&t2i()).unwrap()), want);
    let err = OmniGenPipeline::<B>::builder(model())
        .lora(fixtures().join("nope"), 1.0)
        .build();
    assert!(err.is_err());
}

#[test]
fn bad_requests_fail_before_any_work_with_the_argument_named() {
    let pipe = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let cases: Vec<(GenerationRequest, &str)> = vec![
        (t2i().size(0, 64), "height"),
        (t2i().size(64, 40), "width"),
        (t2i().steps(0), "num_inference_steps"),
        (t2i().guidance_scale(f32::INFINITY), "guidance_scale"),
        (t2i().img_guidance_scale(f32::NAN), "img_guidance_scale"),
        (t2i().num_images_per_prompt(0), "num_images_per_prompt"),
        (
            t2i().latents(InitialLatents {
                values: vec![0.0; 10],
                shape: [1, 4, 8, 8],
            }),
            "latents",
        ),
        (
            t2i().latents(InitialLatents {
                values: vec![0.0; 4 * 4 * 4],
                shape: [1, 4, 4, 4],
            }),
            "latents",
        ),
    ];
    for (req, name) in cases {
        match pipe.generate(&req) {
            Err(Error::InvalidArgument { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: expected InvalidArgument, got {other:?}"),
        }
    }
}

#[test]
fn broken_model_folders_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    };
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        copy(&model().join(f), &dir.path().join(f));
    }
    // no vae/ folder
    let err = OmniGenPipeline::<B>::from_dir(dir.path(), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("vae"), "{err}");
    for f in ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"] {
        copy(&model().join(f), &dir.path().join(f));
    }
    OmniGenPipeline::<B>::from_dir(dir.path(), &Default::default()).unwrap();
    // truncated weights
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = OmniGenPipeline::<B>::from_dir(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
    std::fs::write(&w, &bytes).unwrap();
    // malformed config
    std::fs::write(dir.path().join("config.json"), "{ nope").unwrap();
    let err = OmniGenPipeline::<B>::from_dir(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}

#[test]
fn several_images_per_prompt_and_several_prompts() {
    let pipe = OmniGenPipeline::<B>::from_dir(model(), &Default::default()).unwrap();
    let req = GenerationRequest::batch(vec![Prompt::from("a red cat"), Prompt::from("a blue dog")])
        .size(64, 48)
        .steps(2)
        .seed(11)
        .num_images_per_prompt(2);
    let gen = pipe.generate(&req).unwrap();
    assert_eq!(gen.images.len(), 4);
    assert_eq!(gen.latents.dims(), [4, 4, 8, 6]); // height 64, width 48
    assert!(gen.images.iter().all(|i| i.dimensions() == (48, 64)));
    // every image has its own noise
    for a in 0..4 {
        for b in a + 1..4 {
            assert_ne!(
                gen.images[a], gen.images[b],
                "images {a} and {b} are identical"
            );
        }
    }
    // the joint form gives the same images as the separate one
    let joint = pipe
        .generate(&req.clone().separate_cfg_infer(false))
        .unwrap();
    let (x, y) = (latents(&gen), latents(&joint));
    let d = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "joint and separate guidance differ by {d}");
}

/// Whether the backend computes a model of `dtype` weights (else it refuses to load it).
fn computes_in(dtype: DType) -> bool {
    let compute = ops::compute_dtype::<B>(dtype);
    <B as burn::tensor::backend::Backend>::supports_dtype(&Default::default(), compute)
}

/// `f` on `base`, or on `base` quantized with `scheme` on the way (as `omnigen quantize` does).
fn with_quantized<R>(
    base: &dyn omnigen_models::weights::WeightReader,
    scheme: Option<omnigen_core::QuantScheme>,
    f: impl FnOnce(&dyn omnigen_models::weights::WeightReader) -> R,
) -> R {
    match scheme {
        Some(scheme) => f(&omnigen_models::weights::QuantizingReader { base, scheme }),
        None => f(base),
    }
}

/// The memory model's mode of `dtype` weights, `quantized` or not, on the default device.
fn weight_mode(
    dtype: DType,
    quantized: Option<omnigen_core::QuantScheme>,
    offload_layers: bool,
) -> omnigen_pipeline::memory::WeightMode {
    omnigen_pipeline::memory::WeightMode {
        quantized,
        code_dtype: quantized.map_or(DType::I8, |q| ops::code_dtype::<B>(&Default::default(), q)),
        weight_dtype: dtype,
        compute_dtype: ops::compute_dtype::<B>(dtype),
        offload_layers,
    }
}

#[test]
fn the_weight_memory_model_counts_the_loaded_bytes_of_every_mode() {
    use omnigen_core::{QuantScheme, TransformerConfig, TransformerWeights, WeightSource};
    use omnigen_models::transformer::{LoadOptions, OmniGenTransformer};
    use omnigen_pipeline::memory::transformer_weight_bytes;
    let cfg = TransformerConfig::from_file(model().join("config.json")).unwrap();
    let source = WeightSource::open(model().join("model.safetensors")).unwrap();
    let values: u64 = source
        .keys()
        .iter()
        .map(|k| source.shape(k).unwrap().iter().product::<usize>() as u64)
        .sum();
    let weights = TransformerWeights::new(source).unwrap();
    for (dtype, quantized) in [
        (DType::F32, None),
        (DType::BF16, None),
        (DType::F16, None),
        (DType::F32, Some(QuantScheme::Int8)),
        (DType::BF16, Some(QuantScheme::Fp8E4M3)),
    ] {
        if !computes_in(dtype) {
            continue; // refused at load (tested above)
        }
        let model = with_quantized(&weights, quantized, |reader| {
            OmniGenTransformer::<B>::load_with(
                reader,
                &cfg,
                &Default::default(),
                dtype,
                &LoadOptions::default(),
            )
            .unwrap()
        });
        assert_eq!(
            transformer_weight_bytes(&cfg, values, weight_mode(dtype, quantized, false)),
            model.weight_bytes(),
            "{dtype:?} {quantized:?}"
        );
    }
}

#[test]
fn the_weight_memory_model_counts_two_layers_on_the_device_when_offloaded() {
    use omnigen_core::{QuantScheme, TransformerConfig};
    use omnigen_models::transformer::{LoadOptions, OmniGenTransformer};
    use omnigen_models::weights::RandomWeights;
    use omnigen_pipeline::memory::transformer_weight_bytes;
    let mut cfg = TransformerConfig::from_file(model().join("config.json")).unwrap();
    // more layers than the two a streaming model holds on the device
    cfg.num_hidden_layers = 5;
    let values = cfg.num_stored_values();
    let random = RandomWeights { seed: 3 };
    for (dtype, quantized) in [
        (DType::F32, None),
        (DType::BF16, None),
        (DType::BF16, Some(QuantScheme::Int8)),
    ] {
        if !computes_in(dtype) {
            continue;
        }
        let load = |offload_layers| {
            let options = LoadOptions {
                offload_layers,
                ..LoadOptions::as_stored()
            };
            with_quantized(&random, quantized, |reader| {
                OmniGenTransformer::<B>::load_with(
                    reader,
                    &cfg,
                    &Default::default(),
                    dtype,
                    &options,
                )
                .unwrap()
            })
        };
        let (resident, streamed) = (load(false), load(true));
        // what stays on the device, and the layers' share of a resident model
        let rest = streamed.weight_bytes() - streamed.offloaded_bytes();
        let layers = resident.weight_bytes() - rest;
        assert_eq!(
            transformer_weight_bytes(&cfg, values, weight_mode(dtype, quantized, true)),
            rest + layers / 5 * 2,
            "{dtype:?} {quantized:?}"
        );
    }
}

#[test]
fn an_offloaded_kv_cache_leaves_two_layers_of_it_on_the_device() {
    use omnigen_core::{TransformerConfig, VaeConfig};
    use omnigen_models::transformer::KvPlacement;
    use omnigen_pipeline::memory::estimate;
    use omnigen_pipeline::{OmniGenProcessor, ProcessorOptions};
    let mut cfg = TransformerConfig::from_file(model().join("config.json")).unwrap();
    cfg.num_hidden_layers = 8;
    let vae = VaeConfig::from_file(model().join("vae/config.json")).unwrap();
    let processor = OmniGenProcessor::from_tokenizer_file(model().join("tokenizer.json")).unwrap();
    let prompt = Prompt::from_text(
        "<img><|image_1|></img> make the cat green",
        vec![ConditionImage::from_path(fixtures().join("A/edit_in.png"))],
    )
    .unwrap();
    let options = ProcessorOptions {
        height: 256,
        width: 256,
        ..ProcessorOptions::default()
    };
    let batch = processor.process(&[prompt], &options).unwrap();
    let at = |kv| estimate(&batch, &cfg, &vae, None, 2, kv, None, false);
    let (device, host, none) = (
        at(Some(KvPlacement::Device)),
        at(Some(KvPlacement::Host)),
        at(None),
    );
    assert_eq!(device.kv_cache_host, 0);
    assert!(
        device.kv_cache > 0 && host.kv_cache > 0,
        "{device:?}\n{host:?}"
    );
    // two of the eight layers, of the largest call's cache
    assert!(host.kv_cache * 4 <= device.kv_cache, "{device:?}\n{host:?}");
    // every branch's cache, less what the device holds
    assert!(host.kv_cache_host >= device.kv_cache - host.kv_cache);
    assert!(host.transformer_phase() < device.transformer_phase());
    assert_eq!((none.kv_cache, none.kv_cache_host), (0, 0));
}
