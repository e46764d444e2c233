//! Fixture helpers shared by the processor parity tests.
#![allow(dead_code)]

use std::path::PathBuf;

use omnigen_pipeline::ModelInput;
use safetensors::{Dtype, SafeTensors};

/// Root of the committed fixture set.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// `tests/fixtures/A/<name>`.
pub fn fixture_a(name: &str) -> PathBuf {
    fixtures_dir().join("A").join(name)
}

/// A safetensors file held in memory.
pub struct Tensors {
    bytes: Vec<u8>,
}

impl Tensors {
    pub fn open(path: &std::path::Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Self { bytes }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors")
    }

    pub fn has(&self, name: &str) -> bool {
        self.view().names().contains(&name)
    }

    pub fn names(&self) -> Vec<String> {
        self.view()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.view()
            .tensor(name)
            .unwrap_or_else(|_| panic!("tensor {name}"))
            .shape()
            .to_vec()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("tensor {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Float32, or any integer/bool tensor converted (masks may be stored as u8).
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("tensor {name}"));
        match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::U8 | Dtype::BOOL => t.data().iter().map(|&b| b as f32).collect(),
            Dtype::I64 => self.i64(name).into_iter().map(|v| v as f32).collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }

    pub fn u8(&self, name: &str) -> Vec<u8> {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("tensor {name}"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        t.data().to_vec()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Compares a collated model input with the fixture tensors `{prefix}.input_ids`,
/// `.attention_mask`, `.position_ids`, `.pixel_values.J` and the JSON spans.
pub fn assert_model_input_matches(
    input: &ModelInput,
    tensors: &Tensors,
    prefix: &str,
    spans_json: Option<&serde_json::Value>,
) {
    assert_eq!(
        input.input_ids_shape().to_vec(),
        tensors.shape(&format!("{prefix}.input_ids")),
        "{prefix} ids shape"
    );
    assert_eq!(
        input.input_ids,
        tensors.i64(&format!("{prefix}.input_ids")),
        "{prefix}.input_ids"
    );
    assert_eq!(
        input.position_ids_shape().to_vec(),
        tensors.shape(&format!("{prefix}.position_ids")),
        "{prefix} position shape"
    );
    assert_eq!(
        input.position_ids,
        tensors.i64(&format!("{prefix}.position_ids")),
        "{prefix}.position_ids"
    );
    assert_eq!(
        input.attention_mask_shape().to_vec(),
        tensors.shape(&format!("{prefix}.attention_mask")),
        "{prefix} mask shape"
    );
    // 0/1 masks: exact.
    assert_eq!(
        input.attention_mask,
        tensors.f32(&format!("{prefix}.attention_mask")),
        "{prefix}.attention_mask"
    );
    for (j, image) in input.images.iter().enumerate() {
        let float_name = format!("{prefix}.pixel_values.{j}");
        let u8_name = format!("{prefix}.pixel_u8.{j}");
        if tensors.has(&float_name) {
            assert_eq!(
                tensors.shape(&float_name),
                vec![1, 3, image.height, image.width],
                "{float_name} shape"
            );
            let diff = max_abs_diff(&image.pixels, &tensors.f32(&float_name));
            assert!(diff <= 1e-6, "{float_name}: max diff {diff}");
        } else {
            // The cropped 8-bit image, CHW: must match exactly.
            assert_eq!(
                tensors.shape(&u8_name),
                vec![1, 3, image.height, image.width],
                "{u8_name} shape"
            );
            assert_eq!(chw_u8(&image.rgb), tensors.u8(&u8_name), "{u8_name}");
            assert_eq!(
                image.pixels,
                omnigen_pipeline::image_preprocess::normalize(&image.rgb)
            );
        }
    }
    for name in [
        format!("{prefix}.pixel_values.{}", input.images.len()),
        format!("{prefix}.pixel_u8.{}", input.images.len()),
    ] {
        assert!(
            !tensors.has(&name),
            "{prefix}: fewer images than the fixture"
        );
    }
    if let Some(spans) = spans_json {
        let expected: Vec<Vec<(usize, usize)>> = (0..input.batch_size)
            .map(|b| {
                spans
                    .get(b.to_string())
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .map(|s| {
                                (
                                    s[0].as_u64().unwrap() as usize,
                                    s[1].as_u64().unwrap() as usize,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(input.image_spans, expected, "{prefix} spans");
    }
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An RGB8 image as channel-major bytes `[3, h, w]`.
pub fn chw_u8(rgb: &image::RgbImage) -> Vec<u8> {
    let raw = rgb.as_raw();
    let n = raw.len() / 3;
    (0..3)
        .flat_map(|c| (0..n).map(move |i| raw[i * 3 + c]))
        .collect()
}
