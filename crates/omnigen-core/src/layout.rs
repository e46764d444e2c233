//! Checkpoint key layouts: the official `model.safetensors` names and diffusers' renamed
//! `OmniGenTransformer2DModel` names, related by one ordered mapping table.
//!
//! Model code always asks for the **official** (canonical) key; [`TransformerWeights`] finds it
//! in whichever layout the checkpoint uses. Adding a layout means adding a table, not code.

use burn::tensor::{DType, TensorData};

use crate::error::{Error, Result};
use crate::quant::QuantizedTensor;
use crate::weights::WeightSource;

/// Which naming scheme a transformer checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// `Shitao/OmniGen-v1` `model.safetensors` (`llm.layers.N.self_attn.qkv_proj.weight`, ...).
    Official,
    /// `Shitao/OmniGen-v1-diffusers` `transformer/` (`layers.N.self_attn.to_q.weight`, ...).
    Diffusers,
}

/// How a canonical key is stored in the diffusers layout. Patterns use `{i}` for a layer index;
/// a pattern ending in `.` renames every key with that prefix. First match wins.
enum Rule {
    /// The canonical key (or prefix) is stored under another name.
    Rename(&'static str, &'static str),
    /// The canonical tensor is the row-wise concatenation of several stored tensors.
    ConcatRows(&'static str, &'static [&'static str]),
}

const DIFFUSERS_RULES: &[Rule] = &[
    Rule::ConcatRows(
        "llm.layers.{i}.self_attn.qkv_proj.weight",
        &[
            "layers.{i}.self_attn.to_q.weight",
            "layers.{i}.self_attn.to_k.weight",
            "layers.{i}.self_attn.to_v.weight",
        ],
    ),
    // Per-row scales of a quantized qkv weight (see `crate::quant`) follow its rows.
    Rule::ConcatRows(
        "llm.layers.{i}.self_attn.qkv_proj.weight_scale",
        &[
            "layers.{i}.self_attn.to_q.weight_scale",
            "layers.{i}.self_attn.to_k.weight_scale",
            "layers.{i}.self_attn.to_v.weight_scale",
        ],
    ),
    Rule::Rename(
        "llm.layers.{i}.self_attn.o_proj.",
        "layers.{i}.self_attn.to_out.0.",
    ),
    Rule::Rename("pos_embed", "patch_embedding.pos_embed"),
    Rule::Rename("x_embedder.proj.", "patch_embedding.output_image_proj."),
    Rule::Rename(
        "input_x_embedder.proj.",
        "patch_embedding.input_image_proj.",
    ),
    Rule::Rename("final_layer.adaLN_modulation.1.", "norm_out.linear."),
    Rule::Rename("final_layer.linear.", "proj_out."),
    Rule::Rename("time_token.mlp.0.", "time_token.linear_1."),
    Rule::Rename("time_token.mlp.2.", "time_token.linear_2."),
    Rule::Rename("t_embedder.mlp.0.", "t_embedder.linear_1."),
    Rule::Rename("t_embedder.mlp.2.", "t_embedder.linear_2."),
    Rule::Rename("llm.", ""),
];

/// Matches `key` against `pattern`; returns the layer index (if any) and the rest of the key
/// after a prefix pattern.
fn match_pattern<'k>(pattern: &str, key: &'k str) -> Option<(Option<&'k str>, &'k str)> {
    let prefix_rule = pattern.ends_with('.');
    let (head, tail) = match pattern.split_once("{i}") {
        Some((h, t)) => (h, Some(t)),
        None => (pattern, None),
    };
    let rest = key.strip_prefix(head)?;
    let (index, rest) = match tail {
        Some(tail) => {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return None;
            }
            let (idx, after) = rest.split_at(digits);
            (Some(idx), after.strip_prefix(tail)?)
        }
        None => (None, rest),
    };
    if prefix_rule || rest.is_empty() {
        Some((index, rest))
    } else {
        None
    }
}

fn fill(pattern: &str, index: Option<&str>, rest: &str) -> String {
    let mut s = match index {
        Some(i) => pattern.replace("{i}", i),
        None => pattern.to_string(),
    };
    s.push_str(rest);
    s
}

/// The stored key(s) that hold canonical `key` in `layout` (several keys = concatenated rows).
pub fn stored_keys(layout: CheckpointLayout, key: &str) -> Vec<String> {
    if layout == CheckpointLayout::Official {
        return vec![key.to_string()];
    }
    for rule in DIFFUSERS_RULES {
        match rule {
            Rule::Rename(from, to) => {
                if let Some((i, rest)) = match_pattern(from, key) {
                    return vec![fill(to, i, rest)];
                }
            }
            Rule::ConcatRows(from, parts) => {
                if let Some((i, rest)) = match_pattern(from, key) {
                    return parts.iter().map(|p| fill(p, i, rest)).collect();
                }
            }
        }
    }
    vec![key.to_string()]
}

/// The shape of each of the `n` row blocks a tensor of `shape` is stored as (a row-wise
/// concatenation: `[rows / n, rest...]`).
fn row_block_shape(shape: &[usize], n: usize) -> Result<Vec<usize>> {
    match shape.first() {
        Some(&rows) if rows.is_multiple_of(n) => {
            let mut part = shape.to_vec();
            part[0] = rows / n;
            Ok(part)
        }
        _ => Err(Error::invalid_argument(
            "shape",
            format!("cannot split {shape:?} into {n} row blocks"),
        )),
    }
}

/// A transformer checkpoint read through canonical (official) key names.
#[derive(Debug)]
pub struct TransformerWeights {
    source: WeightSource,
    layout: CheckpointLayout,
}

impl TransformerWeights {
    /// Wraps a weight source, detecting its layout from the first layer's attention keys.
    pub fn new(source: WeightSource) -> Result<Self> {
        let layout = if source.contains("llm.layers.0.self_attn.qkv_proj.weight") {
            CheckpointLayout::Official
        } else if source.contains("layers.0.self_attn.to_q.weight") {
            CheckpointLayout::Diffusers
        } else {
            return Err(Error::UnknownLayout {
                path: source.path_of("").into(),
                reason: "found neither `llm.layers.0.self_attn.qkv_proj.weight` (official) nor \
                         `layers.0.self_attn.to_q.weight` (diffusers)"
                    .into(),
            });
        };
        Ok(Self { source, layout })
    }

    /// The detected layout.
    pub fn layout(&self) -> CheckpointLayout {
        self.layout
    }

    /// The underlying weight source.
    pub fn source(&self) -> &WeightSource {
        &self.source
    }

    /// Reads canonical tensor `key` with the given shape, converted to `dtype`.
    pub fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        let stored = stored_keys(self.layout, key);
        if stored.len() == 1 {
            return self.source.read(&stored[0], shape, dtype);
        }
        let part_shape = row_block_shape(shape, stored.len())?;
        let mut bytes = Vec::new();
        for name in &stored {
            let part = self.source.read(name, &part_shape, dtype)?;
            bytes.extend_from_slice(&part.bytes);
        }
        Ok(TensorData::from_bytes_vec(bytes, shape.to_vec(), dtype))
    }

    /// Reads canonical tensor `key` as stored quantized (see [`WeightSource::read_quantized`]);
    /// `None` when it is stored as floats, or as parts (diffusers' q, k, v) not all quantized
    /// with one scheme, which [`read`](Self::read) then dequantizes.
    pub fn read_quantized(&self, key: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        let stored = stored_keys(self.layout, key);
        if stored.len() == 1 {
            return self.source.read_quantized(&stored[0], shape);
        }
        let part_shape = row_block_shape(shape, stored.len())?;
        let mut parts = Vec::with_capacity(stored.len());
        for name in &stored {
            match self.source.read_quantized(name, &part_shape)? {
                Some(q) => parts.push(q),
                None => return Ok(None),
            }
        }
        let scheme = parts[0].scheme;
        if parts.iter().any(|p| p.scheme != scheme) {
            return Ok(None);
        }
        let mut joined = QuantizedTensor {
            scheme,
            shape: shape.to_vec(),
            values: Vec::new(),
            scales: Vec::new(),
        };
        for p in parts {
            joined.values.extend_from_slice(&p.values);
            joined.scales.extend_from_slice(&p.scales);
        }
        Ok(Some(joined))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names_follow_the_conversion_script() {
        let d = CheckpointLayout::Diffusers;
        assert_eq!(
            stored_keys(d, "llm.layers.12.self_attn.o_proj.weight"),
            ["layers.12.self_attn.to_out.0.weight"]
        );
        assert_eq!(
            stored_keys(d, "llm.layers.3.self_attn.qkv_proj.weight"),
            [
                "layers.3.self_attn.to_q.weight",
                "layers.3.self_attn.to_k.weight",
                "layers.3.self_attn.to_v.weight"
            ]
        );
        assert_eq!(
            stored_keys(d, "llm.layers.3.self_attn.qkv_proj.weight_scale"),
            [
                "layers.3.self_attn.to_q.weight_scale",
                "layers.3.self_attn.to_k.weight_scale",
                "layers.3.self_attn.to_v.weight_scale"
            ]
        );
        assert_eq!(
            stored_keys(d, "llm.layers.2.self_attn.o_proj.weight_scale"),
            ["layers.2.self_attn.to_out.0.weight_scale"]
        );
        assert_eq!(
            stored_keys(d, "llm.layers.0.mlp.gate_up_proj.weight"),
            ["layers.0.mlp.gate_up_proj.weight"]
        );
        assert_eq!(stored_keys(d, "llm.norm.weight"), ["norm.weight"]);
        assert_eq!(stored_keys(d, "pos_embed"), ["patch_embedding.pos_embed"]);
        assert_eq!(
            stored_keys(d, "x_embedder.proj.bias"),
            ["patch_embedding.output_image_proj.bias"]
        );
        assert_eq!(
            stored_keys(d, "input_x_embedder.proj.weight"),
            ["patch_embedding.input_image_proj.weight"]
        );
        assert_eq!(
            stored_keys(d, "final_layer.adaLN_modulation.1.weight"),
            ["norm_out.linear.weight"]
        );
        assert_eq!(stored_keys(d, "final_layer.linear.bias"), ["proj_out.bias"]);
        assert_eq!(
            stored_keys(d, "time_token.mlp.2.weight"),
            ["time_token.linear_2.weight"]
        );
        assert_eq!(
            stored_keys(d, "t_embedder.mlp.0.bias"),
            ["t_embedder.linear_1.bias"]
        );
        assert_eq!(
            stored_keys(CheckpointLayout::Official, "pos_embed"),
            ["pos_embed"]
        );
    }

    #[test]
    fn layer_index_must_be_digits() {
        assert!(match_pattern(
            "llm.layers.{i}.self_attn.o_proj.",
            "llm.layers.x.self_attn.o_proj.weight"
        )
        .is_none());
        assert!(match_pattern("pos_embed", "pos_embed_extra").is_none());
    }
}
