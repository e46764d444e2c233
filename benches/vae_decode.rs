//! SDXL-architecture VAE (the committed medium config, `benches/configs/medium/vae`,
//! deterministic random weights, f32) on the default backend: decode of a 32×32 latent to
//! 256×256 (and 64×64 to 512×512), encode of a 256×256 image. Throughput in FLOP/s ("elem/s").
//!
//! `cargo bench --bench vae_decode` (add `-- --quick` for a fast estimate).

use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

mod common;

fn vae(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let device = default_device();
    let config = common::vae_config();
    let vae = common::random_vae();

    let mut group = c.benchmark_group(format!("vae_{DEFAULT_BACKEND_NAME}"));
    // One decode takes seconds on a small CPU: few samples, no long warm-up.
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    let sizes: &[usize] = if std::env::var_os("OMNIGEN_BENCH_512").is_some() {
        &[256, 512]
    } else {
        &[256]
    };
    for &px in sizes {
        let latents = Tensor::<DefaultBackend, 4>::random(
            [1, 4, px / 8, px / 8],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        group.throughput(Throughput::Elements(common::vae_decode_flops(
            &config, px, px,
        )));
        group.bench_function(format!("decode_{px}x{px}_f32"), |b| {
            // Reading the result back waits for asynchronous backends to finish.
            b.iter(|| vae.decode(latents.clone()).expect("decode").into_data())
        });
    }
    let image = Tensor::<DefaultBackend, 4>::random(
        [1, 3, 256, 256],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    group.throughput(Throughput::Elements(common::vae_encode_flops(
        &config, 256, 256,
    )));
    group.bench_function("encode_256x256_f32", |b| {
        b.iter(|| vae.encode(image.clone()).expect("encode").mean.into_data())
    });
    group.finish();
}

criterion_group!(benches, vae);
criterion_main!(benches);
