//! The configuration alone shapes the VAE: the real SDXL `vae/config.json` builds a module with
//! the SDXL VAE's parameter count, and the tiny checkpoint's module holds exactly its tensors.

use crate::support::{fixture, random_vae, tiny_vae};
use burn::module::Module;
use omnigen_core::{VaeConfig, WeightSource};

/// Counted from the architecture (conv_in, 2 resnets per encoder level and 3 per decoder level
/// with their GroupNorms and 1×1 shortcuts where channels change, 3 downsample/upsample convs
/// each, the two mid blocks with q/k/v/out projections and biases, norm/conv out, quant convs):
/// encoder 34,163,592 + decoder 49,490,179 + quant_conv 72 + post_quant_conv 20.
const SDXL_VAE_PARAMS: usize = 83_653_863;

#[test]
fn sdxl_config_builds_83_7m_parameters() {
    let config = VaeConfig::from_file(fixture("real/vae_config.json")).expect("config");
    assert_eq!(config.scaling_factor, 0.13025);
    assert_eq!(config.shift_factor, None);
    let vae = random_vae(&config, 0).expect("build");
    assert_eq!(vae.num_params(), SDXL_VAE_PARAMS);
    assert_eq!(vae.downsample_factor(), 8);
}

#[test]
fn tiny_module_holds_every_checkpoint_tensor() {
    let weights = WeightSource::open_in_dir(fixture("A/model/vae"), "diffusion_pytorch_model")
        .expect("weights");
    let in_file: usize = weights
        .keys()
        .iter()
        .map(|k| weights.shape(k).expect("shape").iter().product::<usize>())
        .sum();
    assert_eq!(tiny_vae().num_params(), in_file);
}
