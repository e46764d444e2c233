//! OmniGen pipeline: multimodal prompts, the processor (tokenisation, image preprocessing,
//! guidance batches), guidance and the sampling loop.
#![deny(missing_docs)]

pub mod collator;
pub mod image_preprocess;
pub mod processor;
pub mod prompt;

pub use collator::{collate, ModelInput, TokenizedRow, PAD_TOKEN_ID};
pub use image_preprocess::{
    crop_arr, pillow_resize, preprocess_image, PreprocessedImage, ResampleFilter,
};
pub use processor::{
    add_prefix_instruction, Branch, GuidanceInputs, OmniGenProcessor, ProcessedBatch,
    ProcessorOptions, DEFAULT_NEGATIVE_PROMPT,
};
pub use prompt::{
    check_placeholders, image_placeholder, parse_segments, ConditionImage, Prompt, PromptError,
    PromptSegment,
};
