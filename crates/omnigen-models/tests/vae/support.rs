//! Fixture helpers shared by the VAE tests (reading and comparing are `omnigen-test-support`'s).
#![allow(dead_code)]

use burn::tensor::{DType, Tensor, TensorData};
use omnigen_core::VaeConfig;
use omnigen_models::vae::AutoencoderKL;
use omnigen_models::weights::RandomWeights;
use omnigen_models::{default_device, DefaultBackend};
use omnigen_test_support::{tensor_max_abs_diff, test_dtype, Dtype, SafetensorsFile};

pub use omnigen_test_support::fixture;

pub type B = DefaultBackend;

/// The tiny random VAE of fixture set A.
pub fn tiny_vae() -> AutoencoderKL<B> {
    vae_of("A")
}

/// The tiny random VAE of fixture set `set` (`"A"`, `"B"`).
pub fn vae_of(set: &str) -> AutoencoderKL<B> {
    AutoencoderKL::from_dir(
        &fixture(format!("{set}/model/vae")),
        &default_device(),
        test_dtype(),
    )
    .expect("load tiny VAE")
}

/// A VAE of `config` with random weights (`seed`): the architecture without a checkpoint.
pub fn random_vae(config: &VaeConfig, seed: u64) -> omnigen_core::Result<AutoencoderKL<B>> {
    AutoencoderKL::load(
        &RandomWeights { seed },
        config,
        &default_device(),
        DType::F32,
    )
}

/// A U8 image tensor of a fixture (`proc.*.pixel_u8.*`) as the pipeline's F32 pixels in
/// [-1, 1]: `(u8 / 255 - 0.5) / 0.5`, computed in f32 as torchvision does.
pub fn read_pixels_u8(file: &str, name: &str) -> Tensor<B, 4> {
    let st = SafetensorsFile::open(fixture(file));
    let values: Vec<f32> = st
        .u8(name)
        .iter()
        .map(|&v| (v as f32 / 255.0 - 0.5) / 0.5)
        .collect();
    Tensor::from_data(TensorData::new(values, st.shape(name)), &default_device())
}

/// An F32 tensor of a fixture safetensors file.
pub fn read<const D: usize>(file: &str, name: &str) -> Tensor<B, D> {
    read_path(&fixture(file), name)
}

/// An F32 tensor of any safetensors file.
pub fn read_path<const D: usize>(path: &std::path::Path, name: &str) -> Tensor<B, D> {
    let st = SafetensorsFile::open(path);
    st.expect_dtype(name, Dtype::F32);
    st.tensor(name, &default_device())
}

/// Largest absolute elementwise difference (shapes must match).
pub fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    tensor_max_abs_diff(a, b)
}
