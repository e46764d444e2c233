//! What to generate: [`GenerationRequest`], with the official pipeline's parameters and defaults.

use omnigen_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::prompt::Prompt;

/// The most denoising steps a request may ask for: the official schedule is a grid on [0, 1]
/// and beyond a thousand steps no sampler gains anything (diffusers' training schedules have
/// 1000 timesteps).
pub const MAX_INFERENCE_STEPS: usize = 1000;

/// The most images one request may generate (prompts × images per prompt): each is a batch row
/// of every transformer call.
pub const MAX_IMAGES: usize = 64;
pub use omnigen_models::scheduler::SchedulerKind;

/// The part of the run that applies guidance, as fractions of it: evaluation `i` of `N` runs
/// every guidance branch when `start ≤ i/N < end` (in f32) and only the conditional branch
/// otherwise, whose output is then the velocity. The default `0,1` guides every step.
///
/// ```
/// use omnigen_pipeline::request::CfgRange;
/// let range: CfgRange = "0,0.5".parse()?;
/// assert!(range.guides(0, 4) && range.guides(1, 4) && !range.guides(2, 4));
/// assert!("0.8,0.2".parse::<CfgRange>().unwrap_err().to_string().contains("below START"));
/// # Ok::<(), omnigen_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CfgRange {
    /// First guided fraction of the run (inclusive).
    pub start: f32,
    /// End of the guided part (exclusive).
    pub end: f32,
}

impl Default for CfgRange {
    fn default() -> Self {
        Self {
            start: 0.0,
            end: 1.0,
        }
    }
}

impl CfgRange {
    /// A checked range: both ends in `[0, 1]`, `end ≥ start`.
    pub fn new(start: f32, end: f32) -> Result<Self> {
        let range = Self { start, end };
        range.validate()?;
        Ok(range)
    }

    /// Whether evaluation `index` of `total` applies guidance.
    pub fn guides(&self, index: usize, total: usize) -> bool {
        let f = index as f32 / total as f32;
        self.start <= f && f < self.end
    }

    /// Checks both ends, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        for (end, v) in [("START", self.start), ("END", self.end)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid_argument(
                    "cfg_range",
                    format!("{end} {v} is outside [0, 1]"),
                ));
            }
        }
        if self.end < self.start {
            return Err(Error::invalid_argument(
                "cfg_range",
                format!("END {} is below START {}", self.end, self.start),
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for CfgRange {
    type Err = Error;

    /// `START,END`, e.g. `0,0.6`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid_argument(
                "cfg_range",
                format!("`{s}` is not START,END (two fractions, e.g. 0,0.6)"),
            )
        };
        let (a, b) = s.split_once(',').ok_or_else(bad)?;
        let a: f32 = a.trim().parse().map_err(|_| bad())?;
        let b: f32 = b.trim().parse().map_err(|_| bad())?;
        Self::new(a, b)
    }
}

/// Parses `a,b,c,...` (custom sigmas on a command line or in a form); the values are checked
/// when the request is.
pub fn parse_sigmas(s: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|v| {
            v.trim().parse::<f32>().map_err(|_| {
                Error::invalid_argument("sigmas", format!("`{v}` in `{s}` is not a number"))
            })
        })
        .collect()
}

/// How the condition tokens' keys and values are reused across denoising steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCache {
    /// The official pipeline's cache (default): step 0 lets the time and image tokens attend
    /// only to the condition tokens, later steps reuse the cached prefix.
    #[default]
    Official,
    /// A cache whose every step equals the uncached forward exactly.
    Exact,
    /// No cache: the whole sequence runs at every step (the official `use_kv_cache=False`).
    Off,
}

/// Which latent of an input image's VAE posterior conditions the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputLatents {
    /// A posterior sample `mean + std·ε` with ε drawn from the request's seed — the official
    /// behaviour (each image is encoded once per branch that uses it, with fresh noise).
    #[default]
    Sample,
    /// The posterior mean: deterministic, independent of the seed.
    Mean,
}

/// Initial noise supplied by the caller instead of drawing it from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialLatents {
    /// Values in row-major order.
    pub values: Vec<f32>,
    /// `[N, 4, height / 8, width / 8]`, N = prompts × images per prompt (or 1, broadcast).
    pub shape: [usize; 4],
}

/// One generation call: prompts plus every sampling option, with the official defaults.
///
/// ```
/// use omnigen_pipeline::{GenerationRequest, KvCache, Prompt};
/// let request = GenerationRequest::new(Prompt::from("a red cat on a blue mat"))
///     .size(512, 512)
///     .steps(30)
///     .guidance_scale(2.5)
///     .seed(42)
///     .kv_cache(KvCache::Exact);
/// assert_eq!(request.height, 512);
/// assert_eq!(request.img_guidance_scale, 1.6); // official default kept
/// ```
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The prompts, each generating `num_images_per_prompt` images.
    pub prompts: Vec<Prompt>,
    /// Negative prompt; `None` uses the official default list of defects.
    pub negative_prompt: Option<String>,
    /// Output height in pixels (multiple of 16). Default 1024.
    pub height: usize,
    /// Output width in pixels (multiple of 16). Default 1024.
    pub width: usize,
    /// Denoising steps. Default 50.
    pub num_inference_steps: usize,
    /// Text guidance scale. Default 3.0.
    pub guidance_scale: f32,
    /// Image guidance scale (prompts with images). Default 1.6.
    pub img_guidance_scale: f32,
    /// Whether prompts with images get the third, image-only guidance branch. Default true.
    pub use_img_guidance: bool,
    /// Run each guidance branch as its own forward (official default, less memory) instead of
    /// one left-padded joint batch (fewer, larger forwards).
    pub separate_cfg_infer: bool,
    /// Key-value cache semantics. Default [`KvCache::Official`].
    pub kv_cache: KvCache,
    /// The official option of that name (keep the kv cache in host memory between steps),
    /// accepted so that official settings carry over. On the CPU backends the cache is in host
    /// memory anyway (a no-op); device backends do not implement it yet and say so in the log
    /// (the cache stays in device memory).
    pub offload_kv_cache: bool,
    /// Take the output size from the first input image (after preprocessing).
    pub use_input_image_size_as_output: bool,
    /// Input images are downscaled so their longer side is at most this. Default 1024.
    pub max_input_image_size: usize,
    /// Images generated per prompt. Default 1.
    pub num_images_per_prompt: usize,
    /// Seed of the initial noise and of the input-image posterior samples; `None` draws one
    /// (reported as [`GenerationStats::seed`](crate::GenerationStats::seed)), or, with
    /// [`latents`](Self::latents) given, uses [`DEFAULT_SEED`](crate::DEFAULT_SEED).
    pub seed: Option<u64>,
    /// Initial noise given by the caller (overrides the seed for the initial latents).
    pub latents: Option<InitialLatents>,
    /// Which posterior latent encodes input images.
    pub input_latents: InputLatents,
    /// Noise of each input-image posterior sample, in encode order (branch by branch, image by
    /// image), instead of drawing it from the seed: reproduces a reference run whose VAE noise
    /// was recorded. Used only with [`InputLatents::Sample`].
    pub input_noise: Option<Vec<InitialLatents>>,
    /// The scheduler [`generate`](crate::OmniGenPipeline::generate) builds. Default
    /// [`SchedulerKind::Euler`], the official one.
    pub scheduler: SchedulerKind,
    /// The scheduler's time shift (`time_shifting_factor` of `euler`, diffusers' `shift` /
    /// `flow_shift` of the others). Default 1: none.
    pub time_shift: f32,
    /// Custom sigmas (diffusers' σ = 1 − t, strictly decreasing in `[0, 1]`, one per step) for
    /// the schedulers that accept them; [`sigmas`](Self::sigmas) also sets the step count.
    pub sigmas: Option<Vec<f32>>,
    /// The part of the run that applies guidance. Default all of it.
    pub cfg_range: CfgRange,
}

impl GenerationRequest {
    /// A request for one prompt with the official defaults.
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        Self::batch(vec![prompt.into()])
    }

    /// A request for several prompts generated together.
    pub fn batch(prompts: Vec<Prompt>) -> Self {
        Self {
            prompts,
            negative_prompt: None,
            height: 1024,
            width: 1024,
            num_inference_steps: 50,
            guidance_scale: 3.0,
            img_guidance_scale: 1.6,
            use_img_guidance: true,
            separate_cfg_infer: true,
            kv_cache: KvCache::Official,
            offload_kv_cache: true,
            use_input_image_size_as_output: false,
            max_input_image_size: 1024,
            num_images_per_prompt: 1,
            seed: None,
            latents: None,
            input_latents: InputLatents::Sample,
            input_noise: None,
            scheduler: SchedulerKind::Euler,
            time_shift: 1.0,
            sigmas: None,
            cfg_range: CfgRange::default(),
        }
    }

    /// Output size in pixels.
    pub fn size(mut self, height: usize, width: usize) -> Self {
        self.height = height;
        self.width = width;
        self
    }

    /// Denoising steps.
    pub fn steps(mut self, steps: usize) -> Self {
        self.num_inference_steps = steps;
        self
    }

    /// Text guidance scale.
    pub fn guidance_scale(mut self, scale: f32) -> Self {
        self.guidance_scale = scale;
        self
    }

    /// Image guidance scale.
    pub fn img_guidance_scale(mut self, scale: f32) -> Self {
        self.img_guidance_scale = scale;
        self
    }

    /// Enables or disables the image guidance branch.
    pub fn use_img_guidance(mut self, on: bool) -> Self {
        self.use_img_guidance = on;
        self
    }

    /// Negative prompt.
    pub fn negative_prompt(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt = Some(text.into());
        self
    }

    /// One forward per guidance branch (`true`, default) or one joint batch (`false`).
    pub fn separate_cfg_infer(mut self, separate: bool) -> Self {
        self.separate_cfg_infer = separate;
        self
    }

    /// Key-value cache semantics.
    pub fn kv_cache(mut self, mode: KvCache) -> Self {
        self.kv_cache = mode;
        self
    }

    /// Sets [`offload_kv_cache`](Self::offload_kv_cache): a no-op on the CPU backends, not
    /// implemented (and logged) on device backends.
    pub fn offload_kv_cache(mut self, on: bool) -> Self {
        self.offload_kv_cache = on;
        self
    }

    /// Output size taken from the first input image.
    pub fn use_input_image_size_as_output(mut self, on: bool) -> Self {
        self.use_input_image_size_as_output = on;
        self
    }

    /// Cap on input images' longer side.
    pub fn max_input_image_size(mut self, pixels: usize) -> Self {
        self.max_input_image_size = pixels;
        self
    }

    /// Images per prompt.
    pub fn num_images_per_prompt(mut self, n: usize) -> Self {
        self.num_images_per_prompt = n;
        self
    }

    /// Seed for every random draw of the generation.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Initial noise supplied by the caller.
    pub fn latents(mut self, latents: InitialLatents) -> Self {
        self.latents = Some(latents);
        self
    }

    /// Which posterior latent encodes input images.
    pub fn input_latents(mut self, choice: InputLatents) -> Self {
        self.input_latents = choice;
        self
    }

    /// Posterior-sample noise of each input-image encode, in encode order.
    pub fn input_noise(mut self, noise: Vec<InitialLatents>) -> Self {
        self.input_noise = Some(noise);
        self
    }

    /// The scheduler [`generate`](crate::OmniGenPipeline::generate) builds.
    pub fn scheduler(mut self, kind: SchedulerKind) -> Self {
        self.scheduler = kind;
        self
    }

    /// The scheduler's time shift (1 = none).
    pub fn time_shift(mut self, shift: f32) -> Self {
        self.time_shift = shift;
        self
    }

    /// Custom sigmas, one per step (the step count becomes their number).
    pub fn sigmas(mut self, sigmas: Vec<f32>) -> Self {
        self.num_inference_steps = sigmas.len();
        self.sigmas = Some(sigmas);
        self
    }

    /// The part of the run that applies guidance.
    pub fn cfg_range(mut self, range: CfgRange) -> Self {
        self.cfg_range = range;
        self
    }

    /// Checks every option, naming the first one at fault.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(Error::invalid_argument(
                "prompts",
                "at least one prompt is required",
            ));
        }
        if !self.use_input_image_size_as_output {
            for (name, v) in [("height", self.height), ("width", self.width)] {
                if v == 0 || v % 16 != 0 {
                    return Err(Error::invalid_argument(
                        name,
                        format!("{v} is not a positive multiple of 16"),
                    ));
                }
                if v > 3072 {
                    return Err(Error::invalid_argument(
                        name,
                        format!("{v} exceeds 3072, the largest size the position table covers"),
                    ));
                }
            }
        }
        if !(1..=MAX_INFERENCE_STEPS).contains(&self.num_inference_steps) {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                format!(
                    "{} is not between 1 and {MAX_INFERENCE_STEPS}",
                    self.num_inference_steps
                ),
            ));
        }
        for (name, v) in [
            ("guidance_scale", self.guidance_scale),
            ("img_guidance_scale", self.img_guidance_scale),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid_argument(
                    name,
                    format!("{v} is not a finite number"),
                ));
            }
        }
        if !(1..=MAX_IMAGES).contains(&self.num_images_per_prompt) {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                format!(
                    "{} is not between 1 and {MAX_IMAGES}",
                    self.num_images_per_prompt
                ),
            ));
        }
        let images = self
            .prompts
            .len()
            .saturating_mul(self.num_images_per_prompt);
        if images > MAX_IMAGES {
            return Err(Error::invalid_argument(
                "prompts",
                format!(
                    "{} prompts x {} images per prompt is {images} images; at most {MAX_IMAGES} \
                     per request",
                    self.prompts.len(),
                    self.num_images_per_prompt
                ),
            ));
        }
        if !(16..=3072).contains(&self.max_input_image_size) {
            return Err(Error::invalid_argument(
                "max_input_image_size",
                format!(
                    "{} is not between 16 and 3072 pixels (the position table's extent)",
                    self.max_input_image_size
                ),
            ));
        }
        self.cfg_range.validate()?;
        if let Some(sigmas) = &self.sigmas {
            if sigmas.len() != self.num_inference_steps {
                return Err(Error::invalid_argument(
                    "sigmas",
                    format!(
                        "{} values given for {} steps (one per step)",
                        sigmas.len(),
                        self.num_inference_steps
                    ),
                ));
            }
        }
        self.scheduler
            .check(self.time_shift, self.sigmas.as_deref())?;
        for l in self.latents.iter().chain(self.input_noise.iter().flatten()) {
            if l.values.len() != l.shape.iter().product::<usize>() {
                return Err(Error::invalid_argument(
                    "latents",
                    format!("{} values do not fill shape {:?}", l.values.len(), l.shape),
                ));
            }
            if l.values.iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid_argument(
                    "latents",
                    "contains non-finite values",
                ));
            }
        }
        Ok(())
    }
}
