//! The configuration structs parse the real OmniGen-v1 files and the tiny test checkpoints.

use std::path::{Path, PathBuf};

use omnigen_core::{Error, RopeScaling, TransformerConfig, VaeConfig};

fn fixtures() -> PathBuf {
    omnigen_test_support::fixtures_root()
}

#[test]
fn real_phi3_config_with_legacy_su_spelling() {
    let cfg = TransformerConfig::from_file(fixtures().join("real/config.json")).unwrap();
    assert_eq!(cfg.hidden_size, 3072);
    assert_eq!(cfg.num_hidden_layers, 32);
    assert_eq!(cfg.head_dim(), 96);
    assert_eq!(cfg.intermediate_size, 8192);
    assert_eq!(cfg.vocab_size, 32064);
    assert_eq!(cfg.original_max_position_embeddings, 4096);
    let Some(RopeScaling::LongRope {
        short_factor,
        long_factor,
    }) = &cfg.rope_scaling
    else {
        panic!("expected LongRoPE scaling, got {:?}", cfg.rope_scaling)
    };
    assert_eq!(short_factor.len(), 48);
    assert_eq!(long_factor.len(), 48);
    assert_eq!(short_factor[0], 1.05);
    assert_eq!(long_factor[47], 64.81001281738281);
    // sqrt(1 + ln(131072/4096) / ln(4096))
    assert!((cfg.rope_attention_scaling() - 1.1902380714238083).abs() < 1e-12);
}

#[test]
fn real_parameter_count_without_allocating() {
    let cfg = TransformerConfig::from_file(fixtures().join("real/config.json")).unwrap();
    // Figures from the checkpoint: 3,762,072,592 learned parameters plus the 192x192x3072
    // sin-cos position buffer stored beside them (15.5 GB of f32 in model.safetensors).
    assert_eq!(cfg.num_parameters(), 3_762_072_592);
    assert_eq!(cfg.num_stored_values(), 3_875_318_800);
}

#[test]
fn diffusers_transformer_config_matches_the_official_one() {
    let official = TransformerConfig::from_file(fixtures().join("real/config.json")).unwrap();
    let diffusers =
        TransformerConfig::from_file(fixtures().join("real/transformer_config_diffusers.json"))
            .unwrap();
    assert_eq!(official, diffusers);
}

#[test]
fn tiny_config_parses() {
    let cfg = TransformerConfig::from_file(fixtures().join("A/model/config.json")).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads
        ),
        (48, 2, 3)
    );
    assert!(matches!(
        cfg.rope_scaling,
        Some(RopeScaling::LongRope { .. })
    ));
}

#[test]
fn newer_longrope_spelling_is_accepted() {
    let text = std::fs::read_to_string(fixtures().join("A/model/config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["rope_scaling"]["type"] = "longrope".into();
    let a = TransformerConfig::from_json_value(Path::new("x"), &value).unwrap();
    value["rope_scaling"]
        .as_object_mut()
        .unwrap()
        .remove("type");
    value["rope_scaling"]["rope_type"] = "longrope".into();
    let b = TransformerConfig::from_json_value(Path::new("x"), &value).unwrap();
    assert_eq!(a, b);
    assert!(a.rope_scaling.is_some());
}

#[test]
fn real_sdxl_vae_config() {
    let cfg = VaeConfig::from_file(fixtures().join("real/vae_config.json")).unwrap();
    assert_eq!(cfg.block_out_channels, [128, 256, 512, 512]);
    assert_eq!(cfg.layers_per_block, 2);
    assert_eq!(cfg.norm_num_groups, 32);
    assert_eq!(cfg.scaling_factor, 0.13025);
    assert_eq!(cfg.shift_factor, None);
    assert_eq!(cfg.downsample_factor(), 8);
    assert!(cfg.mid_block_add_attention && cfg.use_quant_conv && cfg.use_post_quant_conv);
}

#[test]
fn tiny_vae_config() {
    let cfg = VaeConfig::from_file(fixtures().join("A/model/vae/config.json")).unwrap();
    assert_eq!(cfg.block_out_channels, [16, 32, 32, 32]);
    assert_eq!(cfg.norm_num_groups, 8);
}

fn config_error(json: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json).unwrap();
    match TransformerConfig::from_file(&path) {
        Err(e @ Error::Config { .. }) => e.to_string(),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn malformed_configs_are_typed_errors_naming_the_field() {
    assert!(config_error("{not json").contains("config.json"));
    assert!(config_error("[]").contains("not a JSON object"));
    let msg = config_error(r#"{"hidden_size": 48, "num_attention_heads": 3}"#);
    assert!(
        msg.contains("intermediate_size") || msg.contains("max_position_embeddings"),
        "{msg}"
    );
    let msg = config_error(r#"{"hidden_size": 50, "num_attention_heads": 3}"#);
    assert!(msg.contains("num_attention_heads"), "{msg}");
    let msg = config_error(
        r#"{"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 8, "num_hidden_layers": 1,
            "rms_norm_eps": 1e-5, "vocab_size": 10, "max_position_embeddings": 64,
            "rope_scaling": {"type": "yarn", "factor": 2.0}}"#,
    );
    assert!(msg.contains("yarn"), "{msg}");
    let msg = config_error(
        r#"{"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 8, "num_hidden_layers": 1,
            "rms_norm_eps": 1e-5, "vocab_size": 10, "max_position_embeddings": 64,
            "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}"#,
    );
    assert!(msg.contains("short_factor"), "{msg}");
}

#[test]
fn missing_config_file_is_an_io_error_naming_the_path() {
    let err = VaeConfig::from_file("/nonexistent/vae/config.json").unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/vae/config.json"));
}

#[test]
fn vae_config_rejects_unsupported_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"block_out_channels": [16, 32], "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownEncoderBlock2D"]}"#).unwrap();
    let err = VaeConfig::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("CrossAttnDownBlock2D"), "{err}");
}

#[test]
fn every_committed_config_parses() {
    let root = fixtures().join("../..");
    for f in [
        "tests/fixtures/A/model/config.json",
        "tests/fixtures/A/model_diffusers/transformer/config.json",
        "tests/fixtures/B/model/config.json",
        "tests/fixtures/real/config.json",
        "tests/fixtures/real/transformer_config_diffusers.json",
        "benches/configs/medium/config.json",
    ] {
        let cfg = TransformerConfig::from_file(root.join(f)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.num_key_value_heads, cfg.num_attention_heads, "{f}");
    }
    for f in [
        "tests/fixtures/A/model/vae/config.json",
        "tests/fixtures/B/model/vae/config.json",
        "tests/fixtures/real/vae_config.json",
        "benches/configs/medium/vae/config.json",
    ] {
        VaeConfig::from_file(root.join(f)).unwrap_or_else(|e| panic!("{e}"));
    }
    // the tiny diffusers conversion is the tiny official config under diffusers' key names
    assert_eq!(
        TransformerConfig::from_file(root.join("tests/fixtures/A/model/config.json")).unwrap(),
        TransformerConfig::from_file(
            root.join("tests/fixtures/A/model_diffusers/transformer/config.json")
        )
        .unwrap()
    );
}

fn tiny_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("A/model/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tiny_error(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut value = tiny_json();
    edit(value.as_object_mut().unwrap());
    match TransformerConfig::from_json_value(Path::new("cfg.json"), &value) {
        Err(e @ Error::Config { .. }) => e.to_string(),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn values_of_the_wrong_type_are_reported_with_their_key() {
    let msg = tiny_error(|o| {
        o.insert("hidden_size".into(), "48".into());
    });
    assert!(
        msg.contains("cfg.json") && msg.contains("`hidden_size`"),
        "{msg}"
    );
    let msg = tiny_error(|o| {
        o.insert("vocab_size".into(), (-3).into());
    });
    assert!(msg.contains("`vocab_size`"), "{msg}");
    let msg = tiny_error(|o| {
        o.insert("rope_scaling".into(), serde_json::json!({"type": "su"}));
    });
    assert!(
        msg.contains("rope_scaling") && msg.contains("short_factor"),
        "{msg}"
    );
}

#[test]
fn each_rule_names_its_field() {
    for (key, value, field) in [
        (
            "num_key_value_heads",
            serde_json::json!(1),
            "num_key_value_heads",
        ),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
        (
            "intermediate_size",
            serde_json::json!(0),
            "intermediate_size",
        ),
        (
            "num_attention_heads",
            serde_json::json!(16),
            "num_attention_heads",
        ),
        ("patch_size", serde_json::json!(0), "patch_size"),
    ] {
        let msg = tiny_error(|o| {
            o.insert(key.into(), value);
        });
        assert!(msg.contains(&format!("field `{field}`")), "{key}: {msg}");
    }
    // both spellings of one field at once are refused by name
    let msg = tiny_error(|o| {
        o.insert("num_layers".into(), 2.into());
    });
    assert!(msg.contains("num_hidden_layers"), "{msg}");
}

#[test]
fn null_means_absent_and_absent_means_the_default() {
    let mut value = tiny_json();
    let obj = value.as_object_mut().unwrap();
    obj.insert(
        "original_max_position_embeddings".into(),
        serde_json::Value::Null,
    );
    obj.remove("num_key_value_heads");
    obj.remove("rope_theta");
    obj.insert("rope_scaling".into(), serde_json::Value::Null);
    let cfg = TransformerConfig::from_json_value(Path::new("x"), &value).unwrap();
    assert_eq!(
        cfg.original_max_position_embeddings,
        cfg.max_position_embeddings
    );
    assert_eq!(cfg.num_key_value_heads, cfg.num_attention_heads);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rope_scaling, None);
    assert_eq!(cfg.rope_attention_scaling(), 1.0);
    let d = TransformerConfig::default();
    assert_eq!(
        (
            cfg.patch_size,
            cfg.in_channels,
            cfg.pos_embed_max_size,
            cfg.time_step_dim
        ),
        (
            d.patch_size,
            d.in_channels,
            d.pos_embed_max_size,
            d.time_step_dim
        )
    );
}

/// Panics unless `result` is an `InvalidArgument` error naming `arg`.
fn assert_invalid_argument(result: omnigen_core::Result<()>, arg: &str) {
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if *name == arg),
        "{err}"
    );
}

#[test]
fn validate_checks_configs_built_in_code() {
    // the default leaves the checkpoint's sizes unset
    assert_invalid_argument(TransformerConfig::default().validate(), "hidden_size");
    let mut cfg = TransformerConfig::from_file(fixtures().join("A/model/config.json")).unwrap();
    cfg.validate().unwrap();
    cfg.num_key_value_heads = 1;
    assert_invalid_argument(cfg.validate(), "num_key_value_heads");

    assert_invalid_argument(VaeConfig::default().validate(), "block_out_channels");
    let mut vae = VaeConfig::from_file(fixtures().join("A/model/vae/config.json")).unwrap();
    vae.validate().unwrap();
    vae.norm_num_groups = 5;
    assert_invalid_argument(vae.validate(), "block_out_channels");
}

#[test]
fn a_minimal_vae_config_takes_the_diffusers_defaults() {
    let value = serde_json::json!({"block_out_channels": [16, 32], "norm_num_groups": 8, "shift_factor": null});
    let cfg = VaeConfig::from_json_value(Path::new("vae.json"), &value).unwrap();
    assert_eq!(
        cfg,
        VaeConfig {
            block_out_channels: vec![16, 32],
            norm_num_groups: 8,
            ..VaeConfig::default()
        }
    );
    assert_eq!(
        (cfg.in_channels, cfg.latent_channels, cfg.layers_per_block),
        (3, 4, 1)
    );
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert!(cfg.mid_block_add_attention && cfg.use_quant_conv && cfg.use_post_quant_conv);

    let msg = VaeConfig::from_json_value(
        Path::new("vae.json"),
        &serde_json::json!({"norm_num_groups": 8}),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("vae.json") && msg.contains("`block_out_channels`"),
        "{msg}"
    );
    let msg = VaeConfig::from_json_value(
        Path::new("vae.json"),
        &serde_json::json!({"block_out_channels": [16], "norm_num_groups": 8, "scaling_factor": "big"}),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("`scaling_factor`"), "{msg}");
}
