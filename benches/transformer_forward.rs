//! OmniGen transformer on the committed medium config M (`benches/configs/medium`: hidden 512,
//! 4 layers, 8 heads, MLP 2048), 256x256 output (256 image tokens) after the 43-token t2i
//! prompt (S = 300, the sequence `tools/reference/bench.py` times), on the default backend:
//! the uncached forward, the first step with a KV cache (prefill) and a cached step (time +
//! image tokens against the cached prompt). Throughput is reported in FLOP/s ("elem/s"):
//! compare with the `gemm` bench's rate on the same machine.

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use omnigen_models::transformer::{KeyRanges, KvCacheMode, TransformerCondition};
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

mod common;

type B = DefaultBackend;

/// A t2i-shaped call: `text` causal tokens, the time token, `n` bidirectional image tokens; the
/// condition, the noisy latents and the timestep.
fn input(
    text: usize,
    latent: usize,
    device: &burn::tensor::Device<B>,
) -> (TransformerCondition<B>, Tensor<B, 4>, Tensor<B, 1>) {
    let n = (latent / 2) * (latent / 2);
    let s = text + 1 + n;
    // Text rows are causal; the time and image rows see every token.
    let ranges = (0..s)
        .map(|r| if r < text { (0, r + 1) } else { (0, s) })
        .collect();
    let mask = KeyRanges::new(1, s, s, ranges).expect("ranges within the sequence");
    let ids: Vec<i64> = (0..text as i64).map(|i| 1 + (i * 37) % 470).collect();
    let x = Tensor::random(
        [1, 4, latent, latent],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let timestep = Tensor::from_data(TensorData::new(vec![0.3f32], [1]), device);
    let cond = TransformerCondition {
        input_ids: Some(Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [1, text]),
            device,
        )),
        input_img_latents: Vec::new(),
        image_spans: Vec::new(),
        attention_mask: mask,
        position_ids: Tensor::<B, 2, Int>::from_data(
            TensorData::new((0..s as i64).collect::<Vec<_>>(), [1, s]),
            device,
        ),
    };
    (cond, x, timestep)
}

fn bench(c: &mut Criterion) {
    omnigen_models::tune_host_allocator();
    let device = default_device();
    let config = common::transformer_config();
    let model = common::random_transformer();
    let (text, latent) = (43, 32);
    let (cond, x, timestep) = input(text, latent, &device);
    let s = text + 1 + (latent / 2) * (latent / 2);
    let mut group = c.benchmark_group(format!("transformer_M_256px_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(10);
    let official = KvCacheMode::Official;
    let (_, cache) = model
        .prefill(&cond, x.clone(), timestep.clone(), official)
        .expect("prefill");
    type Call<'a> = Box<dyn Fn() -> omnigen_core::Result<Tensor<B, 4>> + 'a>;
    // (name, new tokens, keys per token, the call)
    let calls: [(&str, usize, Call); 3] = [
        (
            "forward_S300",
            s,
            Box::new(|| model.forward(&cond, x.clone(), timestep.clone())),
        ),
        (
            "prefill_S300",
            s,
            Box::new(|| {
                let out = model.prefill(&cond, x.clone(), timestep.clone(), official);
                out.map(|(out, _cache)| out)
            }),
        ),
        (
            "forward_cached_257_of_300",
            s - text,
            Box::new(|| model.forward_cached(&cache, x.clone(), timestep.clone())),
        ),
    ];
    for (name, s_new, call) in calls {
        let flops = common::transformer_flops(&config, s_new, s);
        group.throughput(Throughput::Elements(flops));
        // Reading each output back waits for asynchronous backends to finish.
        group.bench_function(name, |b| b.iter(|| call().map(Tensor::into_data)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
