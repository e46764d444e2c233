//! The machine's GEMM rate on the default backend: an f32 1024³ matmul (2·1024³ FLOP), the
//! yardstick for the FLOP/s the other benches report; and the transformer's f32 linear layers
//! at the real width as [`ops::linear`] runs them, at the sequence lengths of 512² and 1024²
//! (S = 1,068 and 4,140), throughput `2·S·in·out`, in both storage orders of the weight:
//! `input_major` (`[in, out]` contiguous) and `view` (the PyTorch-layout `[out, in]` read
//! through its transposed view); the loader's (`KernelBackend::F32_LINEAR_INPUT_MAJOR`) first.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use omnigen_models::ops::{self, LinearLayer};
use omnigen_models::{default_device, DefaultBackend, KernelBackend, DEFAULT_BACKEND_NAME};

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
        let normal = Distribution::Normal(0.0, 0.02);
        let stored = Tensor::<B, 2>::random([d_out, d_in], normal, &device);
        // The two storage orders of the same `[in, out]` weight, the loader's first.
        let input_major = stored.clone().transpose().into_data();
        let mut layouts = vec![
            (
                "input_major",
                Tensor::<B, 2>::from_data(input_major, &device),
            ),
            ("view", stored.transpose()),
        ];
        if !<B as KernelBackend>::F32_LINEAR_INPUT_MAJOR {
            layouts.reverse();
        }
        for (layout, weight) in layouts {
            let layer = LinearLayer::Dense(Linear {
                weight: Param::from_tensor(weight),
                bias: None,
            });
            for s in [1068usize, 4140] {
                let x =
                    Tensor::<B, 3>::random([1, s, d_in], Distribution::Normal(0.0, 1.0), &device);
                group.throughput(Throughput::Elements(2 * (s * d_in * d_out) as u64));
                group.bench_function(format!("{name}_s{s}_{layout}"), |bch| {
                    bch.iter(|| ops::linear(&layer, x.clone()).into_data())
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, gemm, linear_layers);
criterion_main!(benches);
