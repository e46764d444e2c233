//! One OmniGen transformer forward on the harness's medium random config "M" (hidden 512,
//! 4 layers, 8 heads, MLP 2048), 256x256 output (256 image tokens) after a 43-token prompt
//! (S = 300, the sequence the reference `bench_ref.py` times), on the default backend.
//! Also times a cached step (time + image tokens against the cached prompt).

use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion};
use omnigen_core::{RopeScaling, TransformerConfig};
use omnigen_models::loader::RandomWeights;
use omnigen_models::transformer::{KvCacheMode, OmniGenTransformer, TransformerInput};
use omnigen_models::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};

type B = DefaultBackend;

fn config_m() -> TransformerConfig {
    let half = 512 / 8 / 2;
    TransformerConfig {
        hidden_size: 512,
        intermediate_size: 2048,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        rms_norm_eps: 1e-5,
        vocab_size: 481,
        rope_theta: 10000.0,
        max_position_embeddings: 131072,
        original_max_position_embeddings: 4096,
        rope_scaling: Some(RopeScaling::LongRope {
            short_factor: (0..half).map(|j| 1.0 + j as f64 / half as f64).collect(),
            long_factor: (0..half)
                .map(|j| 1.0 + 4.0 * j as f64 / half as f64)
                .collect(),
        }),
        patch_size: 2,
        in_channels: 4,
        pos_embed_max_size: 192,
        time_step_dim: 256,
    }
}

/// A t2i-shaped input: `text` causal tokens, the time token, `n` bidirectional image tokens.
fn input(text: usize, latent: usize, device: &burn::tensor::Device<B>) -> TransformerInput<B> {
    let n = (latent / 2) * (latent / 2);
    let s = text + 1 + n;
    let mut mask = vec![0f32; s * s];
    for r in 0..s {
        for c in 0..s {
            let visible = r > text || c <= r;
            mask[r * s + c] = if visible { 1.0 } else { 0.0 };
        }
    }
    let ids: Vec<i64> = (0..text as i64).map(|i| 1 + (i * 37) % 470).collect();
    TransformerInput {
        x: Tensor::random(
            [1, 4, latent, latent],
            Distribution::Normal(0.0, 1.0),
            device,
        ),
        timestep: Tensor::from_data(TensorData::new(vec![0.3f32], [1]), device),
        input_ids: Some(Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [1, text]),
            device,
        )),
        input_img_latents: Vec::new(),
        image_spans: Vec::new(),
        attention_mask: Tensor::from_data(TensorData::new(mask, [1, s, s]), device),
        position_ids: Tensor::<B, 2, Int>::from_data(
            TensorData::new((0..s as i64).collect::<Vec<_>>(), [1, s]),
            device,
        ),
    }
}

fn bench(c: &mut Criterion) {
    let device = default_device();
    let config = config_m();
    let model = OmniGenTransformer::<B>::load_reader(
        &RandomWeights { seed: 7 },
        &config,
        &device,
        DType::F32,
    )
    .expect("random model");
    let inp = input(43, 32, &device);
    let mut group = c.benchmark_group(format!("transformer_M_256px_{DEFAULT_BACKEND_NAME}"));
    group.sample_size(10);
    group.bench_function("forward_S300", |b| {
        b.iter(|| {
            let out = model.forward(inp.clone()).expect("forward");
            out.into_data()
        })
    });
    let (_, cache) = model
        .prefill(inp.clone(), KvCacheMode::Official)
        .expect("prefill");
    group.bench_function("forward_cached_257_of_300", |b| {
        b.iter(|| {
            let out = model
                .forward_cached(&cache, inp.x.clone(), inp.timestep.clone())
                .expect("cached");
            out.into_data()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
