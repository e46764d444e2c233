//! Decode of a 32×32 latent to a 256×256 image with the SDXL VAE architecture (deterministic
//! random weights, f32) on the default backend.
//!
//! `cargo bench --bench vae_decode` (add `-- --quick` for a fast estimate).

use std::time::Duration;

use burn::tensor::{DType, Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use omnigen_core::VaeConfig;
use omnigen_models::loader::RandomWeights;
use omnigen_models::vae::AutoencoderKL;
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

fn vae_decode(c: &mut Criterion) {
    let device = default_device();
    let config = VaeConfig::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/real/vae_config.json"
    ))
    .expect("SDXL VAE config");
    let vae = AutoencoderKL::<DefaultBackend>::load(
        &RandomWeights { seed: 0 },
        &config,
        &device,
        DType::F32,
    )
    .expect("build SDXL VAE");
    let latents = Tensor::<DefaultBackend, 4>::random(
        [1, 4, 32, 32],
        Distribution::Normal(0.0, 1.0),
        &device,
    );

    let mut group = c.benchmark_group("vae_decode");
    // One decode takes on the order of a second on a small CPU: few samples, no long warm-up.
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function(format!("sdxl_256x256_f32_{DEFAULT_BACKEND_NAME}"), |b| {
        // Reading the result back waits for asynchronous backends to finish.
        b.iter(|| {
            vae.decode_latents(latents.clone())
                .expect("decode")
                .into_data()
        })
    });
    group.finish();
}

criterion_group!(benches, vae_decode);
criterion_main!(benches);
