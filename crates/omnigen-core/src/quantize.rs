//! `omnigen quantize`: a model folder with the transformer's decoder-layer linear weights
//! quantized (see [`crate::quant`]), everything else copied.
//!
//! The output is written into a temporary sibling folder and renamed into place at the end, so
//! a failure never leaves a partial model; an existing output is refused, never overwritten.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype as StDtype;

use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::folder::ModelFolder;
use crate::layout::{stored_keys, CheckpointLayout};
use crate::quant::{scale_key, QuantScheme, QuantizedTensor, QUANTIZATION_CONFIG_KEY};
use crate::weights::WeightSource;
use crate::writer::{
    natural_cmp, plan_shards, shard_name, write_index, StreamingFile, TensorSpec,
    DEFAULT_MAX_SHARD_BYTES,
};

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

/// How [`quantize_folder`] quantizes and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// The quantization of the decoder layers' linear weights.
    pub scheme: QuantScheme,
    /// The largest weights file written, in bytes of tensor data: a checkpoint that does not
    /// fit in one is written as shards `<stem>-0000N-of-0000M.safetensors` with their index
    /// (a weight and its scale always share a shard). Default
    /// [`DEFAULT_MAX_SHARD_BYTES`], Hugging Face's 5 GB.
    pub max_shard_bytes: u64,
}

impl QuantizeOptions {
    /// `scheme`, with the default shard size.
    pub fn new(scheme: QuantScheme) -> Self {
        Self {
            scheme,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }

    /// Sets [`max_shard_bytes`](Self::max_shard_bytes).
    pub fn max_shard_bytes(mut self, bytes: u64) -> Self {
        self.max_shard_bytes = bytes;
        self
    }
}

/// What [`quantize_folder`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeReport {
    /// The folder written.
    pub output: PathBuf,
    /// The transformer weights written: the one file, or the index of the shards.
    pub weights: PathBuf,
    /// Weights files written (1 when not sharded).
    pub shards: usize,
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
/// `config.json` under [`QUANTIZATION_CONFIG_KEY`]; every other file is copied. The weights are
/// written one tensor at a time (memory holds one layer's weight, not the checkpoint), into
/// one file or, past `options.max_shard_bytes`, shards with an index.
///
/// Refuses an `output` that exists, a zero shard size, and a checkpoint that already holds
/// quantized tensors.
pub fn quantize_folder(
    model: &Path,
    output: &Path,
    options: &QuantizeOptions,
) -> Result<QuantizeReport> {
    let scheme = options.scheme;
    if options.max_shard_bytes == 0 {
        return Err(Error::invalid_argument(
            "max_shard_bytes",
            "must be at least 1 byte",
        ));
    }
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
        let mut report =
            write_quantized(&source, &targets, options, &out_dir, folder.weights_stem())?;
        write_config(&config_path, &out_dir.join("config.json"), scheme)?;
        report.output = output.to_path_buf();
        report.weights = output.join(&rel).join(
            report
                .weights
                .file_name()
                .ok_or_else(|| Error::invalid_argument("output", "no weights file written"))?,
        );
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

/// One unit of the output: a tensor copied as stored, or a weight quantized with its scale
/// (the two share a shard).
enum Unit<'a> {
    Copied(&'a str),
    Quantized(&'a str),
}

/// Writes the transformer weights of `source` into `dir` as `<stem>.safetensors` or shards of
/// it, quantizing `targets`; the returned report's `weights` is the file or index written.
fn write_quantized(
    source: &WeightSource,
    targets: &BTreeSet<String>,
    options: &QuantizeOptions,
    dir: &Path,
    stem: &str,
) -> Result<QuantizeReport> {
    let scheme = options.scheme;
    let mut keys = source.keys();
    if let Some(k) = keys
        .iter()
        .find(|k| matches!(source.stored_dtype(k), Some(StDtype::I8 | StDtype::F8_E4M3)))
    {
        return Err(Error::invalid_argument(
            "model",
            format!("tensor `{k}` is already quantized; quantize the original checkpoint"),
        ));
    }
    keys.sort_by(|a, b| natural_cmp(a, b));
    let code_dtype = match scheme {
        QuantScheme::Int8 => StDtype::I8,
        QuantScheme::Fp8E4M3 => StDtype::F8_E4M3,
    };
    let mut bytes_in = 0u64;
    let mut units = Vec::with_capacity(keys.len());
    let mut specs = Vec::with_capacity(keys.len());
    for key in &keys {
        let (bytes, dtype, shape) = source.raw(key).ok_or_else(|| Error::MissingTensor {
            name: key.to_string(),
            path: source.path_of(key).into(),
        })?;
        bytes_in += bytes.len() as u64;
        if targets.contains(*key) && shape.len() == 2 {
            units.push(Unit::Quantized(key));
            specs.push(vec![
                TensorSpec {
                    name: key.to_string(),
                    dtype: code_dtype,
                    shape: shape.to_vec(),
                },
                TensorSpec {
                    name: scale_key(key),
                    dtype: StDtype::F32,
                    shape: vec![shape[0]],
                },
            ]);
        } else {
            units.push(Unit::Copied(key));
            specs.push(vec![TensorSpec {
                name: key.to_string(),
                dtype,
                shape: shape.to_vec(),
            }]);
        }
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("quantization".to_string(), scheme.name().to_string()),
    ]);
    let plan = plan_shards(&specs, options.max_shard_bytes);
    let mut weight_map = BTreeMap::new();
    let mut report = QuantizeReport {
        output: PathBuf::new(),
        weights: PathBuf::new(),
        shards: plan.len(),
        quantized: 0,
        copied: 0,
        bytes_in,
        bytes_out: 0,
    };
    for (i, shard) in plan.iter().enumerate() {
        let name = if plan.len() == 1 {
            format!("{stem}.safetensors")
        } else {
            shard_name(stem, i, plan.len())
        };
        let path = dir.join(&name);
        let tensors: Vec<TensorSpec> = shard.iter().flat_map(|&u| specs[u].clone()).collect();
        let mut file = StreamingFile::create(&path, &tensors, &metadata)?;
        // The file's order puts every scale (f32) before every code (1 byte), so that each
        // tensor is aligned to its element size. Each weight is quantized twice, for its scale
        // and for its codes, rather than holding a shard's codes until their turn: memory stays
        // at one layer's weight.
        let unit_of: BTreeMap<&str, usize> = shard
            .iter()
            .flat_map(|&u| specs[u].iter().map(move |t| (t.name.as_str(), u)))
            .collect();
        for t in file.order().to_vec() {
            match units[unit_of[t.name.as_str()]] {
                Unit::Copied(key) => {
                    let (bytes, _, _) = source.raw(key).ok_or_else(|| Error::MissingTensor {
                        name: key.to_string(),
                        path: source.path_of(key).into(),
                    })?;
                    file.write(key, bytes)?;
                    source.release(key);
                    report.copied += 1;
                }
                Unit::Quantized(key) => {
                    let shape = source.shape(key).unwrap_or_default();
                    let values = source.read_f32(key, &shape)?;
                    let q = QuantizedTensor::quantize(key, scheme, &shape, &values)?;
                    drop(values);
                    if t.name == key {
                        file.write(key, &q.values)?;
                        report.quantized += 1;
                    } else {
                        file.write(&t.name, bytemuck::cast_slice(&q.scales))?;
                    }
                }
            }
        }
        file.finish()?;
        for t in &tensors {
            report.bytes_out += t.bytes();
            weight_map.insert(t.name.clone(), name.clone());
        }
        report.weights = path;
    }
    if plan.len() > 1 {
        report.weights = write_index(dir, stem, &weight_map, report.bytes_out)?;
    }
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
