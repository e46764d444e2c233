//! The safetensors weight source: both key layouts of the committed tiny checkpoint, and a typed
//! error for every way a weights file can be wrong.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use omnigen_core::{CheckpointLayout, Error, TransformerConfig, TransformerWeights, WeightSource};
use omnigen_test_support::Dtype;

fn fixtures() -> PathBuf {
    omnigen_test_support::fixtures_root()
}

fn official() -> PathBuf {
    fixtures().join("A/model/model.safetensors")
}

fn diffusers_dir() -> PathBuf {
    fixtures().join("A/model_diffusers/transformer")
}

/// Every canonical tensor of the tiny model, with its shape, derived from the config alone.
fn canonical_shapes(cfg: &TransformerConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let grid = cfg.pos_embed_max_size * cfg.pos_embed_max_size;
    let mut out = vec![
        ("pos_embed".to_string(), vec![1, grid, h]),
        ("x_embedder.proj.weight".into(), vec![h, 4, 2, 2]),
        ("input_x_embedder.proj.bias".into(), vec![h]),
        ("time_token.mlp.0.weight".into(), vec![h, 256]),
        ("t_embedder.mlp.2.bias".into(), vec![h]),
        (
            "final_layer.adaLN_modulation.1.weight".into(),
            vec![2 * h, h],
        ),
        ("final_layer.linear.weight".into(), vec![16, h]),
        ("llm.embed_tokens.weight".into(), vec![v, h]),
        ("llm.norm.weight".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        out.push((
            format!("llm.layers.{l}.self_attn.qkv_proj.weight"),
            vec![3 * h, h],
        ));
        out.push((
            format!("llm.layers.{l}.self_attn.o_proj.weight"),
            vec![h, h],
        ));
        out.push((
            format!("llm.layers.{l}.mlp.gate_up_proj.weight"),
            vec![2 * i, h],
        ));
        out.push((format!("llm.layers.{l}.mlp.down_proj.weight"), vec![h, i]));
        out.push((format!("llm.layers.{l}.input_layernorm.weight"), vec![h]));
    }
    out
}

#[test]
fn official_and_diffusers_layouts_read_identical_tensors() {
    let cfg = TransformerConfig::from_file(fixtures().join("A/model/config.json")).unwrap();
    let a = TransformerWeights::new(WeightSource::open(official()).unwrap()).unwrap();
    let b = TransformerWeights::new(
        WeightSource::open_in_dir(diffusers_dir(), "diffusion_pytorch_model").unwrap(),
    )
    .unwrap();
    assert_eq!(a.layout(), CheckpointLayout::Official);
    assert_eq!(b.layout(), CheckpointLayout::Diffusers);
    for (key, shape) in canonical_shapes(&cfg) {
        let x = a.read(&key, &shape, DType::F32).unwrap();
        // The diffusers copy is stored in bf16 (as the real one is); values are bf16-exact.
        let y = b.read(&key, &shape, DType::F32).unwrap();
        assert_eq!(x.shape, y.shape, "{key}");
        assert_eq!(
            x.to_vec::<f32>().unwrap(),
            y.to_vec::<f32>().unwrap(),
            "{key}"
        );
    }
}

#[test]
fn reads_convert_between_float_dtypes() {
    let src = WeightSource::open(official()).unwrap();
    let key = "llm.norm.weight";
    let shape = src.shape(key).unwrap();
    let f32s = src.read_f32(key, &shape).unwrap();
    let bf = src.read(key, &shape, DType::BF16).unwrap();
    assert_eq!(bf.dtype, DType::BF16);
    let back: Vec<f32> = bf.convert::<f32>().to_vec().unwrap();
    assert_eq!(
        back, f32s,
        "tiny weights are bf16-exact, so the round trip is lossless"
    );
    let half = src.read(key, &shape, DType::F16).unwrap();
    assert_eq!(half.dtype, DType::F16);
}

#[test]
fn prefix_lookup() {
    let src = WeightSource::open(official()).unwrap();
    let keys = src.keys_with_prefix("llm.layers.1.");
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with("llm.layers.1.")));
    assert!(keys.contains(&"llm.layers.1.self_attn.qkv_proj.weight"));
}

fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    omnigen_test_support::write_safetensors(path, tensors);
}

fn small_file(dir: &Path) -> PathBuf {
    let path = dir.join("small.safetensors");
    let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let ints: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
    write_file(
        &path,
        &[
            ("w", Dtype::F32, vec![2, 3], floats),
            ("ids", Dtype::I64, vec![3], ints),
        ],
    );
    path
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = WeightSource::open(small_file(dir.path())).unwrap();
    let err = src.read("nope.weight", &[2, 3], DType::F32).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "nope.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("small.safetensors"));
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let src = WeightSource::open(small_file(dir.path())).unwrap();
    let err = src.read("w", &[3, 2], DType::F32).unwrap_err();
    match &err {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "w");
            assert_eq!(expected, &[3, 2]);
            assert_eq!(found, &[2, 3]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert_eq!(
        src.read_f32("w", &[2, 3]).unwrap(),
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
}

#[test]
fn wrong_dtype_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = WeightSource::open(small_file(dir.path())).unwrap();
    let err = src.read("ids", &[3], DType::F32).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedDtype { name, found, .. } if name == "ids" && found == "I64"),
        "{err}"
    );
}

#[test]
fn truncated_file_fails_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = WeightSource::open(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn header_length_larger_than_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let err = WeightSource::open(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
    assert!(err.to_string().contains("bad.safetensors"));

    assert!(err
        .to_string()
        .contains("declares 1000000 bytes, past the end of the 10-byte file"));

    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert!(matches!(
        WeightSource::open(&path).unwrap_err(),
        Error::CorruptWeights { .. }
    ));
}

#[test]
fn an_implausibly_large_header_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    for declared in [101_000_000u64, u64::MAX] {
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes).unwrap();
        let err = WeightSource::open(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "declares {declared} bytes, more than the 100000000"
            )),
            "{err}"
        );
        assert!(!err.contains("past the end"), "{err}");
    }
}

#[test]
fn unknown_layout_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        TransformerWeights::new(WeightSource::open(small_file(dir.path())).unwrap()).unwrap_err();
    assert!(matches!(err, Error::UnknownLayout { .. }), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let err = WeightSource::open("/nonexistent/model.safetensors").unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    let err = WeightSource::open_in_dir("/nonexistent", "model").unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/model.safetensors"),
        "{err}"
    );
}

#[test]
fn stored_dtypes_are_reported_as_the_header_declares_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = WeightSource::open(small_file(dir.path())).unwrap();
    assert_eq!(src.stored_dtype("w"), Some(Dtype::F32));
    assert_eq!(src.stored_dtype("ids"), Some(Dtype::I64));
    assert_eq!(src.stored_dtype("nope"), None);
    let bf16 = WeightSource::open_in_dir(diffusers_dir(), "diffusion_pytorch_model").unwrap();
    assert!(bf16
        .keys()
        .iter()
        .all(|k| bf16.stored_dtype(k) == Some(Dtype::BF16)));
}

#[test]
fn f8_e4m3_and_int8_tensors_load_directly_with_their_scales() {
    use omnigen_core::quant::{f32_to_fp8_e4m3, fp8_e4m3_to_f32};
    use omnigen_core::QuantScheme;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.safetensors");
    let values = [0.5f32, -1.25, 448.0, 0.0, 3.0, -0.001953125];
    let fp8: Vec<u8> = values.iter().map(|&v| f32_to_fp8_e4m3(v)).collect();
    let scales = [2.0f32, 0.5];
    let int8: Vec<u8> = [1i8, -127, 5, 0, 64, -3].iter().map(|&v| v as u8).collect();
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    omnigen_test_support::write_safetensors(
        &path,
        &[
            // An FP8 checkpoint of another tool: no scale tensor.
            ("plain.weight", Dtype::F8_E4M3, vec![2, 3], fp8.clone()),
            ("scaled.weight", Dtype::F8_E4M3, vec![2, 3], fp8.clone()),
            (
                "scaled.weight_scale",
                Dtype::F32,
                vec![2],
                f32_bytes(&scales),
            ),
            ("q.weight", Dtype::I8, vec![2, 3], int8.clone()),
            ("q.weight_scale", Dtype::F32, vec![2], f32_bytes(&scales)),
            ("lonely.weight", Dtype::I8, vec![2, 3], int8),
        ],
    );
    let src = WeightSource::open(&path).unwrap();
    let decoded: Vec<f32> = fp8.iter().map(|&b| fp8_e4m3_to_f32(b)).collect();
    assert_eq!(decoded, values, "these values are exact in e4m3");
    let plain = src.read_f32("plain.weight", &[2, 3]).unwrap();
    assert_eq!(plain, values);
    let q = src
        .read_quantized("scaled.weight", &[2, 3])
        .unwrap()
        .unwrap();
    assert_eq!(
        (q.scheme, q.scales.clone()),
        (QuantScheme::Fp8E4M3, scales.to_vec())
    );
    let scaled = src.read_f32("scaled.weight", &[2, 3]).unwrap();
    let want: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, v)| v * scales[i / 3])
        .collect();
    assert_eq!(scaled, want);
    // Converted to bf16 on the way, like any other tensor.
    let bf = src.read("scaled.weight", &[2, 3], DType::BF16).unwrap();
    assert_eq!(bf.dtype, DType::BF16);
    assert_eq!(
        bf.convert_dtype(DType::F32).into_vec::<f32>().unwrap(),
        want
    );
    let q8 = src.read_f32("q.weight", &[2, 3]).unwrap();
    assert_eq!(q8, [2.0, -254.0, 10.0, 0.0, 32.0, -1.5]);
    // The scales were consumed with their weights: nothing left unread but the orphan.
    assert_eq!(src.unread_keys(), ["lonely.weight"]);
    // An int8 tensor without its scale has no meaning: the scale is named as missing.
    match src.read_f32("lonely.weight", &[2, 3]) {
        Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "lonely.weight_scale"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        src.read_quantized("q.weight", &[3, 2]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(src.read_quantized("nope", &[1]).is_err());
}
