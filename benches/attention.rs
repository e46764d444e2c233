//! Attention alone at the real model width (32 heads × 96), one guidance branch, as
//! [`ops::attention`] runs it in every layer: the t2i mask (causal text, then the time and
//! image tokens seeing everything) at 512² (S = 1,068) and 1024² (S = 4,140) with the prompt
//! of `tools/reference/bench.py`. Throughput is the attention FLOPs (`4·S²·hd·H`) per second:
//! compare with the `gemm` bench's rate on the same machine.

use burn::tensor::{DType, Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use omnigen_models::ops::{self, HeadRange, KeyRanges};
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

type B = DefaultBackend;

const HEADS: usize = 32;
const HEAD_DIM: usize = 96;
const TEXT: usize = 43;

fn attention(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let device = default_device();
    let mut group = c.benchmark_group(format!("attention_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(10);
    for side in [512usize, 1024] {
        let s = TEXT + 1 + (side / 16) * (side / 16);
        let ranges = (0..s)
            .map(|r| if r < TEXT { (0, r + 1) } else { (0, s) })
            .collect();
        let mask = KeyRanges::new(1, s, s, ranges).expect("ranges within the sequence");
        let bias = ops::attention_bias::<B>(&mask, DType::F32, &device);
        // q | k | v heads of one fused projection, as the layers hold them.
        let qkv = Tensor::<B, 4>::random(
            [1, 3 * HEADS, s, HEAD_DIM],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        group.throughput(Throughput::Elements((4 * s * s * HEAD_DIM * HEADS) as u64));
        group.bench_function(format!("s{s}"), |bch| {
            bch.iter(|| {
                ops::attention(
                    HeadRange::new(qkv.clone(), 0, HEADS),
                    HeadRange::new(qkv.clone(), HEADS, HEADS),
                    HeadRange::new(qkv.clone(), 2 * HEADS, HEADS),
                    &bias,
                )
                .into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
