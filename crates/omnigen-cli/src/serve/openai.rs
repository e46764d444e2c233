//! The OpenAI images API's shapes: its error object, and the request fields of
//! `/v1/images/generations` and `/v1/images/edits` (plus OmniGen's own options as extra fields)
//! read into a [`GenerationRequest`]. Every field is read by hand rather than by a derived
//! deserializer so that each refusal names the field at fault in `param`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use omnigen::pipeline::{CfgRange, GenerationOptions, SchedulerKind};
use omnigen::prelude::*;
use omnigen::Error;
use serde_json::{json, Value};

/// An error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, where there is one.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds the client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400 for the request field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("{param}: {}", message.into()),
        )
        .code("invalid_value");
        e.param = Some(param);
        e
    }

    /// 400 for a body that is not what the endpoint reads at all (not JSON, not multipart).
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).code("invalid_body")
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    /// 413: the body is over the server's limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body exceeds this server's limit of {limit} bytes"),
        )
        .code("request_too_large")
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {secs} s"),
        )
        .code("request_timeout")
    }

    /// 429: the queue is full; retry after `secs`.
    pub fn queue_full(capacity: usize, secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the generation queue is full ({capacity} waiting); retry in {secs} s"),
        )
        .code("queue_full");
        e.retry_after = Some(secs);
        e
    }

    /// 503 while the model loads.
    pub fn loading() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is still loading; retry shortly",
        )
        .code("model_loading");
        e.retry_after = Some(1);
        e
    }

    /// 503 once shutdown has begun.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
        .code("shutting_down")
    }

    /// 404 for an unknown path or job.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    /// 405 for a known path with another method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this path",
        )
        .code("method_not_allowed")
    }

    /// 500: something failed that the request could not have avoided.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The outcome of a cancelled job, as its status reports it (409 should a waiting client
    /// ever be answered with it: shutdown answers those with 503, and a client that went
    /// away is not answered at all).
    pub fn cancelled(step: usize) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "cancelled",
            format!("the generation was cancelled at step {step}"),
        )
        .code("cancelled")
    }

    /// The `error` object.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// A library error met while generating: the request's fault (400, under the API field's
    /// name) or the server's (500).
    pub fn from_library(e: &Error) -> Self {
        match e {
            Error::InvalidArgument { name, reason } => Self::invalid(field_of(name), reason),
            Error::Prompt(reason) => Self::invalid("prompt", reason),
            Error::InvalidImage {
                source_name,
                reason,
            } => Self::invalid("image", format!("{source_name}: {reason}")),
            Error::OutOfMemory { .. } => Self::invalid("size", e.to_string()),
            Error::Cancelled { step } => Self::cancelled(*step),
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The reason of a library error about one value, without the library's field name (the API
/// error names the field itself).
fn library_reason(e: &Error) -> String {
    match e {
        Error::InvalidArgument { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// The API field that sets the library option `name`.
fn field_of(name: &str) -> &str {
    match name {
        "prompts" => "prompt",
        "num_inference_steps" => "steps",
        "num_images_per_prompt" => "n",
        "height" | "width" => "size",
        other => other,
    }
}

/// Which endpoint a body is for: edits take images and default to the input image's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/images/generations` (and JSON jobs).
    Generation,
    /// `/v1/images/edits` (and multipart jobs).
    Edit,
}

/// Where the fields came from: multipart fields are all text, so numbers and booleans are
/// read from their text there, while JSON must give them typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A JSON object.
    Json,
    /// `multipart/form-data` text fields.
    Form,
}

/// What the server allows per request, beyond the library's own checks.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The model name `/v1/models` lists; a request's `model` must be it.
    pub model_name: String,
    /// Most images per request (`n`).
    pub max_n: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Size used when a generation names none.
    pub default_size: (usize, usize),
}

/// Most input images of one edit.
pub const MAX_IMAGES: usize = 8;
/// Longest prompt, in characters (OpenAI's own limit).
pub const MAX_PROMPT_CHARS: usize = 32_000;

/// A request read and checked: what to generate and how to describe it back.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The library request, validated, its seed fixed.
    pub request: GenerationRequest,
    /// The parameters as they will be reported back (job status, web page).
    pub parameters: Value,
}

/// Reads the fields of a generation or edit into a validated request. `images` are the
/// uploaded files of an edit, in order.
pub fn parse(
    fields: Vec<(String, Value)>,
    images: Vec<ConditionImage>,
    kind: Kind,
    source: Source,
    limits: &Limits,
) -> Result<Parsed, ApiError> {
    let mut seen = std::collections::HashSet::new();
    let mut prompt: Option<String> = None;
    let mut n = 1usize;
    let mut size: Option<(usize, usize)> = None;
    let mut auto_size = kind == Kind::Edit;
    let mut seed: Option<u64> = None;
    // OmniGen's own options, in the library's job-description type (shared with `omnigen batch`)
    let mut opts = GenerationOptions::default();

    for (name, value) in fields {
        if !seen.insert(name.clone()) {
            return Err(ApiError::invalid(&name, "given more than once"));
        }
        // Clients that send `null` for an option mean "not given".
        if value.is_null() {
            continue;
        }
        let f = Field {
            name: &name,
            value: &value,
            source,
        };
        match name.as_str() {
            "prompt" => {
                let text = f.string()?;
                if text.trim().is_empty() {
                    return Err(f.error("must not be empty"));
                }
                if text.chars().count() > MAX_PROMPT_CHARS {
                    return Err(f.error(format!("is longer than {MAX_PROMPT_CHARS} characters")));
                }
                prompt = Some(text);
            }
            "model" => {
                let model = f.string()?;
                if model != limits.model_name {
                    return Err(f.error(format!(
                        "unknown model `{model}`; this server serves `{}`",
                        limits.model_name
                    )));
                }
            }
            "n" => n = f.uint_in(1, limits.max_n)?,
            "size" => {
                let text = f.string()?;
                if text == "auto" {
                    auto_size = kind == Kind::Edit;
                    size = None;
                } else {
                    size = Some(parse_size(&text).ok_or_else(|| {
                        f.error(format!(
                            "`{text}` is not WIDTHxHEIGHT (e.g. 1024x1024) or `auto`"
                        ))
                    })?);
                    auto_size = false;
                }
            }
            "response_format" => {
                let format = f.string()?;
                if format != "b64_json" {
                    return Err(f.error(format!(
                        "`{format}` is not supported; this server answers with `b64_json`"
                    )));
                }
            }
            "output_format" => {
                let format = f.string()?;
                if format != "png" {
                    return Err(f.error(format!(
                        "`{format}` is not supported; this server writes `png`"
                    )));
                }
            }
            "background" => {
                let background = f.string()?;
                if !matches!(background.as_str(), "auto" | "opaque") {
                    return Err(f.error(format!(
                        "`{background}` is not supported; OmniGen images are opaque"
                    )));
                }
            }
            "stream" => {
                if f.boolean()? {
                    return Err(f.error("streaming is not supported; use /v1/jobs/{id}/events"));
                }
            }
            "partial_images" => {
                if f.u64()? != 0 {
                    return Err(f.error("partial images are not supported"));
                }
            }
            // OpenAI options with no OmniGen meaning: accepted so clients that always send
            // them keep working, typed so a malformed value is still refused.
            "user" | "quality" | "style" | "moderation" | "input_fidelity" => {
                f.string()?;
            }
            "output_compression" => {
                f.uint_in(0, 100)?;
            }
            "mask" => {
                return Err(f.error(
                    "masks are not supported: OmniGen edits follow the prompt's instruction",
                ))
            }
            "steps" | "num_inference_steps" => {
                if opts.steps.is_some() {
                    return Err(f.error("given twice (as `steps` and `num_inference_steps`)"));
                }
                opts.steps = Some(f.uint_in(1, limits.max_steps)?);
            }
            "guidance_scale" => opts.guidance_scale = Some(f.float()?),
            "img_guidance_scale" => opts.img_guidance_scale = Some(f.float()?),
            "seed" => seed = Some(f.u64()?),
            "negative_prompt" => opts.negative_prompt = Some(f.string()?),
            "scheduler" => {
                let name = f.string()?;
                // `flow_match_euler` is diffusers' name of the official scheduler
                let name = if name == "flow_match_euler" {
                    "euler"
                } else {
                    name.as_str()
                };
                opts.scheduler = Some(
                    name.parse::<SchedulerKind>()
                        .map_err(|e| f.error(library_reason(&e)))?,
                );
            }
            "time_shift" => opts.time_shift = Some(f.float()?),
            "cfg_range" => {
                opts.cfg_range = Some(
                    f.string()?
                        .parse::<CfgRange>()
                        .map_err(|e| f.error(library_reason(&e)))?,
                );
            }
            "sigmas" => {
                opts.sigmas = Some(
                    omnigen::pipeline::parse_sigmas(&f.string()?)
                        .map_err(|e| f.error(library_reason(&e)))?,
                );
            }
            "kv_cache" => {
                opts.kv_cache = Some(
                    f.string()?
                        .parse::<KvCache>()
                        .map_err(|e| f.error(library_reason(&e)))?,
                );
            }
            "input_latents" => {
                opts.input_latents = Some(
                    f.string()?
                        .parse::<InputLatents>()
                        .map_err(|e| f.error(library_reason(&e)))?,
                );
            }
            "separate_cfg_infer" => opts.separate_cfg_infer = Some(f.boolean()?),
            "use_img_guidance" => opts.use_img_guidance = Some(f.boolean()?),
            "use_input_image_size_as_output" => auto_size = f.boolean()?,
            "max_input_image_size" => opts.max_input_image_size = Some(f.uint_in(16, 4096)?),
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown field (see docs/serving.md for the accepted ones)",
                ))
            }
        }
    }

    let prompt = prompt.ok_or_else(|| ApiError::invalid("prompt", "is required"))?;
    if kind == Kind::Edit && images.is_empty() {
        return Err(ApiError::invalid(
            "image",
            "an edit needs at least one image",
        ));
    }
    if images.len() > MAX_IMAGES {
        return Err(ApiError::invalid(
            "image",
            format!("{} images given; at most {MAX_IMAGES}", images.len()),
        ));
    }
    if auto_size && images.is_empty() {
        return Err(ApiError::invalid(
            "size",
            "`auto` (the input image's size) needs an input image",
        ));
    }
    let text = with_placeholders(&prompt, images.len());
    let prompt = Prompt::from_text(text.clone(), images).map_err(|e| ApiError::from_library(&e))?;
    let (width, height) = size.unwrap_or(limits.default_size);
    // A drawn seed is fixed here so the answer can report it and the image can be reproduced.
    let seed = seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let request = opts.apply(
        GenerationRequest::new(prompt)
            .size(height, width)
            .num_images_per_prompt(n)
            .use_input_image_size_as_output(auto_size)
            .seed(seed),
    );
    if request.num_inference_steps > limits.max_steps {
        return Err(ApiError::invalid(
            "steps",
            format!(
                "the default of {} exceeds this server's limit of {}; give `steps`",
                request.num_inference_steps, limits.max_steps
            ),
        ));
    }
    request.validate().map_err(|e| ApiError::from_library(&e))?;
    let parameters = json!({
        "prompt": text,
        "n": n,
        "size": if auto_size { "auto".to_string() } else { format!("{width}x{height}") },
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "img_guidance_scale": request.img_guidance_scale,
        "seed": seed,
        "negative_prompt": request.negative_prompt,
        "kv_cache": request.kv_cache.name(),
        "separate_cfg_infer": request.separate_cfg_infer,
        "input_latents": request.input_latents.name(),
        "scheduler": request.scheduler.to_string(),
        "images": request.prompts[0].images().len(),
    });
    Ok(Parsed {
        request,
        parameters,
    })
}

/// `prompt` as given when it places its images itself; otherwise every image's placeholder,
/// in order, ahead of the text.
pub fn with_placeholders(prompt: &str, images: usize) -> String {
    let has_placeholder = omnigen::pipeline::parse_segments(prompt)
        .iter()
        .any(|s| matches!(s, omnigen::pipeline::PromptSegment::Image(_)));
    if has_placeholder || images == 0 {
        return prompt.to_string();
    }
    let mut text: String = (1..=images)
        .map(|k| format!("{} ", omnigen::pipeline::image_placeholder(k)))
        .collect();
    text.push_str(prompt);
    text
}

/// `"WIDTHxHEIGHT"` as `(width, height)`.
fn parse_size(text: &str) -> Option<(usize, usize)> {
    let (w, h) = text.split_once('x')?;
    let (w, h) = (w.parse().ok()?, h.parse().ok()?);
    Some((w, h))
}

/// One field's value, read as the type its name calls for.
struct Field<'a> {
    name: &'a str,
    value: &'a Value,
    source: Source,
}

impl Field<'_> {
    fn error(&self, message: impl Into<String>) -> ApiError {
        ApiError::invalid(self.name, message)
    }

    fn text(&self) -> Option<&str> {
        match (self.source, self.value) {
            (Source::Form, Value::String(s)) => Some(s.trim()),
            _ => None,
        }
    }

    fn string(&self) -> Result<String, ApiError> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            _ => Err(self.error("must be a string")),
        }
    }

    fn u64(&self) -> Result<u64, ApiError> {
        let parsed = match self.text() {
            Some(t) => t.parse().ok(),
            None => self.value.as_u64(),
        };
        parsed.ok_or_else(|| self.error("must be a non-negative integer"))
    }

    fn uint_in(&self, min: usize, max: usize) -> Result<usize, ApiError> {
        let v = self.u64()?;
        match usize::try_from(v) {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(self.error(format!("{v} is outside {min}..={max}"))),
        }
    }

    fn float(&self) -> Result<f32, ApiError> {
        let parsed = match self.text() {
            Some(t) => t.parse::<f64>().ok(),
            None => self.value.as_f64(),
        };
        match parsed {
            Some(v) if v.is_finite() && v.abs() <= f64::from(f32::MAX) => Ok(v as f32),
            _ => Err(self.error("must be a finite number")),
        }
    }

    fn boolean(&self) -> Result<bool, ApiError> {
        let parsed = match self.text() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => None,
            None => self.value.as_bool(),
        };
        parsed.ok_or_else(|| self.error("must be true or false"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            model_name: "omnigen".into(),
            max_n: 4,
            max_steps: 100,
            default_size: (64, 64),
        }
    }

    fn json_fields(v: Value) -> Vec<(String, Value)> {
        v.as_object().unwrap().clone().into_iter().collect()
    }

    fn gen(v: Value) -> Result<Parsed, ApiError> {
        parse(
            json_fields(v),
            vec![],
            Kind::Generation,
            Source::Json,
            &limits(),
        )
    }

    #[test]
    fn a_full_request_carries_every_option() {
        let p = gen(
            json!({"prompt": "a cat", "n": 2, "size": "128x64", "steps": 3,
            "guidance_scale": 2.5, "img_guidance_scale": 1.2, "seed": 7, "model": "omnigen",
            "response_format": "b64_json", "user": "u", "kv_cache": "exact",
            "negative_prompt": "dull", "separate_cfg_infer": false, "quality": "hd"}),
        )
        .unwrap();
        let r = &p.request;
        assert_eq!((r.width, r.height, r.num_images_per_prompt), (128, 64, 2));
        assert_eq!((r.num_inference_steps, r.seed), (3, Some(7)));
        assert_eq!((r.guidance_scale, r.img_guidance_scale), (2.5, 1.2));
        assert_eq!(r.kv_cache, KvCache::Exact);
        assert!(!r.separate_cfg_infer);
        assert_eq!(r.negative_prompt.as_deref(), Some("dull"));
        assert_eq!(p.parameters["size"], "128x64");
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            (json!({}), "prompt"),
            (json!({"prompt": ""}), "prompt"),
            (json!({"prompt": 3}), "prompt"),
            (json!({"prompt": "a", "n": 0}), "n"),
            (json!({"prompt": "a", "n": 5}), "n"),
            (json!({"prompt": "a", "size": "big"}), "size"),
            (json!({"prompt": "a", "size": "65x64"}), "size"),
            (json!({"prompt": "a", "steps": 0}), "steps"),
            (json!({"prompt": "a", "steps": 101}), "steps"),
            (json!({"prompt": "a", "steps": "4"}), "steps"),
            (
                json!({"prompt": "a", "guidance_scale": "x"}),
                "guidance_scale",
            ),
            (json!({"prompt": "a", "seed": -1}), "seed"),
            (json!({"prompt": "a", "model": "dall-e-3"}), "model"),
            (
                json!({"prompt": "a", "response_format": "url"}),
                "response_format",
            ),
            (json!({"prompt": "a", "kv_cache": "sometimes"}), "kv_cache"),
            (json!({"prompt": "a", "scheduler": "ddim"}), "scheduler"),
            (json!({"prompt": "a", "colour": "red"}), "colour"),
            (
                json!({"prompt": "a", "use_input_image_size_as_output": true}),
                "size",
            ),
            (json!({"prompt": "a <img><|image_1|></img>"}), "prompt"),
        ];
        for (body, field) in cases {
            let e = gen(body.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        // without `steps` the official 50 exceeds a lower server limit, and says so
        let mut small = limits();
        small.max_steps = 10;
        let e = parse(
            json_fields(json!({"prompt": "a"})),
            vec![],
            Kind::Generation,
            Source::Json,
            &small,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("steps"));
    }

    #[test]
    fn form_fields_are_read_from_text() {
        let fields = vec![
            ("prompt".to_string(), json!("make it green")),
            ("steps".to_string(), json!("2")),
            ("seed".to_string(), json!("5")),
            ("separate_cfg_infer".to_string(), json!("false")),
            ("guidance_scale".to_string(), json!("2.0")),
        ];
        let image = ConditionImage::from_rgb(16, 16, vec![0; 16 * 16 * 3]);
        let p = parse(fields, vec![image], Kind::Edit, Source::Form, &limits()).unwrap();
        assert_eq!(p.request.num_inference_steps, 2);
        assert_eq!(p.request.seed, Some(5));
        assert!(p.request.use_input_image_size_as_output);
        assert_eq!(
            p.request.prompts[0].as_text(),
            "<img><|image_1|></img> make it green"
        );
        let e = parse(
            vec![("prompt".into(), json!("x"))],
            vec![],
            Kind::Edit,
            Source::Form,
            &limits(),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("image"));
    }

    #[test]
    fn placeholders_are_added_only_where_missing() {
        assert_eq!(
            with_placeholders("x", 2),
            "<img><|image_1|></img> <img><|image_2|></img> x"
        );
        let own = "the cat in <img><|image_1|></img>";
        assert_eq!(with_placeholders(own, 1), own);
        assert_eq!(with_placeholders("x", 0), "x");
    }

    #[test]
    fn errors_have_openai_shape() {
        let e = ApiError::queue_full(4, 3);
        let body = e.body();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "queue_full");
        assert!(body["error"]["param"].is_null());
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
