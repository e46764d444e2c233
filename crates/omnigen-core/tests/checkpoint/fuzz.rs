//! Property-based fuzzing of the two parsers that read untrusted files: the safetensors header
//! path ([`WeightSource::open`] then reads) and the config parser. Each input must give `Ok` or
//! a typed error — never a panic, an abort or a huge allocation. Case counts are bounded so the
//! set runs in seconds; `PROPTEST_CASES=100000 cargo test --release -p omnigen-core --test
//! checkpoint fuzz` runs a longer campaign.

use std::path::Path;

use burn::tensor::DType;
use omnigen_core::{Error, TransformerConfig, VaeConfig, WeightSource};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// `default` cases, or `PROPTEST_CASES` for a longer campaign (`with_cases` alone would
/// ignore the variable).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Opens `bytes` as a safetensors file and reads every tensor it declares, as stored and
/// converted; every failure must be a typed error about the weights.
fn open_and_read_all(dir: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = dir.join("fuzz.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let source = match WeightSource::open(&path) {
        Ok(source) => source,
        Err(Error::CorruptWeights { path: p, reason }) => {
            prop_assert_eq!(p, path);
            prop_assert!(!reason.is_empty());
            return Ok(());
        }
        Err(other) => return Err(TestCaseError::fail(format!("untyped failure: {other:?}"))),
    };
    for name in source.keys() {
        let shape = source.shape(name).unwrap();
        prop_assert!(source.stored_dtype(name).is_some());
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            match source.read(name, &shape, dtype) {
                Ok(data) => prop_assert_eq!(data.shape.as_slice(), shape.as_slice()),
                Err(Error::UnsupportedDtype { .. }) => {}
                Err(other) => return Err(TestCaseError::fail(format!("{name}: {other:?}"))),
            }
        }
        let wrong = [shape.as_slice(), &[1]].concat();
        let is_mismatch = matches!(
            source.read(name, &wrong, DType::F32),
            Err(Error::ShapeMismatch { .. })
        );
        prop_assert!(is_mismatch, "a wrong shape was accepted for {}", name);
    }
    Ok(())
}

/// A header length field, a JSON header and a data section, each plausible or hostile.
fn safetensors_bytes() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32".to_string()),
        Just("F16".to_string()),
        Just("BF16".to_string()),
        Just("I64".to_string()),
        Just("U8".to_string()),
        Just("F8_E4M3".to_string()),
        Just("F4".to_string()),
        Just("BOOL".to_string()),
        "[A-Z0-9_]{0,6}",
    ];
    let dim = prop_oneof![
        0usize..5,
        Just(usize::MAX),
        Just(1usize << 32),
        Just((1usize << 62) + 1),
        any::<usize>(),
    ];
    let offset = prop_oneof![0u64..64, Just(u64::MAX), Just(1u64 << 63), any::<u64>()];
    let tensor = (
        "[a-z.]{0,8}",
        dtype,
        prop::collection::vec(dim, 0..4),
        (offset.clone(), offset),
    );
    let header = prop::collection::vec(tensor, 0..4).prop_map(|tensors| {
        let mut map = Map::new();
        for (name, dtype, shape, (start, end)) in tensors {
            map.insert(
                name,
                json!({ "dtype": dtype, "shape": shape, "data_offsets": [start, end] }),
            );
        }
        map.insert("__metadata__".into(), json!({ "format": "pt" }));
        Value::Object(map).to_string().into_bytes()
    });
    let len_field = prop_oneof![
        Just(None),
        Just(Some(u64::MAX)),
        Just(Some(100_000_001)),
        Just(Some(1u64 << 63)),
        any::<u64>().prop_map(Some),
        (0u64..200).prop_map(Some),
    ];
    (
        len_field,
        header,
        prop::collection::vec(any::<u8>(), 0..64),
        0usize..4,
    )
        .prop_map(|(len_field, header, data, truncate)| {
            let len = len_field.unwrap_or(header.len() as u64);
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&data);
            let keep = bytes.len().saturating_sub(truncate);
            bytes.truncate(keep);
            bytes
        })
}

/// A valid small file with consistent offsets, so reads are reached, with data cut or padded.
fn consistent_file() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just(("F32", 4)),
        Just(("F16", 2)),
        Just(("BF16", 2)),
        Just(("I64", 8))
    ];
    let tensor = (dtype, prop::collection::vec(0usize..4, 0..3));
    (prop::collection::vec(tensor, 1..4), -3i64..3).prop_map(|(tensors, slack)| {
        let mut map = Map::new();
        let mut at = 0usize;
        for (i, ((dtype, size), shape)) in tensors.into_iter().enumerate() {
            let n = shape.iter().product::<usize>() * size;
            map.insert(
                format!("t{i}"),
                json!({ "dtype": dtype, "shape": shape, "data_offsets": [at, at + n] }),
            );
            at += n;
        }
        let header = Value::Object(map).to_string().into_bytes();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        let data_len = (at as i64 + slack).max(0) as usize;
        bytes.extend((0..data_len).map(|i| (i * 37) as u8));
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let dir = tempfile::tempdir().unwrap();
        open_and_read_all(dir.path(), &bytes)?;
    }

    #[test]
    fn hostile_headers_are_typed_errors(bytes in safetensors_bytes()) {
        let dir = tempfile::tempdir().unwrap();
        open_and_read_all(dir.path(), &bytes)?;
    }

    #[test]
    fn consistent_files_read_back(bytes in consistent_file()) {
        let dir = tempfile::tempdir().unwrap();
        open_and_read_all(dir.path(), &bytes)?;
    }
}

/// Any JSON value, hostile numbers included.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(1u64 << 63)),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!(5e-324)),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!("su")),
        Just(json!("longrope")),
        Just(json!("silu")),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 80, 70, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..70).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("rope_type".to_string()),
                    Just("short_factor".to_string()),
                    Just("long_factor".to_string()),
                    "[a-z_]{1,6}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const TRANSFORMER_FIELDS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "rope_theta",
    "rope_base",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rope_scaling",
    "hidden_act",
    "patch_size",
    "in_channels",
    "pos_embed_max_size",
    "time_step_dim",
];

const VAE_FIELDS: &[&str] = &[
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "act_fn",
    "scaling_factor",
    "shift_factor",
    "down_block_types",
    "up_block_types",
    "mid_block_add_attention",
    "use_quant_conv",
    "use_post_quant_conv",
];

/// A valid tiny transformer config, then some of its fields replaced by arbitrary values.
fn transformer_json() -> impl Strategy<Value = Value> {
    let base = json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 100,
        "max_position_embeddings": 256,
        "rope_scaling": { "type": "su", "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8] },
    });
    mutated(base, TRANSFORMER_FIELDS)
}

fn vae_json() -> impl Strategy<Value = Value> {
    let base = json!({ "block_out_channels": [32, 64], "norm_num_groups": 32 });
    // Arbitrary values rarely make a long valid channel list; this one reaches the level
    // count's own limits (the downsampling factor is 2^(levels - 1)).
    let levels = (1usize..80).prop_map(|n| json!({ "block_out_channels": vec![32; n] }));
    prop_oneof![4 => mutated(base, VAE_FIELDS), 1 => levels]
}

/// `base` with 1..4 of `fields` (or unknown keys) set to arbitrary values, or an arbitrary
/// value outright.
fn mutated(base: Value, fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => prop::sample::select(fields).prop_map(str::to_string),
        1 => "[a-z_]{1,8}",
    ];
    let edits = prop::collection::vec((key, json_value()), 1..4);
    prop_oneof![
        6 => edits.prop_map(move |edits| {
            let mut v = base.clone();
            for (k, value) in edits {
                v[k] = value;
            }
            v
        }),
        1 => json_value(),
    ]
}

/// Every derived quantity of an accepted config, so that an accepted config can be used.
fn use_transformer(c: &TransformerConfig) {
    let _ = (c.head_dim(), c.rope_attention_scaling());
    let _ = (c.num_parameters(), c.pos_embed_len(), c.num_stored_values());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    #[test]
    fn transformer_config_is_ok_or_a_config_error(value in transformer_json()) {
        match TransformerConfig::from_json_value(Path::new("config.json"), &value) {
            Ok(config) => {
                prop_assert!(config.validate().is_ok());
                use_transformer(&config);
            }
            Err(Error::Config { path, reason }) => {
                prop_assert_eq!(path, Path::new("config.json"));
                prop_assert!(!reason.is_empty());
            }
            Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }

    #[test]
    fn vae_config_is_ok_or_a_config_error(value in vae_json()) {
        match VaeConfig::from_json_value(Path::new("vae/config.json"), &value) {
            Ok(config) => {
                prop_assert!(config.validate().is_ok());
                let _ = config.downsample_factor();
            }
            Err(Error::Config { reason, .. }) => prop_assert!(!reason.is_empty()),
            Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }
}

/// Regression (found by reading what the fuzzer reaches): eight tensors whose sizes are each
/// valid but whose offsets end at 2^64 - 8 made the `safetensors` crate's final size check
/// overflow — a panic in debug builds. The header's offsets are now checked against the file
/// size first.
#[test]
fn offsets_summing_to_the_top_of_u64_are_a_typed_error() {
    let size = (1u64 << 61) - 1;
    let mut map = Map::new();
    for i in 0..8u64 {
        map.insert(
            format!("t{i}"),
            json!({ "dtype": "U8", "shape": [size], "data_offsets": [i * size, (i + 1) * size] }),
        );
    }
    let header = Value::Object(map).to_string().into_bytes();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0; 16]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let err = WeightSource::open(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("past the end of the"), "{msg}");
}
