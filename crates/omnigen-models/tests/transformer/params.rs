//! Parameter counts: the real OmniGen-v1 config (no weights allocated) and the module's own
//! count against the config formula.

use crate::support::*;
use burn::module::Module;
use burn::tensor::DType;
use omnigen_core::{RopeScaling, TransformerConfig};
use omnigen_models::default_device;
use omnigen_models::transformer::OmniGenTransformer;
use omnigen_models::weights::RandomWeights;

fn real_config() -> TransformerConfig {
    TransformerConfig::from_file(omnigen_test_support::fixture("real/config.json"))
        .expect("real config parses")
}

#[test]
fn real_config_parameter_count() {
    let c = real_config();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.head_dim()
        ),
        (3072, 32, 32, 96)
    );
    assert_eq!(c.num_parameters(), 3_762_072_592);
    assert_eq!(c.pos_embed_len(), 113_246_208);
    assert_eq!(c.num_stored_values(), 3_875_318_800);
    match &c.rope_scaling {
        Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
        }) => {
            assert_eq!((short_factor.len(), long_factor.len()), (48, 48));
        }
        other => panic!("expected LongRoPE, got {other:?}"),
    }
    assert!((c.rope_attention_scaling() - 1.190_238_071_423_808_3).abs() < 1e-12);
}

#[test]
fn module_count_equals_config_formula() {
    // Tiny model A from its checkpoint.
    let dir = fixtures_a().join("model");
    let model = load_model(&dir);
    let config = TransformerConfig::from_file(dir.join("config.json")).expect("config");
    assert_eq!(model.num_params() as u64, config.num_parameters());

    // A differently shaped random model (odd vocab, wider MLP, 4 heads).
    let mut c = config.clone();
    c.hidden_size = 32;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 4;
    c.intermediate_size = 72;
    c.num_hidden_layers = 3;
    c.vocab_size = 101;
    c.pos_embed_max_size = 16;
    c.rope_scaling = None;
    let m = OmniGenTransformer::<B>::load_reader(
        &RandomWeights { seed: 1 },
        &c,
        &default_device(),
        DType::F32,
    )
    .expect("random model");
    assert_eq!(m.num_params() as u64, c.num_parameters());
}
