//! The traceability metadata written into output PNGs: what produced an image, and with which
//! parameters, so it can be traced back to its model and reproduced.

use omnigen_models::KernelBackend;

use crate::output::PngMetadata;
use crate::pipeline::OmniGenPipeline;
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
