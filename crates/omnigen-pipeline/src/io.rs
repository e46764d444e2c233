//! The traceability metadata written into output images: what produced an image, and with
//! which parameters, so it can be traced back to its model and reproduced.

use std::path::Path;

use omnigen_core::{Error, Result};
use omnigen_models::KernelBackend;

use crate::output::PngMetadata;
use crate::pipeline::{Generation, OmniGenPipeline};
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
        // How the weights are stored (`bf16`, `int8`, ...): what `--dtype` / the folder chose,
        // not the compute dtype (f32 on the CPU backends whatever the weights).
        (
            "dtype".to_string(),
            pipeline.transformer().weight_format().name(),
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
        ("scheduler".to_string(), request.scheduler.to_string()),
        ("time_shift".to_string(), request.time_shift.to_string()),
        (
            "cfg_range".to_string(),
            format!("{},{}", request.cfg_range.start, request.cfg_range.end),
        ),
        (
            "model".to_string(),
            pipeline.model_dir().display().to_string(),
        ),
    ];
    if let Some(sigmas) = &request.sigmas {
        let list: Vec<String> = sigmas.iter().map(f32::to_string).collect();
        m.push(("sigmas".to_string(), list.join(",")));
    }
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

/// Everything [`save_image`](crate::output::save_image) writes for image `image_index` of
/// `generation` (made from `request` by `pipeline`): the text chunks of
/// [`generation_metadata`], the IPTC "trained algorithmic media" marker and the A1111
/// `parameters` of that image's prompt, with the seed the run actually used
/// ([`GenerationStats::seed`](crate::pipeline::GenerationStats::seed), drawn when the request
/// had none). Fails with [`Error::InvalidArgument`] when `generation` has no image
/// `image_index`.
///
/// `Model hash` is the first 10 hex digits of the pipeline's
/// [`weights_fingerprint`](OmniGenPipeline::weights_fingerprint) — a sampled SHA-256 (see
/// [`crate::fingerprint`]), not the full-file SHA-256 that A1111 calls `AutoV2`, which would
/// take a minute to compute for OmniGen-v1's 15 GB.
pub fn output_metadata<B: KernelBackend>(
    request: &GenerationRequest,
    pipeline: &OmniGenPipeline<B>,
    generation: &Generation<B>,
    image_index: usize,
) -> Result<OutputMetadata> {
    let image = generation.images.get(image_index).ok_or_else(|| {
        Error::invalid_argument(
            "image_index",
            format!(
                "is {image_index}, but the generation has {} image(s)",
                generation.images.len()
            ),
        )
    })?;
    let size = image.dimensions();
    let seed = generation.stats.seed;
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
    let parameters = GenerationParameters {
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
        seed: Some(seed),
        size,
        model_hash: pipeline
            .weights_fingerprint()
            .map(|fp| fp.chars().take(10).collect()),
        model: Some(model),
        version: Some(CREATOR_TOOL.to_string()),
        extra,
    };
    let mut text = generation_metadata(request, pipeline, size);
    for (key, value) in &mut text {
        if key == "seed" {
            *value = seed.to_string();
        }
    }
    Ok(OutputMetadata {
        text,
        generation: Some(parameters),
        ..OutputMetadata::default()
    })
}
