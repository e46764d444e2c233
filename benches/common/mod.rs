//! Shared set-up of the criterion benches: the medium random config "M" committed in
//! `benches/configs/medium/` (the same config as `tools/reference/make_tiny.py --config M`:
//! hidden 512, 4 layers, 8 heads, MLP 2048, SDXL-architecture VAE), materialised as a complete
//! checkpoint directory with deterministic random weights so that every loading path
//! (`from_dir`, the pipeline builder) runs as with a real checkpoint.
#![allow(dead_code)]

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use omnigen_core::{Result, TransformerConfig, VaeConfig};
use omnigen_models::transformer::OmniGenTransformer;
use omnigen_models::vae::AutoencoderKL;
use omnigen_models::weights::{RandomWeights, WeightReader};
use omnigen_models::{default_device, DefaultBackend};

/// The committed config directory.
pub fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/medium")
}

pub fn transformer_config() -> TransformerConfig {
    TransformerConfig::from_file(config_dir().join("config.json")).expect("medium config")
}

/// The medium transformer with deterministic random weights, f32, on the default device.
pub fn random_transformer() -> OmniGenTransformer<DefaultBackend> {
    OmniGenTransformer::load_reader(
        &RandomWeights { seed: 7 },
        &transformer_config(),
        &default_device(),
        DType::F32,
    )
    .expect("random transformer")
}

/// The medium (SDXL-architecture) VAE with deterministic random weights, f32.
pub fn random_vae() -> AutoencoderKL<DefaultBackend> {
    AutoencoderKL::load(
        &RandomWeights { seed: 0 },
        &vae_config(),
        &default_device(),
        DType::F32,
    )
    .expect("random VAE")
}

pub fn vae_config() -> VaeConfig {
    VaeConfig::from_file(config_dir().join("vae/config.json")).expect("medium VAE config")
}

/// A recorded tensor: key, shape, f32 values.
type Recorded = (String, Vec<usize>, Vec<f32>);

/// Records every tensor a model reads (key, shape, f32 values) from [`RandomWeights`].
struct Recorder {
    inner: RandomWeights,
    seen: RefCell<Vec<Recorded>>,
}

impl WeightReader for Recorder {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        let data = self.inner.read(key, shape, DType::F32)?;
        let values = data.to_vec::<f32>().expect("f32 values");
        self.seen
            .borrow_mut()
            .push((key.to_string(), shape.to_vec(), values));
        Ok(data.convert_dtype(dtype))
    }
}

fn write_safetensors(path: &Path, tensors: &[Recorded]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, shape, v)| {
            let bytes: &[u8] = bytemuck_cast(v);
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("tensor view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn bytemuck_cast(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A complete official-layout checkpoint of config M with random weights, written once per
/// process into a temporary directory (kept for the life of the returned guard).
pub fn medium_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = config_dir();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy config");
    }
    std::fs::create_dir(dir.path().join("vae")).expect("vae dir");
    std::fs::copy(
        src.join("vae/config.json"),
        dir.path().join("vae/config.json"),
    )
    .expect("copy vae config");
    let device = default_device();
    let rec = Recorder {
        inner: RandomWeights { seed: 7 },
        seen: RefCell::new(Vec::new()),
    };
    OmniGenTransformer::<DefaultBackend>::load_reader(
        &rec,
        &transformer_config(),
        &device,
        DType::F32,
    )
    .expect("random transformer");
    write_safetensors(&dir.path().join("model.safetensors"), &rec.seen.take());
    AutoencoderKL::<DefaultBackend>::load(&rec, &vae_config(), &device, DType::F32)
        .expect("random VAE");
    write_safetensors(
        &dir.path().join("vae/diffusion_pytorch_model.safetensors"),
        &rec.seen.take(),
    );
    dir
}

/// Multiply-add FLOPs (2 per MAC) of one transformer forward: `s_new` tokens attending to
/// `s_kv` keys (linear layers, scores and weighted sum; norms and RoPE are not counted).
pub fn transformer_flops(cfg: &TransformerConfig, s_new: usize, s_kv: usize) -> u64 {
    let (d, i, l) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.num_hidden_layers as u64,
    );
    let (s, k) = (s_new as u64, s_kv as u64);
    let linear = 2 * s * d * (3 * d + d + 2 * i + i);
    let attn = 2 * 2 * s * k * d;
    l * (linear + attn)
}

fn conv_flops(c_in: usize, c_out: usize, k: usize, h: usize, w: usize) -> u64 {
    2 * (c_in * c_out * k * k * h * w) as u64
}

/// FLOPs of `n` resnet blocks at `hh×ww`, the first mapping `c_in` to `c_out` (with a 1×1
/// shortcut when they differ), the others `c_out` to `c_out`.
fn resnets_flops(n: usize, c_in: usize, c_out: usize, hh: usize, ww: usize) -> u64 {
    (0..n)
        .map(|r| {
            let ci = if r == 0 { c_in } else { c_out };
            let shortcut = if ci != c_out {
                conv_flops(ci, c_out, 1, hh, ww)
            } else {
                0
            };
            conv_flops(ci, c_out, 3, hh, ww) + conv_flops(c_out, c_out, 3, hh, ww) + shortcut
        })
        .sum()
}

/// FLOPs of the SDXL-style decoder for a `h×w` output (convolutions and mid attention).
pub fn vae_decode_flops(cfg: &VaeConfig, h: usize, w: usize) -> u64 {
    let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let n = ch.len();
    let (mut hh, mut ww) = (h >> (n - 1), w >> (n - 1));
    let mut f = conv_flops(cfg.latent_channels, ch[0], 3, hh, ww);
    f += 4 * conv_flops(ch[0], ch[0], 3, hh, ww); // mid resnets
    f += 2 * 4 * (hh * ww * ch[0] * ch[0]) as u64 + 2 * 2 * ((hh * ww).pow(2) * ch[0]) as u64;
    let mut c = ch[0];
    for (b, &co) in ch.iter().enumerate() {
        f += resnets_flops(cfg.layers_per_block + 1, c, co, hh, ww);
        c = co;
        if b + 1 < n {
            hh *= 2;
            ww *= 2;
            f += conv_flops(co, co, 3, hh, ww);
        }
    }
    f + conv_flops(c, cfg.out_channels, 3, hh, ww)
}

/// FLOPs of the encoder for a `h×w` input.
pub fn vae_encode_flops(cfg: &VaeConfig, h: usize, w: usize) -> u64 {
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let (mut hh, mut ww) = (h, w);
    let mut f = conv_flops(cfg.in_channels, ch[0], 3, hh, ww);
    let mut c = ch[0];
    for (b, &co) in ch.iter().enumerate() {
        f += resnets_flops(cfg.layers_per_block, c, co, hh, ww);
        c = co;
        if b + 1 < n {
            hh /= 2;
            ww /= 2;
            f += conv_flops(co, co, 3, hh, ww);
        }
    }
    f += 4 * conv_flops(c, c, 3, hh, ww);
    f += 2 * 4 * (hh * ww * c * c) as u64 + 2 * 2 * ((hh * ww).pow(2) * c) as u64;
    f + conv_flops(c, 2 * cfg.latent_channels, 3, hh, ww)
}
