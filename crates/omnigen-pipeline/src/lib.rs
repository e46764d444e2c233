//! # omnigen-pipeline
//!
//! Where users meet OmniGen: multimodal prompts ([`Prompt`]), the processor that turns them into
//! model inputs exactly as the official one does ([`OmniGenProcessor`]), the generation request
//! with the official parameters and defaults ([`GenerationRequest`]) and the sampling loop
//! ([`OmniGenPipeline`]): prompt → processor → VAE encode → transformer ⇄ scheduler → VAE
//! decode → image.
#![deny(missing_docs)]

pub mod collator;
pub mod fingerprint;
pub mod guidance;
pub mod hub;
pub mod image_preprocess;
pub mod io;
pub mod memory;
pub mod noise;
pub mod output;
pub mod pipeline;
pub mod processor;
pub mod prompt;
pub mod provenance;
pub mod request;

pub use collator::{collate, ModelInput, RowMask, TokenizedRow, PAD_TOKEN_ID};
pub use guidance::Guidance;
pub use image_preprocess::{
    crop_arr, pillow_resize, preprocess_image, PreprocessedImage, ResampleFilter,
};
pub use noise::NoiseSource;
pub use output::{
    check_output, encode_png, read_png_text, save_image, save_png, ImageFormat, PngMetadata,
};
pub use pipeline::sampling::DEFAULT_SEED;
pub use pipeline::{
    tensor_to_rgb8, CancellationToken, Generation, GenerationStats, Hooks, OmniGenPipeline,
    PipelineBuilder, Progress,
};
pub use processor::{
    add_prefix_instruction, Branch, GuidanceInputs, OmniGenProcessor, ProcessedBatch,
    ProcessorOptions, DEFAULT_NEGATIVE_PROMPT,
};
pub use prompt::{
    check_placeholders, image_placeholder, parse_segments, ConditionImage, Prompt, PromptError,
    PromptSegment,
};
pub use provenance::{GenerationParameters, OutputMetadata};
pub use request::{
    parse_sigmas, CfgRange, GenerationOptions, GenerationRequest, InitialLatents, InputLatents,
    KvCache, SchedulerKind, MAX_IMAGES, MAX_INFERENCE_STEPS,
};
