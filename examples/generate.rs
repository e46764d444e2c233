//! One command for every OmniGen task: text-to-image, editing, subject-driven generation from
//! several images, visual conditions.
//!
//! ```text
//! cargo run --release --example generate -- --model tests/fixtures/A/model \
//!     --prompt "a red cat sitting on a blue mat" --height 64 --width 64 --steps 4 \
//!     --seed 0 --output cat.png
//! cargo run --release --example generate -- --model DIR \
//!     --prompt "<img><|image_1|></img> make the cat green" --image cat.png \
//!     --use-input-image-size-as-output --output green.png
//! ```
//! Every error ends the program with a one-line message and exit status 1; the PNG (and the
//! latents file) are written atomically, so a failure never leaves a partial file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use omnigen::prelude::*;

#[derive(Parser, Debug)]
#[command(about = "Generate an image with OmniGen", version)]
struct Args {
    /// Model directory (official or diffusers layout) or hub id, e.g. Shitao/OmniGen-v1.
    #[arg(long)]
    model: PathBuf,
    /// Prompt; reference input images as <img><|image_1|></img>, <img><|image_2|></img>, ...
    #[arg(long)]
    prompt: String,
    /// Input image, in placeholder order (repeat for several).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Output height in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// Output width in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Text guidance scale.
    #[arg(long, default_value_t = 3.0)]
    guidance_scale: f32,
    /// Image guidance scale.
    #[arg(long, default_value_t = 1.6)]
    img_guidance_scale: f32,
    /// Seed of every random draw.
    #[arg(long, conflicts_with = "latents")]
    seed: Option<u64>,
    /// safetensors file with tensor `latents` [1, 4, H/8, W/8] (f32) used as the initial noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Negative prompt (default: the official one).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// All guidance branches in one left-padded batch instead of one forward per branch.
    #[arg(long)]
    joint_cfg: bool,
    /// Key-value cache: official, exact or off.
    #[arg(long, default_value = "official")]
    kv_cache: String,
    /// Input-image latents: `sample` (official) or `mean` of the VAE posterior.
    #[arg(long, default_value = "sample")]
    input_latents: String,
    /// Output size taken from the (single) input image.
    #[arg(long)]
    use_input_image_size_as_output: bool,
    /// Longest side input images are downscaled to.
    #[arg(long, default_value_t = 1024)]
    max_input_image_size: usize,
    /// Transformer weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// PEFT LoRA adapter folder merged into the transformer at load time (repeatable).
    #[arg(long = "lora")]
    loras: Vec<PathBuf>,
    /// Scale of the LoRA adapters (multiplies alpha / r).
    #[arg(long, default_value_t = 1.0)]
    lora_scale: f32,
    /// Output PNG.
    #[arg(long)]
    output: PathBuf,
    /// Also write the final latents (before VAE decoding) as tensor `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Leave the generation parameters out of the PNG.
    #[arg(long)]
    no_metadata: bool,
}

fn main() -> ExitCode {
    // Faster tensor allocation on the CPU backends (process-wide glibc malloc settings).
    omnigen::models::tune_host_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let images = args.images.iter().map(ConditionImage::from_path).collect();
    let prompt = Prompt::from_text(args.prompt.clone(), images)?;
    let mut request = GenerationRequest::new(prompt)
        .size(args.height, args.width)
        .steps(args.steps)
        .guidance_scale(args.guidance_scale)
        .img_guidance_scale(args.img_guidance_scale)
        .separate_cfg_infer(!args.joint_cfg)
        .kv_cache(args.kv_cache.parse()?)
        .input_latents(args.input_latents.parse()?)
        .use_input_image_size_as_output(args.use_input_image_size_as_output)
        .max_input_image_size(args.max_input_image_size);
    if let Some(seed) = args.seed {
        request = request.seed(seed);
    }
    if let Some(text) = &args.negative_prompt {
        request = request.negative_prompt(text.clone());
    }
    if let Some(path) = &args.latents {
        request = request.latents(omnigen::io::read_latents(path)?);
    }
    request.validate()?;

    // Fail on unreadable inputs and an unwritable destination before the (slow) model load.
    for image in request.prompts.iter().flat_map(|p| p.images()) {
        image.load_rgb8()?;
    }
    for out in std::iter::once(&args.output).chain(&args.save_latents) {
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            anyhow::bail!(
                "cannot write {}: {} is not a directory",
                out.display(),
                dir.display()
            );
        }
    }
    let dtype = omnigen::io::parse_dtype(&args.dtype)?;
    if !args.lora_scale.is_finite() {
        anyhow::bail!(
            "invalid argument `lora_scale`: {} is not a finite number",
            args.lora_scale
        );
    }
    let mut builder = OmniGenPipeline::<DefaultBackend>::builder(&args.model)
        .dtype(dtype)
        .download_progress(true);
    for lora in &args.loras {
        builder = builder.lora(lora, args.lora_scale);
    }
    let load_start = std::time::Instant::now();
    let pipeline = builder.build()?;
    eprintln!(
        "loaded {} in {:.2?}",
        args.model.display(),
        load_start.elapsed()
    );

    let bar = ProgressBar::new(request.num_inference_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed_precise} eta {eta}")
            .context("progress bar template")?,
    );
    let mut on_progress = |p: Progress| bar.set_position(p.step as u64);
    let hooks = Hooks {
        on_progress: Some(&mut on_progress),
        cancel: None,
    };
    let generation =
        pipeline.generate_with(&request, &mut FlowMatchEulerScheduler::new(), hooks)?;
    bar.finish_and_clear();

    if let Some(path) = &args.save_latents {
        omnigen::io::write_latents(path, generation.latents.clone())?;
    }
    let image = generation
        .images
        .first()
        .context("the pipeline returned no image")?;
    let metadata = if args.no_metadata {
        Vec::new()
    } else {
        omnigen::io::generation_metadata(&request, &pipeline, image.dimensions())
    };
    save_png(&args.output, image, &metadata)?;
    let s = &generation.stats;
    eprintln!(
        "wrote {} ({}x{}); tokens per branch {:?}; process {:.2?}, encode {:.2?}, denoise {:.2?}, decode {:.2?}; peak memory {} MiB",
        args.output.display(),
        image.width(),
        image.height(),
        s.tokens_per_branch,
        s.process,
        s.encode,
        s.denoise,
        s.decode,
        s.peak_memory_bytes.map_or("?".to_string(), |b| (b >> 20).to_string())
    );
    Ok(())
}
