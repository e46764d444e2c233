//! The machine's GEMM rate on the default backend: an f32 1024³ matmul (2·1024³ FLOP), the
//! yardstick for the FLOP/s the other benches report; and the transformer's f32 linear layers
//! at the real width as [`ops::linear`] runs them (the PyTorch-layout weight read through its
//! transposed view, as the loader builds it), at the sequence lengths of 512² and 1024²
//! (S = 1,068 and 4,140), throughput `2·S·in·out`.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use omnigen_models::ops::{self, LinearLayer};
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

type B = DefaultBackend;

fn gemm(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let device = default_device();
    let mut group = c.benchmark_group(format!("gemm_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(20);
    let sizes: &[usize] = &[512, 1024];
    for &n in sizes {
        let a = Tensor::<B, 2>::random([n, n], Distribution::Default, &device);
        let b = Tensor::<B, 2>::random([n, n], Distribution::Default, &device);
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.bench_function(format!("f32_{n}"), |bch| {
            bch.iter(|| a.clone().matmul(b.clone()).into_data())
        });
    }
    group.finish();
}

/// `qkv_proj`, `o_proj`, `gate_up_proj` and `down_proj` of one decoder layer: (name, in, out).
const LAYERS: [(&str, usize, usize); 4] = [
    ("qkv", 3072, 9216),
    ("o", 3072, 3072),
    ("gate_up", 3072, 16384),
    ("down", 8192, 3072),
];

fn linear_layers(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let device = default_device();
    let mut group = c.benchmark_group(format!("linear_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(10);
    for (name, d_in, d_out) in LAYERS {
        let w = Tensor::<B, 2>::random([d_out, d_in], Distribution::Normal(0.0, 0.02), &device);
        let layer = LinearLayer::Dense(Linear {
            weight: Param::from_tensor(w.transpose()),
            bias: None,
        });
        for s in [1068usize, 4140] {
            let x = Tensor::<B, 3>::random([1, s, d_in], Distribution::Normal(0.0, 1.0), &device);
            group.throughput(Throughput::Elements(2 * (s * d_in * d_out) as u64));
            group.bench_function(format!("{name}_s{s}"), |bch| {
                bch.iter(|| ops::linear(&layer, x.clone()).into_data())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, gemm, linear_layers);
criterion_main!(benches);
