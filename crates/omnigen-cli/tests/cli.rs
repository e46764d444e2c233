//! The `omnigen` binary as a person runs it. `omnigen generate` against the official
//! reference: the initial noise comes in through `--latents`, input images are encoded with
//! `--input-latents mean` (the one way to reproduce an image-conditioned reference without
//! injecting the VAE's noise), and the final latents come back through `--save-latents`.
//! `omnigen inspect` on both committed checkpoint layouts, and clean failures.

#[path = "cli/batch.rs"]
mod batch;
#[path = "cli/robustness.rs"]
mod robustness;

use std::path::{Path, PathBuf};
use std::process::Command;

use omnigen_test_support::{
    fixture, max_abs_diff, max_level_diff, write_safetensors, Dtype, SafetensorsFile,
};

/// The workspace root: fixture paths are given relative to it, as in the README.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn omnigen() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omnigen"));
    cmd.current_dir(root());
    cmd
}

fn run_case(case: &str, prompt: &str, images: &[&str], guidance: &str, extra: &[&str]) {
    let reference = SafetensorsFile::open(fixture(format!("A/{case}.safetensors")));
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.safetensors");
    let (shape, noise) = (reference.shape("randn.00"), reference.bytes("randn.00"));
    write_safetensors(&init, &[("latents", Dtype::F32, shape, noise)]);
    let (out, saved) = (
        dir.path().join("out.png"),
        dir.path().join("final.safetensors"),
    );
    let mut cmd = omnigen();
    cmd.arg("generate")
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

    let ours = SafetensorsFile::open(&saved);
    ours.expect_dtype("latents", Dtype::F32);
    let d = max_abs_diff(&ours.f32("latents"), &reference.f32("latents.final"));
    assert!(d <= 1e-4, "{case}: final latents differ by {d}");

    let img = image::open(&out).unwrap().to_rgb8();
    let di = max_level_diff(img.as_raw(), &reference.bytes("image_uint8"));
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

fn stdout_of(args: &[&str]) -> String {
    let out = omnigen().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail: exit status 1, a first line `error: ...` naming `names`, no
/// panic.
fn failure_of(args: &[&str], names: &str) {
    let out = omnigen().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{args:?}: {stderr}");
    assert!(first.contains(names), "{args:?}: {first:?} lacks {names:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}

/// Panics unless `text` contains every one of `wants`.
fn assert_contains_all(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn inspect_both_layouts() {
    let official = stdout_of(&["inspect", "tests/fixtures/A/model"]);
    assert_contains_all(
        &official,
        &[
            "layout        official",
            "weights     model.safetensors",
            "tokenizer   tokenizer.json",
            "vae         vae/config.json, vae/diffusion_pytorch_model.safetensors",
            "hidden_size 48",
            "transformer       1,884,592 in 31 tensors",
            "vae                 316,695 in 180 tensors",
            "F32 x 31",
            "F32 x 180",
        ],
    );
    let f32_row = official
        .lines()
        .find(|l| l.trim_start().starts_with("f32 "))
        .unwrap();
    // (1,884,592 + 316,695) f32 values
    assert!(f32_row.contains("8.40 MiB"), "{f32_row}");
    assert!(
        official.contains(
            "generate --dtype keeps the vae in f32: 8.40 MiB with f32, 4.80 MiB with bf16 or f16"
        ),
        "{official}"
    );

    let diffusers = stdout_of(&["inspect", "tests/fixtures/A/model_diffusers"]);
    assert_contains_all(
        &diffusers,
        &[
            "layout        diffusers (transformer keys: diffusers names)",
            "config      transformer/config.json",
            "weights     transformer/diffusion_pytorch_model.safetensors",
            "tokenizer   tokenizer/tokenizer.json",
            "vae         vae/config.json, vae/diffusion_pytorch_model.safetensors",
            "transformer       1,884,592 in 35 tensors",
            "BF16 x 35",
        ],
    );
}

/// `omnigen quantize --model tests/fixtures/A/model` followed by `rest`.
fn quantize_fixture_a<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["quantize", "--model", "tests/fixtures/A/model"];
    args.extend_from_slice(rest);
    args
}

#[test]
fn quantize_writes_a_folder_that_inspect_reads_and_generate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("A_int8");
    let out_s = out.to_str().unwrap();
    let said = stdout_of(&quantize_fixture_a(&["--to", "int8", "--output", out_s]));
    assert!(said.contains("8 tensors quantized"), "{said}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["scheme"], "int8");
    assert!(out.join("tokenizer.json").is_file() && out.join("vae/config.json").is_file());
    // Never over an existing folder, and nothing half-written beside it.
    failure_of(
        &quantize_fixture_a(&["--to", "fp8", "--output", out_s]),
        "refusing to overwrite",
    );
    failure_of(
        &quantize_fixture_a(&["--to", "nf4", "--output", "x"]),
        "nf4",
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let report = stdout_of(&["inspect", out_s]);
    assert_contains_all(
        &report,
        &[
            "I8 x 8",
            "transformer by loading mode:",
            "int8/fp8, CPU --dtype bf16",
        ],
    );
    let png = dir.path().join("q.png");
    let out = omnigen()
        .args(["generate", "--model", out_s, "--prompt", "a cat"])
        .args([
            "--height", "32", "--width", "32", "--steps", "2", "--seed", "1",
        ])
        .args(["--offload", "model,kv", "--output"])
        .arg(&png)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--offload model,kv does nothing"),
        "{stderr}"
    );
    assert!(png.is_file());
    // Past --max-shard-size the weights are written as shards with an index, which inspect reads.
    let sharded = dir.path().join("A_int8_shards");
    let said = stdout_of(&quantize_fixture_a(&[
        "--to",
        "int8",
        "--max-shard-size",
        "256KiB",
        "--output",
        sharded.to_str().unwrap(),
    ]));
    assert!(said.contains(" shards"), "{said}");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert!(!sharded.join("model.safetensors").exists());
    let report = stdout_of(&["inspect", sharded.to_str().unwrap()]);
    assert_contains_all(&report, &["I8 x 8", "model.safetensors.index.json"]);
    failure_of(
        &quantize_fixture_a(&["--to", "int8", "--max-shard-size", "0", "--output", "x"]),
        "at least 1 byte",
    );
}

#[test]
fn inspect_refuses_a_folder_without_a_model() {
    failure_of(&["inspect", "tests/fixtures"], "missing transformer config");
    failure_of(&["inspect", "tests/fixtures/none"], "no such directory");
}

#[test]
fn help_and_version() {
    let help = stdout_of(&["--help"]);
    assert!(
        help.contains("generate") && help.contains("inspect"),
        "{help}"
    );
    assert!(help.contains("Generate an image from a prompt"), "{help}");
    assert!(help.contains("Show a model folder's layout"), "{help}");
    let version = stdout_of(&["--version"]);
    assert_eq!(
        version.trim(),
        format!("omnigen {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(help.contains("OmniGen unified image generation"), "{help}");
    let help = stdout_of(&["generate", "-h"]);
    assert!(
        help.contains("[default: official] [possible values: official, exact, off]"),
        "{help}"
    );
    assert!(
        help.contains("[default: auto] [possible values: auto, f32, f16, bf16]"),
        "{help}"
    );
    assert!(
        help.contains("[default: f32] [possible values: f32, bf16]"),
        "{help}"
    );
    // the long form documents each choice
    let help = stdout_of(&["generate", "--help"]);
    assert!(help.contains("- exact:"), "{help}");
}

#[test]
fn generate_fails_cleanly_before_loading() {
    let m = "tests/fixtures/A/model";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    let base = ["generate", "--model", m, "--prompt", "x", "--output", out];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    failure_of(&with(&["--steps", "0"]), "--steps");
    failure_of(&with(&["--height", "65"]), "--height");
    failure_of(&with(&["--guidance-scale", "NaN"]), "--guidance-scale");
    failure_of(&with(&["--kv-cache", "sometimes"]), "--kv-cache");
    failure_of(&with(&["--dtype", "f64"]), "--dtype");
    failure_of(&with(&["--lora-scale", "inf"]), "--lora-scale");
    failure_of(
        &with(&["--latents", "tests/fixtures/A/t2i.png"]),
        "--latents",
    );
    failure_of(
        &[
            "generate",
            "--model",
            "tests/fixtures/none",
            "--prompt",
            "x",
            "--output",
            out,
        ],
        "--model",
    );
    assert!(!dir.path().join("x.png").exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `omnigen generate` on the tiny checkpoint writing `output` with `extra` flags; its stderr.
fn generate_to(output: &Path, prompt: &str, extra: &[&str]) -> String {
    let out = omnigen()
        .arg("generate")
        .args(["--model", "tests/fixtures/A/model", "--prompt", prompt])
        .args([
            "--height", "32", "--width", "48", "--steps", "2", "--seed", "7",
        ])
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn generate_marks_every_format_as_ai_made_and_records_its_parameters() {
    const TRAINED: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a <red> cat & dog";
    // (file name, extra flags, magic bytes at the start of the file)
    let cases: [(&str, &[&str], &[u8]); 4] = [
        ("a.png", &[], b"\x89PNG"),
        ("a.jpg", &["--jpeg-quality", "80"], b"\xFF\xD8\xFF"),
        ("a.webp", &[], b"RIFF"),
        ("b.png", &["--format", "webp"], b"RIFF"),
    ];
    for (name, extra, magic) in cases {
        let path = dir.path().join(name);
        let stderr = generate_to(&path, prompt, extra);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(magic), "{name}: wrong format");
        assert!(contains(&bytes, TRAINED), "{name}: no DigitalSourceType");
        // The prompt is in the XMP escaped, never raw markup.
        assert!(contains(&bytes, "a &lt;red&gt; cat &amp; dog"), "{name}");
        assert_eq!(
            stderr.contains("note: writing webp to"),
            name == "b.png",
            "{name}: {stderr}"
        );
    }
    let text = omnigen::pipeline::read_png_text(&dir.path().join("a.png")).unwrap();
    let parameters = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    let (head, last) = parameters.rsplit_once('\n').unwrap();
    assert!(head.starts_with(&format!("{prompt}\nNegative prompt: low quality")));
    for want in [
        "Steps: 2",
        "Sampler: Euler",
        "CFG scale: 3",
        "Seed: 7",
        "Size: 48x32",
    ] {
        assert!(last.contains(want), "{want} missing from {last}");
    }
    assert!(
        last.contains("Model hash: ") && last.contains("Model: model"),
        "{last}"
    );
    assert!(!last.contains("Image CFG scale"), "no input image: {last}");

    // --no-metadata keeps the AI mark only.
    let path = dir.path().join("bare.webp");
    generate_to(&path, prompt, &["--no-metadata"]);
    let bytes = std::fs::read(&path).unwrap();
    assert!(contains(&bytes, TRAINED));
    assert!(!contains(&bytes, "cat") && !contains(&bytes, "Steps"));
}
