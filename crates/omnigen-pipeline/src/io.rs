//! Files around a generation: latents in and out (safetensors), dtype names, and the
//! traceability metadata written into output PNGs.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use omnigen_core::{Error, Result, WeightSource};

use crate::output::{write_atomically, PngMetadata};
use crate::pipeline::OmniGenPipeline;
use crate::request::{GenerationRequest, InitialLatents};

/// The tensor name used for latents files (`--latents`, `--save-latents`).
pub const LATENTS_KEY: &str = "latents";

/// Reads tensor `latents` `[N, 4, h, w]` (f32, f16 or bf16) from a safetensors file.
pub fn read_latents(path: &Path) -> Result<InitialLatents> {
    let src = WeightSource::open(path)?;
    let shape = src.shape(LATENTS_KEY).ok_or_else(|| Error::MissingTensor {
        name: LATENTS_KEY.into(),
        path: path.into(),
    })?;
    let shape: [usize; 4] = shape.as_slice().try_into().map_err(|_| {
        Error::invalid_argument(
            "latents",
            format!(
                "{} has shape {shape:?}, expected [N, 4, H/8, W/8]",
                path.display()
            ),
        )
    })?;
    let values = src.read_f32(LATENTS_KEY, &shape)?;
    Ok(InitialLatents { values, shape })
}

/// Writes `latents` as f32 tensor `latents` to a safetensors file, atomically.
pub fn write_latents<B: Backend>(path: &Path, latents: Tensor<B, 4>) -> Result<()> {
    let shape = latents.dims().to_vec();
    let values: Vec<f32> = latents
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| Error::invalid_argument("latents", format!("{e:?}")))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .map_err(|e| Error::invalid_argument("latents", e.to_string()))?;
    let data = safetensors::serialize(HashMap::from([(LATENTS_KEY.to_string(), view)]), None)
        .map_err(|e| Error::invalid_argument("latents", e.to_string()))?;
    write_atomically(path, |f| f.write_all(&data))
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::invalid_argument(
            "dtype",
            format!("`{other}` is not one of f32, f16, bf16"),
        )),
    }
}

/// The parameters of a generation as PNG text chunks, with an "AI-generated" marker, so an
/// output can be traced back to its model and reproduced. `size` is the generated image's
/// `(width, height)` (it differs from the request's with `use_input_image_size_as_output`).
pub fn generation_metadata<B: omnigen_models::KernelBackend>(
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
