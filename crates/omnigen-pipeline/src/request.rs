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

/// How the condition tokens' keys and values are reused across denoising steps. Its serde form
/// and [`FromStr`](std::str::FromStr) names are `official`, `exact` and `off` (alias `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
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

/// Which latent of an input image's VAE posterior conditions the transformer. Its serde form and
/// [`FromStr`](std::str::FromStr) names are `sample` and `mean`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum InputLatents {
    /// A posterior sample `mean + std·ε` with ε drawn from the request's seed — the official
    /// behaviour (each image is encoded once per branch that uses it, with fresh noise).
    #[default]
    Sample,
    /// The posterior mean: deterministic, independent of the seed.
    Mean,
}

impl KvCache {
    /// The name of the mode: `official`, `exact` or `off`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Official => "official",
            Self::Exact => "exact",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for KvCache {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "official" => Ok(Self::Official),
            "exact" => Ok(Self::Exact),
            "off" | "none" => Ok(Self::Off),
            other => Err(Error::invalid_argument(
                "kv_cache",
                format!("`{other}` is not one of official, exact, off"),
            )),
        }
    }
}

impl From<KvCache> for &'static str {
    fn from(mode: KvCache) -> Self {
        mode.name()
    }
}

impl TryFrom<String> for KvCache {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl InputLatents {
    /// The name of the choice: `sample` or `mean`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sample => "sample",
            Self::Mean => "mean",
        }
    }
}

impl std::str::FromStr for InputLatents {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sample" => Ok(Self::Sample),
            "mean" => Ok(Self::Mean),
            other => Err(Error::invalid_argument(
                "input_latents",
                format!("`{other}` is not one of sample, mean"),
            )),
        }
    }
}

impl From<InputLatents> for &'static str {
    fn from(choice: InputLatents) -> Self {
        choice.name()
    }
}

impl TryFrom<String> for InputLatents {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// Initial noise supplied by the caller instead of drawing it from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
///
/// Its serde form is an object with these field names, every one but `prompts` optional (the
/// official default) and no others allowed; a prompt is `{"text": ..., "images": [paths]}`, so
/// only requests whose images are files can be written (see [`Prompt`]'s serde form).
///
/// ```
/// use omnigen_pipeline::GenerationRequest;
/// let request: GenerationRequest =
///     serde_json::from_str(r#"{"prompts": [{"text": "a cat"}], "num_inference_steps": 20}"#)?;
/// assert_eq!((request.num_inference_steps, request.height), (20, 1024));
/// let again: GenerationRequest = serde_json::from_value(serde_json::to_value(&request)?)?;
/// assert_eq!(format!("{again:?}"), format!("{request:?}"));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default = "GenerationRequest::without_prompts", deny_unknown_fields)]
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
    /// The official option of that name, on by default as there: keep the kv cache in host
    /// memory, each layer's keys and values uploaded one layer ahead of use
    /// ([`KvPlacement::Host`](omnigen_models::transformer::KvPlacement)); the numbers are the
    /// same either way. On the CPU backends the cache is in host memory anyway (a no-op).
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

    /// The defaults a deserialized request starts from (its `prompts` must be given).
    fn without_prompts() -> Self {
        Self::batch(Vec::new())
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

    /// Sets [`offload_kv_cache`](Self::offload_kv_cache): a no-op on the CPU backends.
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

/// A job description's options: every option of a [`GenerationRequest`] but its prompts and
/// caller-given noise, each one optional. A batch manifest line and a server request's OmniGen
/// fields read into one; [`or`](Self::or) lays it over the defaults of a command line or a
/// server, [`apply`](Self::apply) sets what it gives on a request, leaving the rest as they
/// were (the official defaults for a new one). Serde names are the request's field names,
/// with `steps` for `num_inference_steps` and `n` for `num_images_per_prompt`.
///
/// ```
/// use omnigen_pipeline::{GenerationOptions, GenerationRequest, Prompt};
/// let defaults = GenerationOptions { steps: Some(20), height: Some(512), ..Default::default() };
/// let line: GenerationOptions = serde_json::from_str(r#"{"steps": 8, "seed": 3}"#)?;
/// let request = line.or(&defaults).apply(GenerationRequest::new(Prompt::from("a cat")));
/// assert_eq!((request.num_inference_steps, request.height, request.width), (8, 512, 1024));
/// assert_eq!(request.seed, Some(3));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationOptions {
    /// [`GenerationRequest::negative_prompt`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// [`GenerationRequest::height`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// [`GenerationRequest::width`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// [`GenerationRequest::num_inference_steps`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// [`GenerationRequest::guidance_scale`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f32>,
    /// [`GenerationRequest::img_guidance_scale`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub img_guidance_scale: Option<f32>,
    /// [`GenerationRequest::use_img_guidance`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_img_guidance: Option<bool>,
    /// [`GenerationRequest::separate_cfg_infer`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub separate_cfg_infer: Option<bool>,
    /// [`GenerationRequest::kv_cache`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvCache>,
    /// [`GenerationRequest::input_latents`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_latents: Option<InputLatents>,
    /// [`GenerationRequest::use_input_image_size_as_output`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_input_image_size_as_output: Option<bool>,
    /// [`GenerationRequest::max_input_image_size`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_input_image_size: Option<usize>,
    /// [`GenerationRequest::num_images_per_prompt`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// [`GenerationRequest::seed`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// [`GenerationRequest::scheduler`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,
    /// [`GenerationRequest::time_shift`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_shift: Option<f32>,
    /// [`GenerationRequest::sigmas`] (which also set the step count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigmas: Option<Vec<f32>>,
    /// [`GenerationRequest::cfg_range`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg_range: Option<CfgRange>,
}

impl GenerationOptions {
    /// These options, with `defaults`' value wherever these give none.
    pub fn or(&self, defaults: &GenerationOptions) -> GenerationOptions {
        let d = defaults.clone();
        let s = self.clone();
        GenerationOptions {
            negative_prompt: s.negative_prompt.or(d.negative_prompt),
            height: s.height.or(d.height),
            width: s.width.or(d.width),
            steps: s.steps.or(d.steps),
            guidance_scale: s.guidance_scale.or(d.guidance_scale),
            img_guidance_scale: s.img_guidance_scale.or(d.img_guidance_scale),
            use_img_guidance: s.use_img_guidance.or(d.use_img_guidance),
            separate_cfg_infer: s.separate_cfg_infer.or(d.separate_cfg_infer),
            kv_cache: s.kv_cache.or(d.kv_cache),
            input_latents: s.input_latents.or(d.input_latents),
            use_input_image_size_as_output: s
                .use_input_image_size_as_output
                .or(d.use_input_image_size_as_output),
            max_input_image_size: s.max_input_image_size.or(d.max_input_image_size),
            n: s.n.or(d.n),
            seed: s.seed.or(d.seed),
            scheduler: s.scheduler.or(d.scheduler),
            time_shift: s.time_shift.or(d.time_shift),
            // Steps given here win over sigmas given by the defaults (sigmas set the count).
            sigmas: match (s.sigmas, s.steps) {
                (Some(sigmas), _) => Some(sigmas),
                (None, Some(_)) => None,
                (None, None) => d.sigmas,
            },
            cfg_range: s.cfg_range.or(d.cfg_range),
        }
    }

    /// `request` with every option these give set; the others keep their values. Nothing is
    /// checked here: [`GenerationRequest::validate`] (or generating) checks the result.
    pub fn apply(&self, mut request: GenerationRequest) -> GenerationRequest {
        let o = self.clone();
        if let Some(text) = o.negative_prompt {
            request.negative_prompt = Some(text);
        }
        request.height = o.height.unwrap_or(request.height);
        request.width = o.width.unwrap_or(request.width);
        request.num_inference_steps = o.steps.unwrap_or(request.num_inference_steps);
        request.guidance_scale = o.guidance_scale.unwrap_or(request.guidance_scale);
        request.img_guidance_scale = o.img_guidance_scale.unwrap_or(request.img_guidance_scale);
        request.use_img_guidance = o.use_img_guidance.unwrap_or(request.use_img_guidance);
        request.separate_cfg_infer = o.separate_cfg_infer.unwrap_or(request.separate_cfg_infer);
        request.kv_cache = o.kv_cache.unwrap_or(request.kv_cache);
        request.input_latents = o.input_latents.unwrap_or(request.input_latents);
        request.use_input_image_size_as_output = o
            .use_input_image_size_as_output
            .unwrap_or(request.use_input_image_size_as_output);
        request.max_input_image_size = o
            .max_input_image_size
            .unwrap_or(request.max_input_image_size);
        request.num_images_per_prompt = o.n.unwrap_or(request.num_images_per_prompt);
        request.seed = o.seed.or(request.seed);
        request.scheduler = o.scheduler.unwrap_or(request.scheduler);
        request.time_shift = o.time_shift.unwrap_or(request.time_shift);
        if let Some(sigmas) = o.sigmas {
            request = request.sigmas(sigmas);
        }
        request.cfg_range = o.cfg_range.unwrap_or(request.cfg_range);
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::ConditionImage;

    #[test]
    fn a_request_round_trips_through_json() {
        let prompt = Prompt::from_text(
            "<img><|image_1|></img> make it green",
            vec![ConditionImage::from_path("photos/cat.png")],
        )
        .unwrap();
        let request = GenerationRequest::new(prompt)
            .size(512, 768)
            .steps(30)
            .seed(7)
            .kv_cache(KvCache::Exact)
            .input_latents(InputLatents::Mean)
            .scheduler(SchedulerKind::DpmPp2m)
            .cfg_range(CfgRange::new(0.0, 0.6).unwrap())
            .negative_prompt("blur");
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["kv_cache"], "exact");
        assert_eq!(json["input_latents"], "mean");
        assert_eq!(json["scheduler"], "dpmpp-2m");
        assert_eq!(json["prompts"][0]["images"][0], "photos/cat.png");
        let back: GenerationRequest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{request:?}"));
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
    }

    #[test]
    fn bad_request_json_is_refused_with_the_field() {
        let err = |text: &str| serde_json::from_str::<GenerationRequest>(text).unwrap_err();
        let e = err(r#"{"prompts": [{"text": "a"}], "stepz": 3}"#).to_string();
        assert!(e.contains("unknown field `stepz`"), "{e}");
        let e = err(r#"{"prompts": [{"text": "a"}], "kv_cache": "sometimes"}"#).to_string();
        assert!(e.contains("official, exact, off"), "{e}");
        // placeholders are checked against the images as Prompt::from_text checks them
        let e = err(r#"{"prompts": [{"text": "<img><|image_1|></img> x"}]}"#).to_string();
        assert!(e.contains("<|image_1|>"), "{e}");
        // an in-memory image has no serde form
        let prompt = Prompt::new().image(ConditionImage::from_rgb(1, 1, vec![0; 3]));
        let e = serde_json::to_string(&GenerationRequest::new(prompt)).unwrap_err();
        assert!(e.to_string().contains("raw RGB buffer 1x1"), "{e}");
    }

    #[test]
    fn options_fill_gaps_from_defaults_and_leave_the_rest() {
        let defaults = GenerationOptions {
            steps: Some(10),
            guidance_scale: Some(2.0),
            sigmas: Some(vec![1.0, 0.5]),
            ..Default::default()
        };
        let line = GenerationOptions {
            steps: Some(4),
            seed: Some(1),
            ..Default::default()
        };
        let merged = line.or(&defaults);
        // the line's steps replace the default sigmas, which would set the count again
        assert_eq!((merged.steps, merged.sigmas.clone()), (Some(4), None));
        let request = merged.apply(GenerationRequest::new(Prompt::from("a")));
        assert_eq!(request.num_inference_steps, 4);
        assert_eq!((request.guidance_scale, request.seed), (2.0, Some(1)));
        assert_eq!(request.img_guidance_scale, 1.6);
        let request = GenerationOptions::default().or(&defaults).apply(request);
        assert_eq!(request.sigmas.as_deref(), Some(&[1.0, 0.5][..]));
        assert_eq!(request.num_inference_steps, 2);
        let json = serde_json::to_string(&line).unwrap();
        assert_eq!(json, r#"{"steps":4,"seed":1}"#);
        assert!(serde_json::from_str::<GenerationOptions>(r#"{"size": 3}"#).is_err());
    }
}
