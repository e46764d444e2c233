//! Numeric parity of the VAE with diffusers' `AutoencoderKL` (official OmniGen pipeline, f32) on
//! the tiny random checkpoint of fixture set A.

use crate::support::{max_abs_diff, read, read_pixels_u8, tiny_vae, vae_of};
use omnigen_models::vae::LatentChoice;

const TOL: f32 = 1e-4;

fn check(what: &str, diff: f32) {
    eprintln!("{what}: max abs diff {diff:.3e}");
    assert!(diff <= TOL, "{what}: max abs diff {diff} > {TOL}");
}

#[test]
fn encode_matches_diffusers_posterior() {
    let vae = tiny_vae();
    let dist = vae
        .encode(read("A/vae_only.safetensors", "vae.x"))
        .expect("encode");
    check(
        "vae.enc.mean",
        max_abs_diff(
            dist.mean.clone(),
            read("A/vae_only.safetensors", "vae.enc.mean"),
        ),
    );
    check(
        "vae.enc.logvar",
        max_abs_diff(
            dist.logvar.clone(),
            read("A/vae_only.safetensors", "vae.enc.logvar"),
        ),
    );
    check(
        "vae.enc.std",
        max_abs_diff(dist.std(), read("A/vae_only.safetensors", "vae.enc.std")),
    );
}

#[test]
fn decode_matches_diffusers() {
    let vae = tiny_vae();
    let out = vae
        .decode(read("A/vae_only.safetensors", "vae.enc.mean"))
        .expect("decode");
    check(
        "vae.dec_of_mean",
        max_abs_diff(out, read("A/vae_only.safetensors", "vae.dec_of_mean")),
    );
    let out = vae
        .decode(read("A/vae_only.safetensors", "vae.z_rand"))
        .expect("decode");
    check(
        "vae.dec_of_z_rand",
        max_abs_diff(out, read("A/vae_only.safetensors", "vae.dec_of_z_rand")),
    );
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
    check(
        "vae_enc.0.mean",
        max_abs_diff(dist.mean.clone(), read(f, "vae_enc.0.mean")),
    );
    check(
        "vae_enc.0.logvar",
        max_abs_diff(dist.logvar.clone(), read(f, "vae_enc.0.logvar")),
    );
    check(
        "vae_enc.0.std",
        max_abs_diff(dist.std(), read(f, "vae_enc.0.std")),
    );
    let noise = read::<4>(f, "randn.01");
    check(
        "vae_enc.0.sample",
        max_abs_diff(
            dist.sample(noise.clone()).expect("sample"),
            read(f, "vae_enc.0.sample"),
        ),
    );
    let latents = vae
        .encode_latents(image, LatentChoice::Sample(noise))
        .expect("encode_latents");
    check(
        "step0.b0.input_img_latents.0",
        max_abs_diff(latents, read(f, "step0.b0.input_img_latents.0")),
    );
}

/// The t2i case decodes the final latents through the pipeline's unscaling.
#[test]
fn decode_pipeline_latents() {
    let vae = tiny_vae();
    let f = "A/t2i.safetensors";
    let latents = read::<4>(f, "latents.final");
    let unscaled = latents.clone() / vae.config().scaling_factor;
    check(
        "vae_dec.input",
        max_abs_diff(unscaled, read(f, "vae_dec.input")),
    );
    let out = vae.decode_latents(latents).expect("decode_latents");
    check(
        "vae_dec.output (t2i)",
        max_abs_diff(out, read(f, "vae_dec.output")),
    );

    let f = "A/edit.safetensors";
    let out = vae
        .decode_latents(read(f, "latents.final"))
        .expect("decode_latents");
    check(
        "vae_dec.output (edit)",
        max_abs_diff(out, read(f, "vae_dec.output")),
    );
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
    check(
        "B vae.enc.mean",
        max_abs_diff(dist.mean.clone(), read(f, "vae.enc.mean")),
    );
    check(
        "B vae.enc.logvar",
        max_abs_diff(dist.logvar.clone(), read(f, "vae.enc.logvar")),
    );
    check(
        "B vae.enc.std",
        max_abs_diff(dist.std(), read(f, "vae.enc.std")),
    );
    let out = vae.decode(read(f, "vae.enc.mean")).expect("decode");
    check(
        "B vae.dec_of_mean",
        max_abs_diff(out, read(f, "vae.dec_of_mean")),
    );
    let out = vae.decode(read(f, "vae.z_rand")).expect("decode");
    check(
        "B vae.dec_of_z_rand",
        max_abs_diff(out, read(f, "vae.dec_of_z_rand")),
    );
}

#[test]
fn config_b_pipeline_encode_and_decode() {
    let vae = vae_of("B");
    let f = "B/edit.safetensors";
    for (branch, n) in [("b0", 0), ("b2", 1)] {
        let image = read_pixels_u8(f, &format!("proc.{branch}.pixel_u8.0"));
        let noise = read::<4>(f, &format!("randn.0{}", n + 1));
        let dist = vae.encode(image.clone()).expect("encode");
        check(
            &format!("B vae_enc.{n}.mean"),
            max_abs_diff(dist.mean, read(f, &format!("vae_enc.{n}.mean"))),
        );
        let latents = vae
            .encode_latents(image, LatentChoice::Sample(noise))
            .expect("encode_latents");
        let key = format!("step0.{branch}.input_img_latents.0");
        check(&format!("B {key}"), max_abs_diff(latents, read(f, &key)));
    }
    let out = vae
        .decode_latents(read(f, "latents.final"))
        .expect("decode_latents");
    check(
        "B vae_dec.output (edit)",
        max_abs_diff(out, read(f, "vae_dec.output")),
    );

    let f = "B/t2i_48x80.safetensors";
    let out = vae
        .decode_latents(read(f, "latents.final"))
        .expect("decode_latents");
    assert_eq!(out.dims(), [1, 3, 48, 80]);
    check(
        "B vae_dec.output (t2i 48x80)",
        max_abs_diff(out, read(f, "vae_dec.output")),
    );
}
