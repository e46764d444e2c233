//! Wall-time benchmark of this crate on a model directory, the Rust half of
//! `tools/bench_compare.py` (the PyTorch half is `tools/reference/bench.py`, which runs the
//! official code on the same directory, sizes, prompt, steps and thread count).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_side -- \
//!     --model-dir /tmp/omnigen_bench_M --runs 5 --size 256
//! ```
//! Prints one JSON object: per workload the median, min and every run in seconds (after one
//! warm-up), the measured GEMM rate, and the process's peak resident memory (`VmHWM`).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use clap::Parser;
use omnigen::core::QuantScheme;
use omnigen::models::transformer::{
    KvCacheMode, KvPlacement, LoadOptions, OmniGenTransformer, TransformerCondition,
};
use omnigen::models::vae::AutoencoderKL;
use omnigen::models::weights::{QuantizingReader, RandomWeights, WeightReader};
use omnigen::models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};
use omnigen::pipeline::{
    GenerationRequest, KvCache, OmniGenPipeline, OmniGenProcessor, ProcessorOptions,
};

type B = DefaultBackend;

#[derive(Parser, Debug)]
struct Args {
    /// Model directory in the official layout (e.g. `make_tiny.py --config M`).
    #[arg(long)]
    model_dir: PathBuf,
    /// Timed runs per workload (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Output image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Denoising steps of the pipeline workloads.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Comma-separated subset of workloads (default: all).
    #[arg(long)]
    only: Option<String>,
    /// Leave glibc's allocator settings alone (see `tune_host_allocator`).
    #[arg(long)]
    no_tune_alloc: bool,
    /// Transformer weight dtype: f32, bf16 or f16 (on the CPU backends bf16/f16 weights run
    /// with f32 activations), or int8 / fp8 (with `--random-weights`: the decoder layers'
    /// linears quantized as `omnigen quantize` does).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The transformer workloads load deterministic random weights of the model directory's
    /// `config.json` shapes instead of its checkpoint: real-width configs without a multi-GB
    /// file (the directory then needs only the config and tokenizer).
    #[arg(long)]
    random_weights: bool,
    /// Keep the transformer's decoder layers in host memory, streamed to the device (GPU
    /// backends; a no-op in the pipeline on the CPU backends).
    #[arg(long)]
    offload_model: bool,
    /// Keep the kv cache in host memory (GPU backends).
    #[arg(long)]
    offload_kv: bool,
}

const PROMPT: &str = "a red cat sitting on a blue mat";

fn timed(runs: usize, mut f: impl FnMut()) -> serde_json::Value {
    f(); // warm-up
    let mut ts: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let runs_s = ts.clone();
    ts.sort_by(|a, b| a.total_cmp(b));
    let median = if ts.len() % 2 == 1 {
        ts[ts.len() / 2]
    } else {
        (ts[ts.len() / 2 - 1] + ts[ts.len() / 2]) / 2.0
    };
    serde_json::json!({"median_s": median, "min_s": ts[0], "runs_s": runs_s})
}

/// The JSON object printed at the end, and which workloads were asked for.
struct Results<'a> {
    map: serde_json::Map<String, serde_json::Value>,
    only: Option<&'a str>,
    runs: usize,
}

impl Results<'_> {
    fn wants(&self, name: &str) -> bool {
        self.only.is_none_or(|o| o.split(',').any(|w| w == name))
    }

    /// Times `f` as workload `name` when it was asked for.
    fn time(&mut self, name: &str, f: impl FnMut()) {
        if self.wants(name) {
            let v = timed(self.runs, f);
            self.map.insert(name.into(), v);
        }
    }
}

/// `--dtype`: a weight dtype, or `int8` / `fp8` (f32 compute, decoder linears quantized).
fn parse_mode(name: &str) -> anyhow::Result<(DType, Option<QuantScheme>)> {
    Ok(match name {
        "f32" => (DType::F32, None),
        "bf16" => (DType::BF16, None),
        "f16" => (DType::F16, None),
        other => match QuantScheme::parse(other) {
            Some(q) => (DType::F32, Some(q)),
            None => anyhow::bail!("unknown dtype {other}"),
        },
    })
}

fn f32s<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap_or_default()
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.no_tune_alloc {
        omnigen::models::tune_host_allocator();
    }
    let device = default_device();
    let (dtype, quantized) = parse_mode(&args.dtype)?;
    if quantized.is_some() && !args.random_weights {
        anyhow::bail!("--dtype int8/fp8 quantizes random weights; for a checkpoint, run `omnigen quantize` and pass its folder");
    }
    let (h, w) = (args.size, args.size);
    let mut res = Results {
        map: serde_json::Map::new(),
        only: args.only.as_deref(),
        runs: args.runs,
    };
    res.map
        .insert("backend".into(), DEFAULT_BACKEND_NAME.into());
    res.map.insert(
        "threads".into(),
        std::env::var("RAYON_NUM_THREADS")
            .unwrap_or_else(|_| "default".into())
            .into(),
    );
    res.map.insert("size".into(), serde_json::json!([h, w]));
    res.map.insert("steps".into(), args.steps.into());
    res.map.insert("runs".into(), args.runs.into());
    res.map.insert("dtype".into(), args.dtype.clone().into());
    res.map
        .insert("tuned_allocator".into(), (!args.no_tune_alloc).into());

    if res.wants("gemm") {
        let n = 1024;
        let a = Tensor::<B, 2>::random([n, n], Distribution::Default, &device);
        let b = Tensor::<B, 2>::random([n, n], Distribution::Default, &device);
        let mut v = timed(args.runs, || {
            let _ = a.clone().matmul(b.clone()).into_data();
        });
        let gflops = 2.0 * (n as f64).powi(3) / 1e9 / v["median_s"].as_f64().unwrap_or(1.0);
        v["gflops"] = gflops.into();
        res.map.insert("gemm_1024".into(), v);
    }

    if res.wants("transformer_load") {
        // The checkpoint to the transformer's parameters, alone; its rate in bytes loaded.
        let mut loaded = 0u64;
        res.time("transformer_load", || {
            let m = OmniGenTransformer::<B>::from_dir(&args.model_dir, &device, dtype);
            loaded = m.expect("load").weight_bytes();
        });
        let median = res.map["transformer_load"]["median_s"]
            .as_f64()
            .unwrap_or(1.0);
        res.map["transformer_load"]["gb_per_s"] = (loaded as f64 / 1e9 / median).into();
        res.map["transformer_load"]["bytes"] = loaded.into();
    }

    if [
        "transformer_forward",
        "transformer_prefill",
        "transformer_cached",
        "accuracy",
    ]
    .iter()
    .any(|n| res.wants(n))
    {
        let load = |dtype: DType, quantized: Option<QuantScheme>| {
            if args.random_weights {
                let config = omnigen::core::TransformerConfig::from_file(
                    args.model_dir.join("config.json"),
                )?;
                let random = RandomWeights { seed: 7 };
                let quantizing;
                let reader: &dyn WeightReader = match quantized {
                    Some(scheme) => {
                        quantizing = QuantizingReader {
                            base: &random,
                            scheme,
                        };
                        &quantizing
                    }
                    None => &random,
                };
                let options = LoadOptions {
                    offload_layers: args.offload_model,
                    ..LoadOptions::as_stored()
                };
                OmniGenTransformer::<B>::load_with(reader, &config, &device, dtype, &options)
            } else {
                let options = LoadOptions {
                    offload_layers: args.offload_model,
                    ..LoadOptions::default()
                };
                OmniGenTransformer::<B>::from_dir_with(&args.model_dir, &device, dtype, &options)
            }
        };
        let model = load(dtype, quantized)?;
        if let Some(mem) = omnigen::models::ops::device_memory::<B>(&device) {
            res.map.insert(
                "device_in_use_after_load_mib".into(),
                mib(mem.in_use).into(),
            );
        }
        res.map
            .insert("weights".into(), model.weight_format().name().into());
        res.map
            .insert("weight_bytes".into(), model.weight_bytes().into());
        let processor = OmniGenProcessor::from_dir(&args.model_dir)?;
        let options = ProcessorOptions {
            height: h,
            width: w,
            negative_prompt: None,
            use_img_guidance: false,
            max_input_image_size: 1024,
            use_input_image_size_as_output: false,
            separate_cfg_infer: true,
        };
        let batch = processor.process(&[PROMPT.into()], &options)?;
        let m = batch.model_inputs()[0].clone(); // the condition branch
        let x = Tensor::<B, 4>::random(
            [1, 4, h / 8, w / 8],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .cast(model.dtype());
        let timestep = Tensor::<B, 1>::from_data(TensorData::new(vec![0.5f32], [1]), &device)
            .cast(model.dtype());
        let cond = TransformerCondition::<B> {
            input_ids: Some(Tensor::<B, 2, Int>::from_data(
                TensorData::new(m.input_ids.clone(), m.input_ids_shape()),
                &device,
            )),
            input_img_latents: Vec::new(),
            image_spans: m.image_spans.clone(),
            attention_mask: m.key_ranges()?,
            position_ids: Tensor::from_data(
                TensorData::new(m.position_ids.clone(), m.position_ids_shape()),
                &device,
            ),
        };
        res.map.insert("seq_len".into(), m.seq_len.into());
        // Reading each output back waits for asynchronous backends to finish.
        res.time("transformer_forward", || {
            let out = model.forward(&cond, x.clone(), timestep.clone());
            out.expect("forward").into_data();
        });
        let official = KvCacheMode::Official;
        let placement = if args.offload_kv {
            KvPlacement::Host
        } else {
            KvPlacement::Device
        };
        let prefill =
            || model.prefill_with(&cond, x.clone(), timestep.clone(), official, placement);
        res.time("transformer_prefill", || {
            prefill().expect("prefill").0.into_data();
        });
        if res.wants("transformer_cached") {
            let (_, cache) = prefill()?;
            res.time("transformer_cached", || {
                let out = model.forward_cached(&cache, x.clone(), timestep.clone());
                out.expect("cached").into_data();
            });
        }
        if res.wants("accuracy") {
            drop(model);
            // One forward at t = 0.5 and the latents after 4 Euler steps (t = 0, ¼, ½, ¾ -> 1,
            // no guidance) of every weight mode against f32 on the same inputs.
            let x = x.cast(DType::F32);
            let run = |model: &OmniGenTransformer<B>| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
                let dt = model.dtype();
                let t = |v: f32| {
                    Tensor::<B, 1>::from_data(TensorData::new(vec![v], [1]), &device).cast(dt)
                };
                let out = model.forward(&cond, x.clone().cast(dt), t(0.5))?;
                let mut lat = x.clone();
                for k in 0..4 {
                    let v = model.forward(&cond, lat.clone().cast(dt), t(k as f32 / 4.0))?;
                    lat = lat + v.cast(DType::F32) * 0.25;
                }
                Ok((f32s(out.cast(DType::F32)), f32s(lat)))
            };
            let (ref_out, ref_lat) = run(&load(DType::F32, None)?)?;
            let mut acc = serde_json::Map::new();
            for name in ["bf16", "f16", "int8", "fp8"] {
                let (dt, q) = parse_mode(name)?;
                let (out, lat) = run(&load(dt, q)?)?;
                acc.insert(
                    name.into(),
                    serde_json::json!({
                        "forward_max_abs": max_abs(&out, &ref_out),
                        "forward_rel_l2": rel_l2(&out, &ref_out),
                        "latents4_max_abs": max_abs(&lat, &ref_lat),
                        "latents4_rel_l2": rel_l2(&lat, &ref_lat),
                    }),
                );
            }
            acc.insert(
                "forward_max_abs_f32".into(),
                max_abs(&ref_out, &vec![0.0; ref_out.len()]).into(),
            );
            res.map.insert("accuracy".into(), acc.into());
        }
    }

    if res.wants("vae_decode") || res.wants("vae_encode") {
        let vae_dir = omnigen::core::ModelFolder::open(&args.model_dir)?.vae_dir()?;
        let vae = AutoencoderKL::<B>::from_dir(&vae_dir, &device, DType::F32)?;
        let normal = Distribution::Normal(0.0, 1.0);
        let z = Tensor::<B, 4>::random([1, 4, h / 8, w / 8], normal, &device);
        res.time("vae_decode", || {
            vae.decode(z.clone()).expect("decode").into_data();
        });
        let img = Tensor::<B, 4>::random([1, 3, h, w], Distribution::Uniform(-1.0, 1.0), &device);
        res.time("vae_encode", || {
            vae.encode(img.clone()).expect("encode").mean.into_data();
        });
    }

    // Checkpoint load (mmap, straight into the target dtype): tokenizer, transformer, VAE.
    res.time("load", || {
        let pipeline = OmniGenPipeline::<B>::builder(&args.model_dir).dtype(dtype);
        pipeline.build().expect("load");
    });

    if res.wants("pipeline_kv") || res.wants("pipeline_nokv") {
        let pipe = OmniGenPipeline::<B>::builder(&args.model_dir)
            .dtype(dtype)
            .offload_model(args.offload_model)
            .build()?;
        for (name, kv) in [
            ("pipeline_kv", KvCache::Official),
            ("pipeline_nokv", KvCache::Off),
        ] {
            let req = GenerationRequest::new(PROMPT)
                .size(h, w)
                .steps(args.steps)
                .guidance_scale(2.5)
                .seed(0)
                .kv_cache(kv)
                // Off unless asked, as the official side runs (`--no-offload-kv-cache`): the
                // cache stays on the device of a GPU backend (the CPU backends hold it in host
                // memory either way).
                .offload_kv_cache(args.offload_kv);
            res.time(name, || {
                pipe.generate(&req).expect("generate");
            });
        }
    }
    // What the device's memory pools hold after the runs (GPU backends): pools keep what they
    // reserve, so this is close to the runs' peak.
    if let Some(mem) = omnigen::models::ops::device_memory::<B>(&device) {
        res.map
            .insert("device_reserved_mib".into(), mib(mem.reserved).into());
        res.map
            .insert("device_in_use_mib".into(), mib(mem.in_use).into());
    }
    // Peak resident memory of this process (Linux), MiB.
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        {
            res.map.insert("peak_rss_mib".into(), (kb / 1024.0).into());
        }
    }
    println!("{}", serde_json::Value::Object(res.map));
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
