//! A hub id resolves from the local Hugging Face cache (`HF_HOME`) with no network, and an
//! unreachable hub gives one clear error quickly. One test per process: it sets HF_HOME.

use std::path::Path;
use std::time::{Duration, Instant};

use omnigen_core::Error;
use omnigen_pipeline::hub::resolve_model;

#[test]
fn cache_first_then_fail_fast() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/A/model");
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--tiny--omnigen");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(snap.join("vae")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        std::fs::copy(fixtures.join(f), snap.join(f)).unwrap();
    }
    std::env::set_var("HF_HOME", home.path());
    // nothing listens on port 9 of localhost: any download attempt would fail
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");

    let dir = resolve_model("tiny/omnigen", false).unwrap();
    assert_eq!(dir, snap);

    let start = Instant::now();
    let err = resolve_model("tiny/not-cached", false).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
    let msg = err.to_string();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{msg}");
    assert!(
        msg.contains("pass that folder instead of the hub id")
            && msg.contains("cannot reach the hub"),
        "{msg}"
    );
}
