//! Fixture helpers shared by the processor parity tests.
#![allow(dead_code)]

use std::path::PathBuf;

use omnigen_pipeline::ModelInput;
use omnigen_test_support::parse_spans;

pub use omnigen_test_support::{max_abs_diff, read_json, SafetensorsFile};

/// Root of the committed fixture set.
pub fn fixtures_dir() -> PathBuf {
    omnigen_test_support::fixtures_root()
}

/// `tests/fixtures/A/<name>`.
pub fn fixture_a(name: &str) -> PathBuf {
    fixtures_dir().join("A").join(name)
}

/// Compares a collated model input with the fixture tensors `{prefix}.input_ids`,
/// `.attention_mask`, `.position_ids`, `.pixel_values.J` and the JSON spans.
pub fn assert_model_input_matches(
    input: &ModelInput,
    tensors: &SafetensorsFile,
    prefix: &str,
    spans_json: Option<&serde_json::Value>,
) {
    let name = |key: &str| format!("{prefix}.{key}");
    for (key, shape) in [
        ("input_ids", input.input_ids_shape().to_vec()),
        ("position_ids", input.position_ids_shape().to_vec()),
        ("attention_mask", input.attention_mask_shape().to_vec()),
    ] {
        assert_eq!(shape, tensors.shape(&name(key)), "{} shape", name(key));
    }
    for (key, values) in [
        ("input_ids", &input.input_ids),
        ("position_ids", &input.position_ids),
    ] {
        assert_eq!(*values, tensors.i64(&name(key)), "{}", name(key));
    }
    // 0/1 masks: exact.
    let mask = name("attention_mask");
    assert_eq!(
        input.attention_mask().expect("dense mask"),
        tensors.f32(&mask),
        "{mask}"
    );
    for (j, image) in input.images.iter().enumerate() {
        let float_name = name(&format!("pixel_values.{j}"));
        let u8_name = name(&format!("pixel_u8.{j}"));
        let is_float = tensors.has(&float_name);
        let stored = if is_float { &float_name } else { &u8_name };
        assert_eq!(
            tensors.shape(stored),
            vec![1, 3, image.height, image.width],
            "{stored} shape"
        );
        if is_float {
            let diff = max_abs_diff(&image.pixels, &tensors.f32(&float_name));
            assert!(diff <= 1e-6, "{float_name}: max diff {diff}");
        } else {
            // The cropped 8-bit image, CHW: must match exactly.
            assert_eq!(chw_u8(&image.rgb), tensors.u8(&u8_name), "{u8_name}");
            assert_eq!(
                image.pixels,
                omnigen_pipeline::image_preprocess::normalize(&image.rgb)
            );
        }
    }
    let n = input.images.len();
    for extra in [
        name(&format!("pixel_values.{n}")),
        name(&format!("pixel_u8.{n}")),
    ] {
        assert!(
            !tensors.has(&extra),
            "{prefix}: fewer images than the fixture"
        );
    }
    if let Some(spans) = spans_json {
        let expected = parse_spans(spans, input.batch_size);
        assert_eq!(input.image_spans, expected, "{prefix} spans");
    }
}

/// An RGB8 image as channel-major bytes `[3, h, w]`.
pub fn chw_u8(rgb: &image::RgbImage) -> Vec<u8> {
    let raw = rgb.as_raw();
    let n = raw.len() / 3;
    (0..3)
        .flat_map(|c| (0..n).map(move |i| raw[i * 3 + c]))
        .collect()
}
