//! The machine's GEMM rate on the default backend: an f32 1024³ matmul (2·1024³ FLOP), the
//! yardstick for the FLOP/s the other benches report.

use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

fn gemm(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let device = default_device();
    let mut group = c.benchmark_group(format!("gemm_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(20);
    let sizes: &[usize] = &[512, 1024];
    for &n in sizes {
        let a = Tensor::<DefaultBackend, 2>::random([n, n], Distribution::Default, &device);
        let b = Tensor::<DefaultBackend, 2>::random([n, n], Distribution::Default, &device);
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.bench_function(format!("f32_{n}"), |bch| {
            bch.iter(|| a.clone().matmul(b.clone()).into_data())
        });
    }
    group.finish();
}

criterion_group!(benches, gemm);
criterion_main!(benches);
