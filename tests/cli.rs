//! The `generate` example as a person runs it, against the official reference: the initial
//! noise comes in through `--latents`, input images are encoded with `--input-latents mean`
//! (the one way to reproduce an image-conditioned reference without injecting the VAE's noise),
//! and the final latents come back through `--save-latents`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `cargo test` builds the examples next to the test binaries' `deps/` folder.
fn generate_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir
        .join("examples")
        .join(format!("generate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built (cargo test builds examples)",
        bin.display()
    );
    bin
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open(case: &str) -> Self {
        Self {
            bytes: std::fs::read(root().join(format!("tests/fixtures/A/{case}.safetensors")))
                .unwrap(),
        }
    }
    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec())
    }
}

fn write_latents(path: &Path, shape: Vec<usize>, data: &[u8]) {
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data).unwrap();
    safetensors::serialize_to_file(HashMap::from([("latents".to_string(), view)]), None, path)
        .unwrap();
}

fn run_case(case: &str, prompt: &str, images: &[&str], guidance: &str, extra: &[&str]) {
    let reference = Reference::open(case);
    let dir = tempfile::tempdir().unwrap();
    let (shape, noise) = reference.tensor("randn.00");
    let init = dir.path().join("init.safetensors");
    write_latents(&init, shape, &noise);
    let (out, saved) = (
        dir.path().join("out.png"),
        dir.path().join("final.safetensors"),
    );
    let mut cmd = Command::new(generate_bin());
    cmd.current_dir(root())
        .args(["--model", "tests/fixtures/A/model", "--prompt", prompt])
        .args(["--height", "64", "--width", "64", "--steps", "4"])
        .args(["--guidance-scale", guidance, "--img-guidance-scale", "1.6"])
        .arg("--latents")
        .arg(&init)
        .arg("--output")
        .arg(&out)
        .arg("--save-latents")
        .arg(&saved)
        .args(extra);
    for image in images {
        cmd.args(["--image", &format!("tests/fixtures/A/{image}")]);
    }
    let status = cmd.output().unwrap();
    assert!(
        status.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    let ours = std::fs::read(&saved).unwrap();
    let ours = SafeTensors::deserialize(&ours).unwrap();
    let ours = f32s(ours.tensor("latents").unwrap().data());
    let want = f32s(&reference.tensor("latents.final").1);
    let d = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-4, "{case}: final latents differ by {d}");

    let img = image::open(&out).unwrap().to_rgb8();
    let (_, want) = reference.tensor("image_uint8");
    let di = img
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(di <= 1, "{case}: image differs by {di} levels");
    println!("{case}: latents {d:.2e}, image levels {di}");
}

const EDIT: &str = "<img><|image_1|></img> make the cat green and add a hat";
const TWO: &str =
    "The cat in the first image <img><|image_1|></img> and the dog in the second image <img><|image_2|></img>";

#[test]
fn text_to_image_cached_and_uncached() {
    let p = "a red cat sitting on a blue mat";
    run_case("t2i", p, &[], "2.5", &[]);
    run_case("t2i_nokv", p, &[], "2.5", &["--kv-cache", "off"]);
    run_case("t2i_nokv", p, &[], "2.5", &["--kv-cache", "exact"]);
    run_case("t2i_joint", p, &[], "2.5", &["--joint-cfg"]);
}

#[test]
fn edit_with_posterior_mean_cached_and_uncached() {
    let mean = ["--input-latents", "mean"];
    run_case("edit_mean", EDIT, &["edit_in.png"], "2.0", &mean);
    run_case(
        "edit_mean_nokv",
        EDIT,
        &["edit_in.png"],
        "2.0",
        &[&mean[..], &["--kv-cache", "off"]].concat(),
    );
}

#[test]
fn two_images_with_posterior_mean_cached_and_uncached() {
    let mean = ["--input-latents", "mean"];
    let imgs = ["edit_in.png", "img2_in.png"];
    run_case("two_img_mean", TWO, &imgs, "2.0", &mean);
    run_case(
        "two_img_mean_nokv",
        TWO,
        &imgs,
        "2.0",
        &[&mean[..], &["--kv-cache", "exact"]].concat(),
    );
}
