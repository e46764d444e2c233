//! Bad inputs to the VAE are typed errors naming the argument, never panics.

use crate::support::{fixture, random_vae, tiny_vae, B};
use burn::tensor::{DType, Tensor};
use omnigen_core::{Error, VaeConfig};
use omnigen_models::default_device;
use omnigen_models::vae::{AutoencoderKL, LatentChoice, TilingConfig};

fn zeros(shape: [usize; 4]) -> Tensor<B, 4> {
    Tensor::zeros(shape, &default_device())
}

fn assert_invalid<T: std::fmt::Debug>(result: omnigen_core::Result<T>, arg: &str) {
    match result {
        Err(Error::InvalidArgument { name, reason }) => {
            assert_eq!(name, arg, "{reason}");
            eprintln!("{arg}: {reason}");
        }
        other => panic!("expected InvalidArgument `{arg}`, got {other:?}"),
    }
}

#[test]
fn encode_rejects_sides_not_multiple_of_8() {
    let vae = tiny_vae();
    for shape in [[1, 3, 60, 64], [1, 3, 64, 36], [1, 3, 0, 64]] {
        assert_invalid(vae.encode(zeros(shape)), "image");
    }
    let mean = vae.encode_latents(zeros([1, 3, 63, 63]), LatentChoice::Mean);
    assert_invalid(mean, "image");
}

#[test]
fn encode_rejects_wrong_channel_count() {
    let vae = tiny_vae();
    for shape in [[1, 4, 64, 64], [1, 1, 64, 64]] {
        assert_invalid(vae.encode(zeros(shape)), "image");
    }
}

#[test]
fn sample_rejects_noise_of_another_shape() {
    let vae = tiny_vae();
    let noise = LatentChoice::Sample(zeros([1, 4, 8, 8]));
    assert_invalid(vae.encode_latents(zeros([1, 3, 48, 64]), noise), "noise");
}

#[test]
fn decode_rejects_wrong_latent_channels() {
    let vae = tiny_vae();
    for shape in [[1, 3, 8, 8], [1, 4, 0, 8]] {
        assert_invalid(vae.decode(zeros(shape)), "latents");
    }
    assert_invalid(vae.decode_latents(zeros([1, 16, 8, 8])), "latents");
}

#[test]
fn tiling_rejects_misaligned_tiles() {
    let mut vae = tiny_vae();
    for (size, overlap) in [
        (36, 0.25),
        (40, 0.25),
        (0, 0.25),
        (512, 1.0),
        (512, -0.1),
        (8, 0.9),
    ] {
        let cfg = TilingConfig {
            tile_sample_size: size,
            overlap_factor: overlap,
        };
        assert_invalid(vae.set_tiling(Some(cfg)), "tiling");
    }
    assert_eq!(vae.tiling(), None);
    vae.set_tiling(Some(TilingConfig::default()))
        .expect("default tiling");
}

#[test]
fn load_rejects_inconsistent_config_and_missing_tensors() {
    let mut config = VaeConfig::from_file(fixture("A/model/vae/config.json")).expect("config");
    config.norm_num_groups = 5;
    assert_invalid(random_vae(&config, 0), "config");

    // The tiny checkpoint has no tensors for a bigger architecture.
    config.norm_num_groups = 8;
    config.layers_per_block = 2;
    let weights =
        omnigen_core::WeightSource::open_in_dir(fixture("A/model/vae"), "diffusion_pytorch_model")
            .expect("weights");
    match AutoencoderKL::<B>::load(&weights, &config, &default_device(), DType::F32) {
        Err(Error::MissingTensor { name, .. }) => {
            assert_eq!(name, "encoder.down_blocks.0.resnets.1.norm1.weight")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    match AutoencoderKL::<B>::from_dir(
        &fixture("A/model/no-such-vae"),
        &default_device(),
        DType::F32,
    ) {
        Err(Error::Io { .. } | Error::Config { .. }) => {}
        other => panic!("expected an I/O or config error, got {other:?}"),
    }
}
