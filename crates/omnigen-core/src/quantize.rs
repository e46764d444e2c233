//! `omnigen quantize`: a model folder with the transformer's decoder-layer linear weights
//! quantized (see [`crate::quant`]), everything else copied.
//!
//! The output is written into a temporary sibling folder and renamed into place at the end, so
//! a failure never leaves a partial model; an existing output is refused, never overwritten.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::folder::ModelFolder;
use crate::layout::{stored_keys, CheckpointLayout};
use crate::quant::{scale_key, QuantScheme, QuantizedTensor, QUANTIZATION_CONFIG_KEY};
use crate::weights::WeightSource;

/// The linear layers `omnigen quantize` quantizes, by official module path (`{i}` = a layer
/// index): the decoder layers' four projections, 97 % of the real model's parameters. The
/// embedders, the final layer and the norms keep their dtype.
pub const QUANTIZED_MODULES: &[&str] = &[
    "llm.layers.{i}.self_attn.qkv_proj",
    "llm.layers.{i}.self_attn.o_proj",
    "llm.layers.{i}.mlp.gate_up_proj",
    "llm.layers.{i}.mlp.down_proj",
];

/// Whether canonical (official) key `key` is the weight of one of [`QUANTIZED_MODULES`].
pub fn is_quantized_key(key: &str) -> bool {
    let Some(rest) = key.strip_prefix("llm.layers.") else {
        return false;
    };
    let Some((index, module)) = rest.split_once('.') else {
        return false;
    };
    !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && QUANTIZED_MODULES.iter().any(|m| {
            m.strip_prefix("llm.layers.{i}.")
                .map(|m| format!("{m}.weight"))
                == Some(module.to_string())
        })
}

/// What [`quantize_folder`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeReport {
    /// The folder written.
    pub output: PathBuf,
    /// The transformer weights file written.
    pub weights: PathBuf,
    /// Stored tensors quantized (diffusers' q, k and v count separately).
    pub quantized: usize,
    /// Stored tensors copied unchanged.
    pub copied: usize,
    /// Transformer weight bytes before.
    pub bytes_in: u64,
    /// Transformer weight bytes after (scales included).
    pub bytes_out: u64,
}

/// The stored names of every weight [`QUANTIZED_MODULES`] covers in a checkpoint of `layers`
/// decoder layers in key layout `layout`.
pub fn quantized_stored_keys(layout: CheckpointLayout, layers: usize) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for i in 0..layers {
        for module in QUANTIZED_MODULES {
            let canonical = format!("{}.weight", module.replace("{i}", &i.to_string()));
            keys.extend(stored_keys(layout, &canonical));
        }
    }
    keys
}

/// Writes a copy of model folder `model` to `output` with the transformer's linear weights
/// quantized with `scheme` (per output channel) and the scheme named in the transformer's
/// `config.json` under [`QUANTIZATION_CONFIG_KEY`]; every other file is copied. Sharded weights
/// are written as one file.
///
/// Refuses an `output` that exists, and a checkpoint that already holds quantized tensors.
pub fn quantize_folder(model: &Path, output: &Path, scheme: QuantScheme) -> Result<QuantizeReport> {
    if output.symlink_metadata().is_ok() {
        return Err(Error::invalid_argument(
            "output",
            format!("{} exists; refusing to overwrite it", output.display()),
        ));
    }
    let folder = ModelFolder::open(model)?;
    let config_path = folder.transformer_config()?;
    let config = TransformerConfig::from_file(&config_path)?;
    let files = folder.transformer_weights()?;
    let source = WeightSource::open_files(&files)?;
    let layout = folder.layout().key_layout();
    let targets = quantized_stored_keys(layout, config.num_hidden_layers);

    let name = output
        .file_name()
        .ok_or_else(|| Error::invalid_argument("output", "names no folder"))?
        .to_string_lossy()
        .into_owned();
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut skip: BTreeSet<PathBuf> = files.files.iter().cloned().collect();
        skip.extend(files.index.clone());
        skip.insert(config_path.clone());
        copy_tree(folder.root(), &tmp, &skip)?;
        let rel = folder
            .transformer_dir()
            .strip_prefix(folder.root())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let out_dir = tmp.join(&rel);
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io("create", &out_dir, e))?;
        let weights_name = format!("{}.safetensors", folder.weights_stem());
        let mut report = write_quantized(&source, &targets, scheme, &out_dir.join(&weights_name))?;
        write_config(&config_path, &out_dir.join("config.json"), scheme)?;
        report.output = output.to_path_buf();
        report.weights = output.join(&rel).join(&weights_name);
        Ok(report)
    })();
    match result {
        Ok(report) => {
            std::fs::rename(&tmp, output).map_err(|e| {
                let _ = std::fs::remove_dir_all(&tmp);
                Error::io("rename into place", output, e)
            })?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Copies the regular files and folders under `from` into `to`, leaving out `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &BTreeSet<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(|e| Error::io("read", from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("read", from, e))?;
        let path = entry.path();
        if skip.contains(&path) {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|e| Error::io("read", &path, e))?;
        let dest = to.join(entry.file_name());
        if meta.is_dir() {
            std::fs::create_dir(&dest).map_err(|e| Error::io("create", &dest, e))?;
            copy_tree(&path, &dest, skip)?;
        } else if meta.is_file() {
            std::fs::copy(&path, &dest).map_err(|e| Error::io("copy", &path, e))?;
        }
    }
    Ok(())
}

/// The transformer config with [`QUANTIZATION_CONFIG_KEY`] naming `scheme`.
fn write_config(from: &Path, to: &Path, scheme: QuantScheme) -> Result<()> {
    let text = std::fs::read_to_string(from).map_err(|e| Error::io("read", from, e))?;
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: from.into(),
        reason: e.to_string(),
    })?;
    let object = value.as_object_mut().ok_or_else(|| Error::Config {
        path: from.into(),
        reason: "not a JSON object".into(),
    })?;
    object.insert(
        QUANTIZATION_CONFIG_KEY.into(),
        serde_json::json!({
            "quant_method": "omnigen",
            "scheme": scheme.name(),
            "granularity": "per_channel",
            "modules": QUANTIZED_MODULES,
        }),
    );
    let text = serde_json::to_string_pretty(&value).map_err(|e| Error::Config {
        path: from.into(),
        reason: e.to_string(),
    })?;
    std::fs::write(to, text).map_err(|e| Error::io("write", to, e))
}

fn write_quantized(
    source: &WeightSource,
    targets: &BTreeSet<String>,
    scheme: QuantScheme,
    path: &Path,
) -> Result<QuantizeReport> {
    let keys = source.keys();
    if let Some(k) = keys
        .iter()
        .find(|k| matches!(source.stored_dtype(k), Some(StDtype::I8 | StDtype::F8_E4M3)))
    {
        return Err(Error::invalid_argument(
            "model",
            format!("tensor `{k}` is already quantized; quantize the original checkpoint"),
        ));
    }
    let mut quantized: Vec<(String, QuantizedTensor)> = Vec::new();
    let mut report = QuantizeReport {
        output: PathBuf::new(),
        weights: PathBuf::new(),
        quantized: 0,
        copied: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    for key in &keys {
        let (bytes, _, shape) = source.raw(key).ok_or_else(|| Error::MissingTensor {
            name: key.to_string(),
            path: source.path_of(key).into(),
        })?;
        report.bytes_in += bytes.len() as u64;
        if targets.contains(*key) && shape.len() == 2 {
            let shape = shape.to_vec();
            let values = source.read_f32(key, &shape)?;
            quantized.push((
                key.to_string(),
                QuantizedTensor::quantize(key, scheme, &shape, &values)?,
            ));
        }
    }
    let st_dtype = match scheme {
        QuantScheme::Int8 => StDtype::I8,
        QuantScheme::Fp8E4M3 => StDtype::F8_E4M3,
    };
    let invalid = |e: safetensors::SafeTensorError| Error::CorruptWeights {
        path: path.into(),
        reason: e.to_string(),
    };
    let scale_bytes: Vec<(String, Vec<u8>)> = quantized
        .iter()
        .map(|(k, q)| (scale_key(k), bytemuck::cast_slice(&q.scales).to_vec()))
        .collect();
    let mut views: Vec<(String, TensorView<'_>)> =
        Vec::with_capacity(keys.len() + scale_bytes.len());
    for ((key, q), (scale_name, scales)) in quantized.iter().zip(&scale_bytes) {
        views.push((
            key.clone(),
            TensorView::new(st_dtype, q.shape.clone(), &q.values).map_err(invalid)?,
        ));
        views.push((
            scale_name.clone(),
            TensorView::new(StDtype::F32, vec![q.scales.len()], scales).map_err(invalid)?,
        ));
    }
    let done: BTreeSet<&str> = quantized.iter().map(|(k, _)| k.as_str()).collect();
    for key in &keys {
        if done.contains(key) {
            continue;
        }
        if let Some((bytes, dtype, shape)) = source.raw(key) {
            views.push((
                key.to_string(),
                TensorView::new(dtype, shape.to_vec(), bytes).map_err(invalid)?,
            ));
            report.copied += 1;
        }
    }
    report.quantized = quantized.len();
    report.bytes_out = views.iter().map(|(_, v)| v.data().len() as u64).sum();
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("quantization".to_string(), scheme.name().to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::Io {
        action: "write",
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_keys_are_the_decoder_projections_in_both_layouts() {
        assert!(is_quantized_key("llm.layers.12.mlp.down_proj.weight"));
        assert!(is_quantized_key("llm.layers.0.self_attn.qkv_proj.weight"));
        assert!(!is_quantized_key("llm.layers.0.self_attn.qkv_proj.bias"));
        assert!(!is_quantized_key("llm.layers.x.mlp.down_proj.weight"));
        assert!(!is_quantized_key("final_layer.linear.weight"));
        assert!(!is_quantized_key("llm.layers.0.input_layernorm.weight"));
        let official = quantized_stored_keys(CheckpointLayout::Official, 2);
        assert_eq!(official.len(), 8);
        assert!(official.iter().all(|k| is_quantized_key(k)));
        let diffusers = quantized_stored_keys(CheckpointLayout::Diffusers, 1);
        let want = [
            "layers.0.mlp.down_proj.weight",
            "layers.0.mlp.gate_up_proj.weight",
            "layers.0.self_attn.to_k.weight",
            "layers.0.self_attn.to_out.0.weight",
            "layers.0.self_attn.to_q.weight",
            "layers.0.self_attn.to_v.weight",
        ];
        assert_eq!(
            diffusers.iter().map(String::as_str).collect::<Vec<_>>(),
            want
        );
    }
}
