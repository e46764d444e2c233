//! A whole 10-step text-to-image generation at 256×256 (guidance 2.5, official KV cache, two
//! CFG branches, VAE decode) with the committed medium config, random weights written to a
//! temporary checkpoint directory and loaded through the normal pipeline builder.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use omnigen_models::{DefaultBackend, DEFAULT_BACKEND_NAME};
use omnigen_pipeline::{GenerationRequest, KvCache, OmniGenPipeline};

mod common;

fn pipeline(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let dir = common::medium_checkpoint();
    let pipe = OmniGenPipeline::<DefaultBackend>::builder(dir.path())
        .build()
        .expect("pipeline");
    let mut group = c.benchmark_group(format!("pipeline_M_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(30));
    for (name, kv) in [("kv", KvCache::Official), ("nokv", KvCache::Off)] {
        let req = GenerationRequest::new("a red cat sitting on a blue mat")
            .size(256, 256)
            .steps(10)
            .guidance_scale(2.5)
            .seed(0)
            .kv_cache(kv);
        group.bench_function(format!("t2i_256x256_10steps_{name}"), |b| {
            b.iter(|| pipe.generate(&req).expect("generate").latents.into_data())
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
