//! Fixture helpers shared by the VAE tests.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{DType, Tensor, TensorData};
use omnigen_models::vae::AutoencoderKL;
use omnigen_models::{default_device, DefaultBackend};

pub type B = DefaultBackend;

/// `tests/fixtures/<rel>` at the repository root.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// The tiny random VAE of fixture set A.
pub fn tiny_vae() -> AutoencoderKL<B> {
    vae_of("A")
}

/// The tiny random VAE of fixture set `set` (`"A"`, `"B"`).
pub fn vae_of(set: &str) -> AutoencoderKL<B> {
    AutoencoderKL::from_dir(
        &fixture(&format!("{set}/model/vae")),
        &default_device(),
        DType::F32,
    )
    .expect("load tiny VAE")
}

/// A U8 image tensor of a fixture (`proc.*.pixel_u8.*`) as the pipeline's F32 pixels in
/// [-1, 1]: `(u8 / 255 - 0.5) / 0.5`, computed in f32 as torchvision does.
pub fn read_pixels_u8(file: &str, name: &str) -> Tensor<B, 4> {
    let bytes = std::fs::read(fixture(file)).expect("read fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse fixture");
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{name} in {file}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::U8, "{name}");
    let values: Vec<f32> = view
        .data()
        .iter()
        .map(|&v| (v as f32 / 255.0 - 0.5) / 0.5)
        .collect();
    Tensor::from_data(
        TensorData::new(values, view.shape().to_vec()),
        &default_device(),
    )
}

/// An F32 tensor of a fixture safetensors file.
pub fn read<const D: usize>(file: &str, name: &str) -> Tensor<B, D> {
    read_path(&fixture(file), name)
}

/// An F32 tensor of any safetensors file.
pub fn read_path<const D: usize>(path: &std::path::Path, name: &str) -> Tensor<B, D> {
    let file = path.display();
    let bytes = std::fs::read(path).expect("read fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse fixture");
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{name} in {file}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_data(
        TensorData::new(values, view.shape().to_vec()),
        &default_device(),
    )
}

/// Largest absolute elementwise difference (shapes must match).
pub fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).abs().max().into_scalar()
}
