//! The traceability metadata written into output images: what produced an image, and with
//! which parameters, so it can be traced back to its model and reproduced.

use std::path::Path;

use omnigen_models::KernelBackend;

use crate::output::PngMetadata;
use crate::pipeline::OmniGenPipeline;
use crate::processor::DEFAULT_NEGATIVE_PROMPT;
use crate::provenance::{GenerationParameters, OutputMetadata, CREATOR_TOOL};
use crate::request::GenerationRequest;

/// The parameters of a generation as PNG text chunks, with an "AI-generated" marker, so an
/// output can be traced back to its model and reproduced. `size` is the generated image's
/// `(width, height)` (it differs from the request's with `use_input_image_size_as_output`).
pub fn generation_metadata<B: KernelBackend>(
    request: &GenerationRequest,
    pipeline: &OmniGenPipeline<B>,
    size: (u32, u32),
) -> PngMetadata {
    let prompts: Vec<&str> = request.prompts.iter().map(|p| p.as_text()).collect();
    let mut m = vec![
        (
            "Software".to_string(),
            format!("omnigen-rs {}", env!("CARGO_PKG_VERSION")),
        ),
        ("AI-generated".to_string(), "true".to_string()),
        (
            "Description".to_string(),
            "AI-generated image (OmniGen)".to_string(),
        ),
        ("prompt".to_string(), prompts.join("\n")),
        (
            "negative_prompt".to_string(),
            request
                .negative_prompt
                .clone()
                .unwrap_or_else(|| "(official default)".into()),
        ),
        (
            "seed".to_string(),
            request.seed.map_or("none".to_string(), |s| s.to_string()),
        ),
        ("steps".to_string(), request.num_inference_steps.to_string()),
        (
            "guidance_scale".to_string(),
            request.guidance_scale.to_string(),
        ),
        (
            "img_guidance_scale".to_string(),
            request.img_guidance_scale.to_string(),
        ),
        ("size".to_string(), format!("{}x{}", size.0, size.1)),
        (
            "dtype".to_string(),
            format!("{:?}", pipeline.transformer().dtype()).to_lowercase(),
        ),
        (
            "kv_cache".to_string(),
            format!("{:?}", request.kv_cache).to_lowercase(),
        ),
        (
            "separate_cfg_infer".to_string(),
            request.separate_cfg_infer.to_string(),
        ),
        (
            "input_latents".to_string(),
            format!("{:?}", request.input_latents).to_lowercase(),
        ),
        (
            "model".to_string(),
            pipeline.model_dir().display().to_string(),
        ),
    ];
    for (path, scale) in pipeline.loras() {
        m.push((
            "lora".to_string(),
            format!("{} (scale {scale})", path.display()),
        ));
    }
    if request.latents.is_some() {
        m.push((
            "initial_latents".to_string(),
            "supplied by the caller".to_string(),
        ));
    }
    if let Some(fp) = pipeline.weights_fingerprint() {
        m.push(("weights_sha256".to_string(), fp.to_string()));
    }
    m
}

/// Everything [`save_image`](crate::output::save_image) writes for image `image_index` of a
/// generation: the text chunks of [`generation_metadata`], the IPTC "trained algorithmic
/// media" marker and the A1111 `parameters` of that image's prompt. `size` is the image's
/// `(width, height)`.
///
/// `Model hash` is the first 10 hex digits of the pipeline's
/// [`weights_fingerprint`](OmniGenPipeline::weights_fingerprint) — a sampled SHA-256 (see
/// [`crate::fingerprint`]), not the full-file SHA-256 that A1111 calls `AutoV2`, which would
/// take a minute to compute for OmniGen-v1's 15 GB.
pub fn output_metadata<B: KernelBackend>(
    request: &GenerationRequest,
    pipeline: &OmniGenPipeline<B>,
    image_index: usize,
    size: (u32, u32),
) -> OutputMetadata {
    let per_prompt = request.num_images_per_prompt.max(1);
    let prompt = request
        .prompts
        .get(image_index / per_prompt)
        .or(request.prompts.first());
    let has_images = prompt.is_some_and(|p| !p.images().is_empty());
    let model_id = pipeline.model_id();
    let model = Path::new(model_id)
        .file_name()
        .map_or(model_id.to_string(), |n| n.to_string_lossy().into_owned());
    let mut extra = Vec::new();
    if request.latents.is_some() {
        // The seed (if any) then drew only the input images' noise.
        extra.push(("Initial latents".to_string(), "supplied".to_string()));
    }
    for (path, scale) in pipeline.loras() {
        let name = path.file_name().unwrap_or(path.as_os_str());
        extra.push((
            "LoRA".to_string(),
            format!("{} (scale {scale})", name.to_string_lossy()),
        ));
    }
    let generation = GenerationParameters {
        prompt: prompt.map_or(String::new(), |p| p.as_text().to_string()),
        negative_prompt: Some(
            request
                .negative_prompt
                .clone()
                .unwrap_or_else(|| DEFAULT_NEGATIVE_PROMPT.to_string()),
        ),
        steps: request.num_inference_steps,
        sampler: "Euler".to_string(),
        guidance_scale: request.guidance_scale,
        img_guidance_scale: has_images.then_some(request.img_guidance_scale),
        seed: request.seed,
        size,
        model_hash: pipeline
            .weights_fingerprint()
            .map(|fp| fp.chars().take(10).collect()),
        model: Some(model),
        version: Some(CREATOR_TOOL.to_string()),
        extra,
    };
    OutputMetadata {
        text: generation_metadata(request, pipeline, size),
        generation: Some(generation),
        ..OutputMetadata::default()
    }
}
