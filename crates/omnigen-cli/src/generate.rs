//! `omnigen generate`: one command for every OmniGen task — text-to-image, editing,
//! subject-driven generation from several images, visual conditions.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use burn::tensor::DType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use omnigen::pipeline::PipelineBuilder;
use omnigen::prelude::*;

use crate::latents::{read_latents, write_latents};

/// Key-value cache semantics (`--kv-cache`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheArg {
    /// The official pipeline's cache: step 0 attends to the condition only, later steps reuse it.
    Official,
    /// A cache whose every step equals the uncached forward exactly.
    Exact,
    /// No cache: the whole sequence runs at every step.
    #[value(alias = "none")]
    Off,
}

impl From<KvCacheArg> for KvCache {
    fn from(arg: KvCacheArg) -> Self {
        match arg {
            KvCacheArg::Official => KvCache::Official,
            KvCacheArg::Exact => KvCache::Exact,
            KvCacheArg::Off => KvCache::Off,
        }
    }
}

/// Which latent of an input image's VAE posterior conditions the transformer (`--input-latents`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputLatentsArg {
    /// A posterior sample drawn from the seed (official).
    Sample,
    /// The posterior mean (deterministic).
    Mean,
}

impl From<InputLatentsArg> for InputLatents {
    fn from(arg: InputLatentsArg) -> Self {
        match arg {
            InputLatentsArg::Sample => InputLatents::Sample,
            InputLatentsArg::Mean => InputLatents::Mean,
        }
    }
}

/// Transformer weight dtype (`--dtype`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    /// bf16 on a GPU backend that has it, f32 on the CPU backends.
    Auto,
    /// 32-bit float.
    #[value(alias = "float32")]
    F32,
    /// IEEE half precision.
    #[value(alias = "float16")]
    F16,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
}

impl DtypeArg {
    /// The dtype asked for; `None` for `auto` (the pipeline picks it for its device).
    pub fn dtype(self) -> Option<DType> {
        match self {
            DtypeArg::Auto => None,
            DtypeArg::F32 => Some(DType::F32),
            DtypeArg::F16 => Some(DType::F16),
            DtypeArg::Bf16 => Some(DType::BF16),
        }
    }

    /// The dtype on the compiled-in backend's default device, `auto` resolved.
    pub fn resolved(self) -> DType {
        self.dtype().unwrap_or_else(|| {
            omnigen::models::ops::default_dtype::<DefaultBackend>(&Default::default())
        })
    }
}

/// The VAE's dtype (`--vae-dtype`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaeDtypeArg {
    /// 32-bit float, as the official pipeline.
    #[value(alias = "float32")]
    F32,
    /// bfloat16: half the VAE's memory (the SDXL VAE overflows in f16, which is not offered).
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<VaeDtypeArg> for DType {
    fn from(arg: VaeDtypeArg) -> Self {
        match arg {
            VaeDtypeArg::F32 => DType::F32,
            VaeDtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The dtype flags of `generate`, `batch` and `serve` (one declaration, flattened into each).
#[derive(Args, Debug, Clone, Copy)]
pub struct PrecisionArgs {
    /// Transformer weight dtype; `auto` is bf16 on a GPU backend that has it and f32 on the CPU
    /// backends. On the CPU backends bf16 / f16 mean weights stored in half precision and
    /// computed in f32 (activations, norms and the residual stream in f32), at the f32 speed
    /// with half the weight memory; device backends compute in that dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// The VAE's dtype.
    #[arg(long, value_enum, default_value_t = VaeDtypeArg::F32)]
    pub vae_dtype: VaeDtypeArg,
}

impl PrecisionArgs {
    /// `builder` with these dtypes (`auto` resolved for the compiled-in backend).
    pub fn apply(
        self,
        builder: PipelineBuilder<DefaultBackend>,
    ) -> PipelineBuilder<DefaultBackend> {
        builder
            .dtype(self.dtype.resolved())
            .vae_dtype(self.vae_dtype.into())
    }
}

/// What `--offload` keeps in host memory.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadArg {
    /// The transformer layers (streamed to the device ahead of use).
    Model,
    /// The kv cache (the official `offload_kv_cache`).
    Kv,
}

/// What `--offload` does on the compiled-in backend: nothing on the CPU backends (their tensors
/// already live in host memory), which is said rather than silent; `None` where it streams.
fn offload_note(offload: &[OffloadArg]) -> Option<String> {
    if offload.is_empty() || !<DefaultBackend as omnigen::models::KernelBackend>::HOST_MEMORY {
        return None;
    }
    let names: Vec<&str> = offload
        .iter()
        .map(|o| match o {
            OffloadArg::Model => "model",
            OffloadArg::Kv => "kv",
        })
        .collect();
    Some(format!(
        "note: --offload {} does nothing on the {} backend: its weights and kv cache already          live in host memory",
        names.join(","),
        omnigen::models::DEFAULT_BACKEND_NAME
    ))
}

/// Output file format (`--format`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    /// PNG (lossless).
    Png,
    /// JPEG (lossy; see --jpeg-quality).
    #[value(alias = "jpg")]
    Jpeg,
    /// WebP (lossless).
    Webp,
}

/// The flags of `omnigen generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (official or diffusers layout) or hub id, e.g. Shitao/OmniGen-v1.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt; reference input images as <img><|image_1|></img>, <img><|image_2|></img>, ...
    #[arg(
        long,
        required_unless_present = "prompt_file",
        conflicts_with = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-`: standard input) instead of --prompt, for prompts of any
    /// length; one trailing line break is dropped.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// Input image, in placeholder order (repeat for several).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Output height in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Output width in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Text guidance scale.
    #[arg(long, default_value_t = 3.0)]
    pub guidance_scale: f32,
    /// Image guidance scale.
    #[arg(long, default_value_t = 1.6)]
    pub img_guidance_scale: f32,
    /// Scheduler: euler (official), heun, dpmpp-2m, unipc or euler-shifted (docs/schedulers.md).
    #[arg(long, default_value = "euler", value_parser = parse_scheduler)]
    pub scheduler: SchedulerKind,
    /// Time shift of the scheduler (euler's time_shifting_factor, diffusers' shift / flow_shift).
    #[arg(long, default_value_t = 1.0)]
    pub time_shift: f32,
    /// Custom sigmas a,b,c,... (diffusers' sigma = 1 - t, strictly decreasing in [0, 1], one per
    /// step) for euler and euler-shifted; sets the step count.
    #[arg(long, conflicts_with = "steps", allow_hyphen_values = true)]
    pub sigmas: Option<String>,
    /// Part of the run with guidance, START,END as fractions of it; other steps run only the
    /// conditional branch.
    #[arg(long, default_value = "0,1")]
    pub cfg_range: String,
    /// Seed of every random draw.
    #[arg(long, conflicts_with = "latents")]
    pub seed: Option<u64>,
    /// safetensors file with tensor `latents` [1, 4, H/8, W/8] (f32) used as the initial noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Negative prompt (default: the official one).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// All guidance branches in one left-padded batch instead of one forward per branch.
    #[arg(long)]
    pub joint_cfg: bool,
    /// Key-value cache.
    #[arg(long, value_enum, default_value_t = KvCacheArg::Official)]
    pub kv_cache: KvCacheArg,
    /// Input-image latents: a sample (official) or the mean of the VAE posterior.
    #[arg(long, value_enum, default_value_t = InputLatentsArg::Sample)]
    pub input_latents: InputLatentsArg,
    /// Output size taken from the (single) input image.
    #[arg(long)]
    pub use_input_image_size_as_output: bool,
    /// Longest side input images are downscaled to.
    #[arg(long, default_value_t = 1024)]
    pub max_input_image_size: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Keep the transformer's layers (`model`) or the kv cache (`kv`) in host memory and stream
    /// each layer to the device ahead of use (comma-separated or repeated): for GPUs with less
    /// memory than the model; same images, slower steps. A no-op on the CPU backends, whose
    /// tensors live in host memory.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub offload: Vec<OffloadArg>,
    /// PEFT LoRA adapter folder merged into the transformer at load time (repeatable).
    #[arg(long = "lora")]
    pub loras: Vec<PathBuf>,
    /// Scale of the LoRA adapters (multiplies alpha / r).
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Refuse requests whose estimated memory beyond the loaded model exceeds this many MiB
    /// (default: the memory available to the process, container limits included).
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
    /// Output image.
    #[arg(long)]
    pub output: PathBuf,
    /// Output format [default: the --output extension's (.png, .jpg/.jpeg, .webp), PNG for any
    /// other]. An explicit format wins over the extension (with a note when they differ).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// JPEG quality, 1-100 [default: 90]; only for JPEG output.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
    /// Also write the final latents (before VAE decoding) as tensor `latents`.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Leave the generation parameters (prompt, seed, model, ...) out of the output; the XMP
    /// mark "made by a trained model" (IPTC DigitalSourceType) stays.
    #[arg(long)]
    pub no_metadata: bool,
}

impl GenerateArgs {
    /// The output's format — `--format`, else the extension's, else PNG — and, when that
    /// differs from what the extension names, a note saying so (nothing is silently renamed).
    pub fn output_format(&self) -> anyhow::Result<(ImageFormat, Option<String>)> {
        let by_extension = ImageFormat::from_extension(&self.output);
        let mut format = match self.format {
            Some(FormatArg::Png) => ImageFormat::Png,
            Some(FormatArg::Jpeg) => ImageFormat::Jpeg {
                quality: ImageFormat::DEFAULT_JPEG_QUALITY,
            },
            Some(FormatArg::Webp) => ImageFormat::WebP,
            None => by_extension.unwrap_or(ImageFormat::Png),
        };
        match (&mut format, self.jpeg_quality) {
            (ImageFormat::Jpeg { quality }, Some(q)) => *quality = q,
            (_, None) => {}
            (other, Some(_)) => {
                return Err(Error::invalid_argument(
                    "jpeg_quality",
                    format!("applies to JPEG output only; the output is {other}"),
                )
                .into())
            }
        }
        let same = |a: ImageFormat, b: ImageFormat| a.name() == b.name();
        let note = match by_extension {
            Some(ext) if same(ext, format) => None,
            Some(ext) => Some(format!(
                "note: writing {format} to {} as --format says, although its extension names {ext}",
                self.output.display()
            )),
            None if self.format.is_some() => None,
            None => Some(format!(
                "note: {} has no .png/.jpg/.jpeg/.webp extension: writing png (see --format)",
                self.output.display()
            )),
        };
        Ok((format, note))
    }
}

impl GenerateArgs {
    /// The request these flags describe, validated, with `--latents` read.
    pub fn request(&self) -> anyhow::Result<GenerationRequest> {
        let images = self.images.iter().map(ConditionImage::from_path).collect();
        let text = match (&self.prompt, &self.prompt_file) {
            (Some(text), _) => text.clone(),
            (None, Some(path)) => read_prompt_file(path).context("--prompt-file")?,
            (None, None) => anyhow::bail!("--prompt or --prompt-file is required"),
        };
        let prompt = Prompt::from_text(text, images)?;
        let mut request = GenerationRequest::new(prompt)
            .size(self.height, self.width)
            .steps(self.steps)
            .guidance_scale(self.guidance_scale)
            .img_guidance_scale(self.img_guidance_scale)
            .separate_cfg_infer(!self.joint_cfg)
            .kv_cache(self.kv_cache.into())
            .offload_kv_cache(self.offload.contains(&OffloadArg::Kv))
            .input_latents(self.input_latents.into())
            .use_input_image_size_as_output(self.use_input_image_size_as_output)
            .max_input_image_size(self.max_input_image_size)
            .scheduler(self.scheduler)
            .time_shift(self.time_shift)
            .cfg_range(self.cfg_range.parse()?);
        if let Some(sigmas) = &self.sigmas {
            request = request.sigmas(parse_sigmas(sigmas)?);
        }
        if let Some(seed) = self.seed {
            request = request.seed(seed);
        }
        if let Some(text) = &self.negative_prompt {
            request = request.negative_prompt(text.clone());
        }
        if let Some(path) = &self.latents {
            request = request.latents(read_latents(path)?);
        }
        request.validate()?;
        if !self.lora_scale.is_finite() {
            return Err(Error::invalid_argument(
                "lora_scale",
                format!("{} is not a finite number", self.lora_scale),
            )
            .into());
        }
        Ok(request)
    }
}

/// The longest prompt file read (16 MiB, millions of tokens): the memory guard refuses a prompt
/// long before that; the cap only keeps an endless input such as `/dev/zero` from being read.
const MAX_PROMPT_FILE_BYTES: u64 = 16 << 20;

/// The text of a prompt file (`-` = standard input) in UTF-8, one trailing line break dropped.
fn read_prompt_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(MAX_PROMPT_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
        if bytes.len() as u64 > MAX_PROMPT_FILE_BYTES {
            anyhow::bail!(
                "standard input holds more than {} MiB",
                MAX_PROMPT_FILE_BYTES >> 20
            );
        }
    } else {
        omnigen::core::open_regular(path, Some(MAX_PROMPT_FILE_BYTES))?
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// `--scheduler`: the library's names and its message for an unknown one.
pub(crate) fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// The folder `out` is written into must exist and accept a file, and an existing `out` must
/// be a regular file: checked before the model loads, so a typo in the output path does not
/// cost a whole generation.
fn check_writable(out: &Path) -> anyhow::Result<()> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir.filter(|d| !d.is_dir()) {
        anyhow::bail!(
            "cannot write {}: {} is not a directory",
            out.display(),
            dir.display()
        );
    }
    Ok(omnigen::pipeline::check_output(out)?)
}

/// Runs `omnigen generate`; errors lead with the flag at fault where there is one.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    generate(args).map_err(crate::flags::name_flag)
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    // Faster tensor allocation on the CPU backends (process-wide glibc malloc settings).
    omnigen::models::tune_host_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let request = args.request()?;
    if let Some(note) = offload_note(&args.offload) {
        eprintln!("{note}");
    }
    let (format, note) = args.output_format()?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    // Unreadable inputs and an unwritable destination fail before the (slow) model load.
    for image in request.prompts.iter().flat_map(|p| p.images()) {
        image.load_rgb8()?;
    }
    for out in std::iter::once(&args.output).chain(&args.save_latents) {
        check_writable(out)?;
    }

    let mut builder = args
        .precision
        .apply(OmniGenPipeline::<DefaultBackend>::builder(&args.model))
        .memory_limit(args.memory_limit.map(|mib| mib.saturating_mul(1 << 20)))
        .offload_model(args.offload.contains(&OffloadArg::Model))
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
    // the bar counts model evaluations, which Heun makes about twice per step
    let mut on_progress = |p: Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
    };
    // Ctrl-C or SIGTERM stops the loop before its next step; no output is written then.
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    if let Err(e) = ctrlc::set_handler(move || on_signal.cancel()) {
        eprintln!("warning: cannot catch Ctrl-C ({e}); an interrupted run ends at once");
    }
    let hooks = Hooks {
        on_progress: Some(&mut on_progress),
        cancel: Some(cancel),
        ..Hooks::default()
    };
    omnigen::pipeline::memory::reset_peak_resident_memory();
    let baseline = omnigen::pipeline::memory::resident_memory();
    let generation = pipeline.generate_with_hooks(&request, hooks)?;
    bar.finish_and_clear();

    if let Some(path) = &args.save_latents {
        write_latents(path, generation.latents.clone())?;
    }
    let image = generation
        .images
        .first()
        .context("the pipeline returned no image")?;
    let metadata = if args.no_metadata {
        OutputMetadata::default()
    } else {
        omnigen::io::output_metadata(&request, &pipeline, &generation, 0)?
    };
    save_image(&args.output, image, format, &metadata)?;
    let s = &generation.stats;
    let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| (b >> 20).to_string());
    let measured = s
        .peak_memory_bytes
        .zip(baseline)
        .map(|(p, b)| p.saturating_sub(b));
    eprintln!(
        "wrote {} ({}x{}); seed {}; tokens per branch {:?}; process {:.2?}, encode {:.2?}, denoise {:.2?}, decode {:.2?}; peak memory {} MiB; generation memory: estimated {} MiB, measured {} MiB",
        args.output.display(),
        image.width(),
        image.height(),
        s.seed,
        s.tokens_per_branch,
        s.process,
        s.encode,
        s.denoise,
        s.decode,
        mib(s.peak_memory_bytes),
        mib(s.memory_estimate),
        mib(measured),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(extra: &[&str]) -> Result<GenerateArgs, clap::Error> {
        let base = [
            "omnigen", "--model", "m", "--prompt", "p", "--output", "o.png",
        ];
        Wrapper::try_parse_from(base.iter().chain(extra)).map(|w| w.args)
    }

    #[test]
    fn defaults_are_the_official_ones() {
        let args = parse(&[]).unwrap();
        assert_eq!((args.height, args.width, args.steps), (1024, 1024, 50));
        assert_eq!((args.guidance_scale, args.img_guidance_scale), (3.0, 1.6));
        assert_eq!(args.kv_cache, KvCacheArg::Official);
        assert_eq!(args.input_latents, InputLatentsArg::Sample);
        assert_eq!(args.precision.dtype, DtypeArg::Auto);
        assert_eq!(args.precision.vae_dtype, VaeDtypeArg::F32);
        assert_eq!(args.max_input_image_size, 1024);
        assert_eq!(args.lora_scale, 1.0);
        assert!(!args.joint_cfg && !args.no_metadata && !args.use_input_image_size_as_output);
        let request = args.request().unwrap();
        assert_eq!(request.kv_cache, KvCache::Official);
        assert!(request.separate_cfg_infer);
        assert_eq!(request.seed, None);
    }

    #[test]
    fn choices_parse_with_their_names_and_aliases() {
        let args = parse(&[
            "--kv-cache",
            "none",
            "--input-latents",
            "mean",
            "--dtype",
            "bfloat16",
            "--joint-cfg",
        ])
        .unwrap();
        assert_eq!(args.kv_cache, KvCacheArg::Off);
        assert_eq!(args.precision.dtype.dtype(), Some(DType::BF16));
        let request = args.request().unwrap();
        assert_eq!(request.kv_cache, KvCache::Off);
        assert_eq!(request.input_latents, InputLatents::Mean);
        assert!(!request.separate_cfg_infer);
        assert_eq!(
            parse(&["--dtype", "f16"]).unwrap().precision.dtype.dtype(),
            Some(DType::F16)
        );
        assert_eq!(
            DType::from(parse(&["--vae-dtype", "bf16"]).unwrap().precision.vae_dtype),
            DType::BF16
        );
        assert!(parse(&["--vae-dtype", "f16"]).is_err());
        assert_eq!(
            parse(&["--kv-cache", "exact"]).unwrap().kv_cache,
            KvCacheArg::Exact
        );
    }

    #[test]
    fn unknown_choices_are_refused_with_the_possible_values() {
        let err = parse(&["--kv-cache", "sometimes"]).unwrap_err().to_string();
        assert!(
            err.contains("--kv-cache") && err.contains("official, exact, off"),
            "{err}"
        );
        let both = parse(&["--offload", "model,kv"]).unwrap().offload;
        assert_eq!(both, [OffloadArg::Model, OffloadArg::Kv]);
        if <DefaultBackend as omnigen::models::KernelBackend>::HOST_MEMORY {
            let note = offload_note(&both).unwrap_or_default();
            assert!(note.contains("--offload model,kv does nothing"), "{note}");
        } else {
            assert!(offload_note(&both).is_none(), "device backends stream");
        }
        assert!(offload_note(&[]).is_none());
        let kv = parse(&["--offload", "kv"]).unwrap().request().unwrap();
        assert!(kv.offload_kv_cache, "--offload kv sets offload_kv_cache");
        let plain = parse(&[]).unwrap().request().unwrap();
        assert!(
            !plain.offload_kv_cache,
            "without --offload kv the cache stays on the device"
        );
        assert!(parse(&["--offload", "disk"]).is_err());
        let err = parse(&["--dtype", "f64"]).unwrap_err().to_string();
        assert!(err.contains("auto, f32, f16, bf16"), "{err}");
        let err = parse(&["--input-latents", "mode"]).unwrap_err().to_string();
        assert!(err.contains("sample, mean"), "{err}");
    }

    #[test]
    fn the_format_comes_from_the_flag_then_the_extension_then_png() {
        let format_of = |output: &str, extra: &[&str]| {
            let mut args = parse(extra).unwrap();
            args.output = PathBuf::from(output);
            args.output_format()
        };
        let (f, note) = format_of("a.JPG", &[]).unwrap();
        assert_eq!((f, note), (ImageFormat::Jpeg { quality: 90 }, None));
        assert_eq!(format_of("a.webp", &[]).unwrap(), (ImageFormat::WebP, None));
        let (f, note) = format_of("a.out", &[]).unwrap();
        assert_eq!(f, ImageFormat::Png);
        assert!(note.unwrap().contains("writing png"));
        let (f, note) = format_of("a.png", &["--format", "webp"]).unwrap();
        assert_eq!(f, ImageFormat::WebP);
        assert!(note.unwrap().contains("writing webp to a.png"));
        let (f, note) = format_of("a", &["--format", "jpg", "--jpeg-quality", "70"]).unwrap();
        assert_eq!((f, note), (ImageFormat::Jpeg { quality: 70 }, None));
        let err = format_of("a.png", &["--jpeg-quality", "70"]).unwrap_err();
        assert!(format!("{err:#}").contains("JPEG output only"), "{err:#}");
        assert!(parse(&["--jpeg-quality", "0"]).is_err());
        assert!(parse(&["--format", "gif"]).is_err());
    }

    #[test]
    fn scheduler_flags_reach_the_request() {
        let request = parse(&[
            "--scheduler",
            "dpmpp-2m",
            "--time-shift",
            "3",
            "--cfg-range",
            "0,0.6",
        ])
        .unwrap()
        .request()
        .unwrap();
        assert_eq!(request.scheduler, SchedulerKind::DpmPp2m);
        assert_eq!(request.time_shift, 3.0);
        assert_eq!((request.cfg_range.start, request.cfg_range.end), (0.0, 0.6));
        let request = parse(&["--scheduler", "euler-shifted", "--sigmas", "1,0.6,0.2"])
            .unwrap()
            .request()
            .unwrap();
        assert_eq!(request.sigmas.as_deref(), Some(&[1.0, 0.6, 0.2][..]));
        assert_eq!(request.num_inference_steps, 3);
        let defaults = parse(&[]).unwrap().request().unwrap();
        assert_eq!(defaults.scheduler, SchedulerKind::Euler);
        assert_eq!(defaults.cfg_range, CfgRange::default());
    }

    #[test]
    fn bad_scheduler_values_are_named() {
        let err = parse(&["--scheduler", "ddim"]).unwrap_err().to_string();
        assert!(
            err.contains("--scheduler") && err.contains("unknown scheduler `ddim`"),
            "{err}"
        );
        let msg = |extra: &[&str]| format!("{:#}", parse(extra).unwrap().request().unwrap_err());
        assert!(msg(&["--cfg-range", "0.8,0.2"]).contains("END 0.2 is below START 0.8"));
        assert!(msg(&["--cfg-range", "0.5"]).contains("cfg_range"));
        assert!(msg(&["--sigmas", "1,1.5"]).contains("outside [0, 1]"));
        assert!(msg(&["--sigmas", "0.2,0.8"]).contains("strictly decreasing"));
        assert!(msg(&["--sigmas", "1,x"]).contains("`x`"));
        assert!(msg(&["--scheduler", "unipc", "--sigmas", "1,0.5"]).contains("no custom sigmas"));
        assert!(msg(&["--time-shift", "0"]).contains("time_shift"));
        assert!(parse(&["--sigmas", "1,0.5", "--steps", "4"]).is_err());
    }

    #[test]
    fn seed_and_latents_exclude_each_other() {
        assert!(parse(&["--seed", "1", "--latents", "l.safetensors"]).is_err());
    }

    #[test]
    fn bad_values_fail_before_any_model_is_touched() {
        let msg = |extra: &[&str]| format!("{:#}", parse(extra).unwrap().request().unwrap_err());
        assert!(msg(&["--height", "65"]).contains("height"));
        assert!(msg(&["--steps", "0"]).contains("num_inference_steps"));
        assert!(msg(&["--guidance-scale", "NaN"]).contains("guidance_scale"));
        assert!(msg(&["--lora-scale", "inf"]).contains("lora_scale"));
        assert!(msg(&["--image", "x.png"]).contains("prompt"));
    }

    #[test]
    fn the_output_folder_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(&dir.path().join("out.png")).is_ok());
        assert!(check_writable(Path::new("out.png")).is_ok());
        let err = check_writable(&dir.path().join("no/such/out.png")).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        // an existing directory as the output is refused too, and nothing is left behind
        let err = check_writable(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("directory, not a regular file"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
