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
