//! Latents files: one f32 safetensors tensor named `latents`, read by `--latents` (the initial
//! noise) and written by `--save-latents` (the final latents, before VAE decoding).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context as _};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnigen::core::WeightSource;
use omnigen::pipeline::output::write_atomically;
use omnigen::prelude::InitialLatents;

/// The tensor name of latents files.
pub const LATENTS_KEY: &str = "latents";

/// Reads tensor `latents` `[N, 4, h, w]` (stored as f32, f16 or bf16) for `--latents`.
pub fn read_latents(path: &Path) -> anyhow::Result<InitialLatents> {
    let src = WeightSource::open(path).context("--latents")?;
    let Some(shape) = src.shape(LATENTS_KEY) else {
        bail!(
            "--latents: {} has no tensor `{LATENTS_KEY}` (it has: {})",
            path.display(),
            src.keys().join(", ")
        );
    };
    let Ok(shape) = <[usize; 4]>::try_from(shape.as_slice()) else {
        bail!(
            "--latents: tensor `{LATENTS_KEY}` in {} has shape {shape:?}, expected [N, 4, H/8, W/8]",
            path.display()
        );
    };
    // The declared shape bounds what is read: no request has more rows or a larger latent.
    let [n, c, h, w] = shape;
    if n > omnigen::pipeline::MAX_IMAGES || c > 1024 || h > 384 || w > 384 {
        bail!(
            "--latents: tensor `{LATENTS_KEY}` in {} has shape {shape:?}; no request takes more \
             than {} rows of latents larger than [4, 384, 384] (3072x3072 pixels)",
            path.display(),
            omnigen::pipeline::MAX_IMAGES
        );
    }
    let values = src.read_f32(LATENTS_KEY, &shape).context("--latents")?;
    Ok(InitialLatents { values, shape })
}

/// Writes `latents` as f32 tensor `latents` to `path` atomically, for `--save-latents`.
pub fn write_latents<B: Backend>(path: &Path, latents: Tensor<B, 4>) -> anyhow::Result<()> {
    let shape = latents.dims().to_vec();
    let values: Vec<f32> = latents
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| anyhow::anyhow!("--save-latents: cannot read the final latents: {e:?}"))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .context("--save-latents")?;
    let data = safetensors::serialize(HashMap::from([(LATENTS_KEY.to_string(), view)]), None)
        .context("--save-latents")?;
    write_atomically(path, |f| f.write_all(&data)).context("--save-latents")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use omnigen::models::{default_device, DefaultBackend};

    /// A safetensors file at `path` holding one f32 tensor `[4]` of zeros named `name`.
    fn write_flat_tensor(path: &Path, name: &str) {
        let bytes = [0u8; 16];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes).unwrap();
        safetensors::serialize_to_file(HashMap::from([(name.to_string(), view)]), None, path)
            .unwrap();
    }

    #[test]
    fn latents_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.safetensors");
        let values: Vec<f32> = (0..2 * 4 * 3 * 5).map(|i| i as f32 * 0.25 - 3.0).collect();
        let data = burn::tensor::TensorData::new(values.clone(), [2, 4, 3, 5]);
        let tensor = Tensor::<DefaultBackend, 4>::from_data(data, &default_device());
        write_latents(&path, tensor).unwrap();
        let back = read_latents(&path).unwrap();
        assert_eq!(back.shape, [2, 4, 3, 5]);
        assert_eq!(back.values, values);
        // nothing but the file itself is left in the folder
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_without_latents_names_the_flag_and_the_tensors_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.safetensors");
        write_flat_tensor(&path, "noise");
        let msg = format!("{:#}", read_latents(&path).unwrap_err());
        assert!(msg.starts_with("--latents: "), "{msg}");
        assert!(msg.contains("noise"), "{msg}");
    }

    #[test]
    fn a_latents_tensor_of_the_wrong_rank_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flat.safetensors");
        write_flat_tensor(&path, LATENTS_KEY);
        let msg = format!("{:#}", read_latents(&path).unwrap_err());
        assert!(
            msg.contains("[4]") && msg.contains("[N, 4, H/8, W/8]"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let msg = format!(
            "{:#}",
            read_latents(Path::new("/nonexistent/l.safetensors")).unwrap_err()
        );
        assert!(msg.contains("/nonexistent/l.safetensors"), "{msg}");
    }
}
