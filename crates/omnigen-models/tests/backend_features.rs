//! burn's CPU backends silently lose SIMD and threading under `default-features = false`; this
//! checks, through cargo's own feature resolution, that our manifests turn them back on.

use std::process::Command;

fn enabled_features(extra_features: &[&str], package: &str) -> Vec<String> {
    let mut args = vec![
        "tree",
        "-p",
        "omnigen-models",
        "-e",
        "features",
        "-i",
        package,
    ];
    args.extend(["--prefix", "none"]);
    if !extra_features.is_empty() {
        args.push("--features");
        args.extend(extra_features);
    }
    let out = Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo is runnable from tests");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("{package} feature \"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split('"').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn flex_has_simd_and_threads() {
    let features = enabled_features(&[], "burn-flex");
    for wanted in ["simd", "rayon", "std"] {
        assert!(
            features.iter().any(|f| f == wanted),
            "burn-flex lacks `{wanted}`: {features:?}"
        );
    }
}

#[test]
fn ndarray_has_simd_and_threads() {
    let features = enabled_features(&["ndarray"], "burn-ndarray");
    for wanted in ["simd", "multi-threads", "std"] {
        assert!(
            features.iter().any(|f| f == wanted),
            "burn-ndarray lacks `{wanted}`: {features:?}"
        );
    }
}

#[cfg(feature = "flex")]
#[test]
fn default_backend_is_flex() {
    assert_eq!(omnigen_models::DEFAULT_BACKEND_NAME, "flex");
}
