//! PEFT LoRA adapters merged into the transformer's weights at load time.
//!
//! The official pipeline's `merge_lora(path)` is `PeftModel.from_pretrained(model, path)
//! .merge_and_unload()`: every targeted `Linear` gets `W <- W + scaling * B @ A` with
//! `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). Here the same merge
//! happens while the weights are read: [`LoraMergedReader`] wraps any [`WeightReader`](crate::weights::WeightReader) and
//! returns merged tensors for the targeted keys, so the model is built through its ordinary
//! loading path and no adapter code runs in the forward.
//!
//! An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's
//! `save_pretrained`). Tensor keys are `base_model.model.<module>.lora_A.weight` `[r, in]` and
//! `...lora_B.weight` `[out, r]`, where `<module>` is an official module path such as
//! `llm.layers.3.self_attn.qkv_proj` (see [`transformer::LINEAR_MODULES`](crate::transformer::LINEAR_MODULES) for the layers that can be merged).
//!
//! Two merge precisions are offered ([`LoraMergePrecision`]): the official one, which merges in
//! bf16 because the official pipeline holds the model in bf16 when it merges, and a plain f32
//! merge.

mod adapter;
mod config;
mod merge;
mod reader;

pub use adapter::LoraAdapter;
pub use config::{LoraConfig, TargetModules};
pub use merge::LoraMergePrecision;
pub use reader::LoraMergedReader;

/// The leaf modules of the model adapters are merged into, by module path (`{i}` = any layer
/// index): the transformer's is [`transformer::MODULES`](crate::transformer::MODULES).
#[derive(Debug, Clone, Copy)]
pub struct ModuleTable {
    /// The model's name in messages.
    pub model: &'static str,
    /// Every `Linear`: the modules an adapter can be merged into.
    pub linear: &'static [&'static str],
    /// The other leaf modules with parameters, which an adapter target may not name.
    pub other: &'static [&'static str],
}

/// File name of the adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter weights (the only weight format supported).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's pickle weight file, refused with a clear error.
const ADAPTER_WEIGHTS_BIN: &str = "adapter_model.bin";
/// PEFT's prefix on saved keys (`PeftModel` -> `LoraModel` -> the wrapped OmniGen module).
const PEFT_PREFIX: &str = "base_model.model.";
