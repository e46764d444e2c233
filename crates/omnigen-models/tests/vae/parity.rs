//! Numeric parity of the VAE with diffusers' `AutoencoderKL` (official OmniGen pipeline, f32) on
//! the tiny random checkpoint of fixture set A.

use crate::support::{max_abs_diff, read, read_pixels_u8, tiny_vae, vae_of, B};
use burn::tensor::Tensor;
use omnigen_models::vae::{AutoencoderKL, DiagonalGaussian, LatentChoice};

const TOL: f32 = 1e-4;

fn check(what: &str, diff: f32) {
    eprintln!("{what}: max abs diff {diff:.3e}");
    assert!(diff <= TOL, "{what}: max abs diff {diff} > {TOL}");
}

/// [`check`] of `actual` against the recorded tensor `key` of fixture file `file`.
fn check_recorded<const D: usize>(what: &str, actual: Tensor<B, D>, file: &str, key: &str) {
    check(what, max_abs_diff(actual, read(file, key)));
}

/// [`check`] of a posterior's mean, logvar and std against `{key}.mean`, `.logvar`, `.std` of
/// `file`, labelled `{label}{key}.*`.
fn check_posterior(label: &str, dist: &DiagonalGaussian<B>, file: &str, key: &str) {
    for (part, actual) in [
        ("mean", dist.mean.clone()),
        ("logvar", dist.logvar.clone()),
        ("std", dist.std()),
    ] {
        let key = format!("{key}.{part}");
        check_recorded(&format!("{label}{key}"), actual, file, &key);
    }
}

/// Decodes `vae.enc.mean` and `vae.z_rand` of a `vae_only` fixture `file` and checks them
/// against `vae.dec_of_mean` and `vae.dec_of_z_rand`, labelled `{label}vae.dec_of_*`.
fn check_vae_only_decodes(label: &str, vae: &AutoencoderKL<B>, file: &str) {
    for (input, key) in [
        ("vae.enc.mean", "vae.dec_of_mean"),
        ("vae.z_rand", "vae.dec_of_z_rand"),
    ] {
        let out = vae.decode(read(file, input)).expect("decode");
        check_recorded(&format!("{label}{key}"), out, file, key);
    }
}

#[test]
fn encode_matches_diffusers_posterior() {
    let vae = tiny_vae();
    let f = "A/vae_only.safetensors";
    let dist = vae.encode(read(f, "vae.x")).expect("encode");
    check_posterior("", &dist, f, "vae.enc");
}

#[test]
fn decode_matches_diffusers() {
    check_vae_only_decodes("", &tiny_vae(), "A/vae_only.safetensors");
}

/// The edit case encodes a 48×64 (non-square) input image; the pipeline samples the posterior
/// with the recorded noise `randn.01` and scales by 0.13025.
#[test]
fn encode_non_square_pipeline_latents() {
    let vae = tiny_vae();
    let f = "A/edit.safetensors";
    let image = read::<4>(f, "proc.b0.pixel_values.0");
    assert_eq!(image.dims(), [1, 3, 48, 64]);
    let dist = vae.encode(image.clone()).expect("encode");
    check_posterior("", &dist, f, "vae_enc.0");
    let noise = read::<4>(f, "randn.01");
    let sample = dist.sample(noise.clone()).expect("sample");
    check_recorded("vae_enc.0.sample", sample, f, "vae_enc.0.sample");
    let latents = vae
        .encode_latents(image, LatentChoice::Sample(noise))
        .expect("encode_latents");
    let key = "step0.b0.input_img_latents.0";
    check_recorded(key, latents, f, key);
}

/// The t2i case decodes the final latents through the pipeline's unscaling.
#[test]
fn decode_pipeline_latents() {
    let vae = tiny_vae();
    let f = "A/t2i.safetensors";
    let latents = read::<4>(f, "latents.final");
    let unscaled = latents.clone() / vae.config().scaling_factor;
    check_recorded("vae_dec.input", unscaled, f, "vae_dec.input");
    let out = vae.decode_latents(latents).expect("decode_latents");
    check_recorded("vae_dec.output (t2i)", out, f, "vae_dec.output");

    let f = "A/edit.safetensors";
    let out = vae
        .decode_latents(read(f, "latents.final"))
        .expect("decode_latents");
    check_recorded("vae_dec.output (edit)", out, f, "vae_dec.output");
}

// Fixture set B: a second VAE configuration (block_out [8,16,16,16], layers_per_block 2,
// 4 groups) through the same code, at non-square sizes.

#[test]
fn config_b_encode_decode_48x80() {
    let vae = vae_of("B");
    let f = "B/vae_only.safetensors";
    let x = read::<4>(f, "vae.x");
    assert_eq!(x.dims(), [1, 3, 48, 80]);
    let dist = vae.encode(x).expect("encode");
    check_posterior("B ", &dist, f, "vae.enc");
    check_vae_only_decodes("B ", &vae, f);
}

#[test]
fn config_b_pipeline_encode_and_decode() {
    let vae = vae_of("B");
    let f = "B/edit.safetensors";
    for (branch, n) in [("b0", 0), ("b2", 1)] {
        let image = read_pixels_u8(f, &format!("proc.{branch}.pixel_u8.0"));
        let noise = read::<4>(f, &format!("randn.0{}", n + 1));
        let dist = vae.encode(image.clone()).expect("encode");
        let key = format!("vae_enc.{n}.mean");
        check_recorded(&format!("B {key}"), dist.mean, f, &key);
        let latents = vae
            .encode_latents(image, LatentChoice::Sample(noise))
            .expect("encode_latents");
        let key = format!("step0.{branch}.input_img_latents.0");
        check_recorded(&format!("B {key}"), latents, f, &key);
    }
    let out = vae
        .decode_latents(read(f, "latents.final"))
        .expect("decode_latents");
    check_recorded("B vae_dec.output (edit)", out, f, "vae_dec.output");

    let f = "B/t2i_48x80.safetensors";
    let out = vae
        .decode_latents(read(f, "latents.final"))
        .expect("decode_latents");
    assert_eq!(out.dims(), [1, 3, 48, 80]);
    check_recorded("B vae_dec.output (t2i 48x80)", out, f, "vae_dec.output");
}
