//! Model resolution: a local directory, or a Hugging Face hub id resolved through the local
//! cache (`HF_HOME`) first and downloaded only when missing.
//!
//! With no network the resolution fails fast — a bounded reachability probe runs before any
//! download — with one message saying how to use a local copy instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use omnigen_core::{Error, FolderLayout, Result};

/// The official checkpoint.
pub const DEFAULT_MODEL_ID: &str = "Shitao/OmniGen-v1";

/// Whether `s` has the shape of a hub id (`owner/name`), as opposed to a filesystem path.
pub fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The layout a hub repository ships in: diffusers conversions are named `*-diffusers`.
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn layout_for(id: &str) -> FolderLayout {
    if id.ends_with("-diffusers") {
        FolderLayout::Diffusers
    } else {
        FolderLayout::Official
    }
}

#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn files_for(id: &str) -> &'static [&'static str] {
    layout_for(id).hub_files()
}

/// Resolves `id_or_dir` to a model directory: an existing directory is used as is; a hub id is
/// looked up in the local cache and downloaded (with a progress bar when `progress`) if any of
/// its files is missing.
pub fn resolve_model(id_or_dir: &str, progress: bool) -> Result<PathBuf> {
    let path = Path::new(id_or_dir);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(id_or_dir) {
        return Err(Error::ModelNotFound {
            id: id_or_dir.into(),
            reason: "no such directory (and not a hub id of the form owner/name)".into(),
        });
    }
    resolve_hub(id_or_dir, progress)
}

#[cfg(feature = "hub")]
fn resolve_hub(id: &str, progress: bool) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::Cache;

    let files = files_for(id);
    let cache = Cache::from_env();
    let cached: Vec<Option<PathBuf>> = files
        .iter()
        .map(|f| cache.model(id.to_string()).get(f))
        .collect();
    if let Some(Some(first)) = cached.first() {
        if cached.iter().all(Option::is_some) {
            return snapshot_dir(first, files[0]);
        }
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    let how_to_fix = format!(
        "it is not in the local cache ({}). Download the repository elsewhere (e.g. `huggingface-cli \
         download {id} --local-dir OmniGen-v1`) and pass that folder instead of the hub id, or set \
         HF_HOME to a cache that holds it",
        cache.path().display()
    );
    if offline {
        return Err(Error::ModelNotFound {
            id: id.into(),
            reason: format!("HF_HUB_OFFLINE is set and {how_to_fix}"),
        });
    }
    if let Err(why) = probe(&endpoint, Duration::from_secs(8)) {
        return Err(Error::ModelNotFound {
            id: id.into(),
            reason: format!("cannot reach the hub at {endpoint} ({why}) and {how_to_fix}"),
        });
    }
    let api = ApiBuilder::from_env()
        .with_progress(progress)
        .build()
        .map_err(|e| Error::ModelNotFound {
            id: id.into(),
            reason: format!("cannot start the hub client: {e}"),
        })?;
    let repo = api.model(id.to_string());
    let mut first = None;
    for file in files {
        let local = repo.get(file).map_err(|e| Error::ModelNotFound {
            id: id.into(),
            reason: format!("downloading `{file}` failed: {e}; {how_to_fix}"),
        })?;
        first.get_or_insert(local);
    }
    match first {
        Some(p) => snapshot_dir(&p, files[0]),
        None => Err(Error::ModelNotFound {
            id: id.into(),
            reason: "no files to fetch".into(),
        }),
    }
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(id: &str, _progress: bool) -> Result<PathBuf> {
    Err(Error::ModelNotFound {
        id: id.into(),
        reason: "this build has no hub support (cargo feature `hub`); pass a local directory"
            .into(),
    })
}

/// The snapshot folder holding `file` (which may sit in a subfolder such as `vae/`).
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn snapshot_dir(path: &Path, file: &str) -> Result<PathBuf> {
    let depth = Path::new(file).components().count();
    path.ancestors()
        .nth(depth)
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::ModelNotFound {
            id: path.display().to_string(),
            reason: "unexpected cache layout".into(),
        })
}

/// Resolves and connects to the endpoint's host within `timeout`, on a helper thread so a
/// hanging DNS lookup cannot stall the caller.
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn probe(endpoint: &str, timeout: Duration) -> std::result::Result<(), String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let rest = endpoint.split("://").nth(1).unwrap_or(endpoint);
    let host_port = rest.split('/').next().unwrap_or(rest).to_string();
    let target = if host_port.contains(':') {
        host_port
    } else if endpoint.starts_with("http://") {
        format!("{host_port}:80")
    } else {
        format!("{host_port}:443")
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = target
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {target}: {e}"))
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| format!("no address for {target}"))
            })
            .and_then(|addr| {
                TcpStream::connect_timeout(&addr, timeout)
                    .map(drop)
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))
            });
        let _ = tx.send(result);
    });
    rx.recv_timeout(timeout + Duration::from_secs(1))
        .unwrap_or_else(|_| Err(format!("no answer within {}s", timeout.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        assert!(looks_like_hub_id("Shitao/OmniGen-v1"));
        assert!(looks_like_hub_id("Shitao/OmniGen-v1-diffusers"));
        assert!(!looks_like_hub_id("./models/omnigen"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("single"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
    }

    #[test]
    fn snapshot_dir_strips_subfolders() {
        let p = Path::new("/c/snapshots/abc/vae/config.json");
        assert_eq!(
            snapshot_dir(p, "vae/config.json").unwrap(),
            Path::new("/c/snapshots/abc")
        );
        let p = Path::new("/c/snapshots/abc/config.json");
        assert_eq!(
            snapshot_dir(p, "config.json").unwrap(),
            Path::new("/c/snapshots/abc")
        );
    }

    #[test]
    fn a_missing_directory_that_is_not_an_id_is_reported() {
        let err = resolve_model("./no/such/model", false).unwrap_err();
        assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    }

    #[test]
    fn diffusers_ids_fetch_the_diffusers_layout() {
        assert!(files_for("Shitao/OmniGen-v1-diffusers").contains(&"transformer/config.json"));
        assert!(files_for(DEFAULT_MODEL_ID).contains(&"model.safetensors"));
    }
}
