//! Multimodal prompts: text interleaved with condition images.
//!
//! OmniGen's official text form marks where an image goes with a numbered placeholder,
//! `"the man in <img><|image_1|></img> waves"`, and takes the images as a separate list
//! (`<|image_k|>` names the k-th image, 1-based). [`Prompt`] holds exactly that pair. It can be
//! built from the text form ([`Prompt::from_text`]) or with a builder that interleaves text and
//! images ([`Prompt::new`]`.text(..).image(..)`); both produce the same value.
//!
//! Only the `<|image_N|>` tag is a placeholder, as in the official processor (which splits on
//! the regex `<\|image_\d+\|>`); the `<img>` / `</img>` around it are ordinary text that the
//! model was trained to see. `N` is read as ASCII digits (Python's `\d` would also accept other
//! Unicode decimal digits; such tags are treated as plain text here).

use std::fmt;
use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};
use omnigen_core::{Error, Result, MAX_IMAGE_FILE_BYTES};

/// Where a condition image comes from. Decoding is deferred until the processor needs the
/// pixels, so building a prompt never fails on the image itself.
#[derive(Debug, Clone)]
enum ImageSource {
    Path(PathBuf),
    Dynamic(DynamicImage),
    Rgb {
        width: u32,
        height: u32,
        data: Vec<u8>,
    },
}

/// One input image of a prompt (the thing an `<|image_k|>` placeholder names).
///
/// Any source is converted to 8-bit RGB exactly as the official `Image.open(..).convert("RGB")`
/// does for common formats: grey is replicated, alpha is dropped (not composited).
#[derive(Debug, Clone)]
pub struct ConditionImage {
    source: ImageSource,
}

impl ConditionImage {
    /// An image file (PNG or JPEG), read when the prompt is processed.
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        Self {
            source: ImageSource::Path(path.into()),
        }
    }

    /// An image already decoded by the `image` crate.
    pub fn from_dynamic(image: DynamicImage) -> Self {
        Self {
            source: ImageSource::Dynamic(image),
        }
    }

    /// A raw, row-major, interleaved RGB8 buffer of `width * height * 3` bytes.
    ///
    /// The length is checked when the prompt is processed ([`Error::InvalidImage`]).
    pub fn from_rgb(width: u32, height: u32, data: Vec<u8>) -> Self {
        Self {
            source: ImageSource::Rgb {
                width,
                height,
                data,
            },
        }
    }

    /// The file the image is read from, when it comes from one.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            ImageSource::Path(p) => Some(p),
            _ => None,
        }
    }

    /// A short human-readable name of the source, used in error messages.
    pub fn describe(&self) -> String {
        match &self.source {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Dynamic(img) => {
                format!("in-memory image {}x{}", img.width(), img.height())
            }
            ImageSource::Rgb { width, height, .. } => format!("raw RGB buffer {width}x{height}"),
        }
    }

    /// Decodes the image to 8-bit RGB.
    ///
    /// Fails with [`Error::InvalidImage`] if the file cannot be read or decoded, the raw buffer
    /// has the wrong length, or the image has zero width or height.
    pub fn load_rgb8(&self) -> Result<RgbImage> {
        let invalid = |reason: String| Error::InvalidImage {
            source_name: self.describe(),
            reason,
        };
        let rgb =
            match &self.source {
                ImageSource::Path(path) => {
                    let file = omnigen_core::open_regular(path, Some(MAX_IMAGE_FILE_BYTES))
                        .map_err(|e| match e {
                            Error::Io { source, .. } => invalid(source.to_string()),
                            other => other,
                        })?;
                    let reader = image::ImageReader::new(std::io::BufReader::new(file))
                        .with_guessed_format()
                        .map_err(|e| invalid(format!("cannot read: {e}")))?;
                    reader
                        .decode()
                        .map_err(|e| invalid(format!("cannot decode: {e}")))?
                        .to_rgb8()
                }
                ImageSource::Dynamic(img) => img.to_rgb8(),
                ImageSource::Rgb {
                    width,
                    height,
                    data,
                } => {
                    let expected = (*width as u64) * (*height as u64) * 3;
                    if data.len() as u64 != expected {
                        return Err(invalid(format!(
                            "buffer holds {} bytes, {width}x{height} RGB needs {expected}",
                            data.len()
                        )));
                    }
                    RgbImage::from_raw(*width, *height, data.clone())
                        .ok_or_else(|| invalid("buffer does not match its size".to_string()))?
                }
            };
        if rgb.width() == 0 || rgb.height() == 0 {
            return Err(invalid(format!(
                "image is empty ({}x{})",
                rgb.width(),
                rgb.height()
            )));
        }
        Ok(rgb)
    }
}

impl From<DynamicImage> for ConditionImage {
    fn from(image: DynamicImage) -> Self {
        Self::from_dynamic(image)
    }
}

impl From<RgbImage> for ConditionImage {
    fn from(image: RgbImage) -> Self {
        Self::from_dynamic(DynamicImage::ImageRgb8(image))
    }
}

impl From<PathBuf> for ConditionImage {
    fn from(path: PathBuf) -> Self {
        Self::from_path(path)
    }
}

impl From<&Path> for ConditionImage {
    fn from(path: &Path) -> Self {
        Self::from_path(path)
    }
}

/// A piece of a parsed prompt text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSegment {
    /// Literal text, passed to the tokenizer as is (may be empty between adjacent placeholders).
    Text(String),
    /// An `<|image_N|>` placeholder; the number as written, 1-based (`u64::MAX` if it overflows).
    Image(u64),
}

/// Why a prompt's placeholders do not fit its images. Reported as [`Error::Prompt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptError {
    /// The text has no content (and no images) although a prompt is required.
    Empty,
    /// A placeholder names an image beyond the images given.
    MissingImage {
        /// The number in the placeholder.
        placeholder: u64,
        /// How many images were given.
        images_given: usize,
    },
    /// A placeholder's number is too large to be any image (beyond `u64`).
    NumberOutOfRange {
        /// The digits as written (the middle elided past 40 digits).
        digits: String,
        /// How many images were given.
        images_given: usize,
    },
    /// The placeholder numbers are not 1..=n (a gap, or a `0`).
    BadNumbering {
        /// The distinct numbers found, sorted.
        found: Vec<u64>,
    },
    /// Images were given that no placeholder uses.
    UnusedImages {
        /// How many distinct images the placeholders use.
        used: usize,
        /// How many images were given.
        given: usize,
    },
}

impl fmt::Display for PromptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromptError::Empty => write!(f, "the prompt is empty"),
            PromptError::MissingImage {
                placeholder,
                images_given,
            } => write!(
                f,
                "placeholder <|image_{placeholder}|> names an image that was not given \
                 ({images_given} image(s) given)"
            ),
            PromptError::NumberOutOfRange {
                digits,
                images_given,
            } => write!(
                f,
                "placeholder <|image_{digits}|> names an image that was not given \
                 ({images_given} image(s) given)"
            ),
            PromptError::BadNumbering { found } => write!(
                f,
                "image placeholders must be numbered 1..n without gaps, found {found:?}"
            ),
            PromptError::UnusedImages { used, given } => write!(
                f,
                "{given} image(s) given but the placeholders use only {used}; \
                 add <img><|image_k|></img> for each image"
            ),
        }
    }
}

impl std::error::Error for PromptError {}

impl From<PromptError> for Error {
    fn from(e: PromptError) -> Self {
        Error::Prompt(e.to_string())
    }
}

/// One `<|image_N|>` tag of a prompt text: its byte range and its digits as written.
struct Tag<'a> {
    start: usize,
    end: usize,
    digits: &'a str,
}

/// The `<|image_N|>` tags of `text`, in order, exactly where the official regex
/// `<\|image_\d+\|>` finds them (ASCII digits).
fn tags(text: &str) -> Vec<Tag<'_>> {
    const OPEN: &str = "<|image_";
    let mut out = Vec::new();
    let mut search_from = 0;
    while let Some(rel) = text[search_from..].find(OPEN) {
        let start = search_from + rel;
        let digits_start = start + OPEN.len();
        let digits_len = text[digits_start..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let digits_end = digits_start + digits_len;
        if digits_len > 0 && text[digits_end..].starts_with("|>") {
            out.push(Tag {
                start,
                end: digits_end + 2,
                digits: &text[digits_start..digits_end],
            });
            search_from = digits_end + 2;
        } else {
            // Not a placeholder: resume right after this '<' (a later '<|image_' may overlap).
            search_from = start + 1;
        }
    }
    out
}

/// Splits a prompt text on `<|image_N|>` placeholders, exactly where the official regex
/// `<\|image_\d+\|>` splits (ASCII digits). The result alternates text and placeholders and
/// always starts and ends with a text segment (possibly empty), so there is one more text
/// segment than placeholders — the official `re.split` chunk list.
pub fn parse_segments(text: &str) -> Vec<PromptSegment> {
    let mut segments = Vec::new();
    let mut chunk_start = 0;
    for tag in tags(text) {
        segments.push(PromptSegment::Text(
            text[chunk_start..tag.start].to_string(),
        ));
        segments.push(PromptSegment::Image(tag.digits.parse().unwrap_or(u64::MAX)));
        chunk_start = tag.end;
    }
    segments.push(PromptSegment::Text(text[chunk_start..].to_string()));
    segments
}

/// `digits` for a message: whole up to 40 digits, else the first and last 10 with the count.
fn abbreviate_digits(digits: &str) -> String {
    // ASCII digits only, so byte slicing is on character boundaries.
    if digits.len() <= 40 {
        return digits.to_string();
    }
    let n = digits.len();
    format!("{}…{} ({n} digits)", &digits[..10], &digits[n - 10..])
}

/// The official text form of image placeholder `k` (1-based): `<img><|image_k|></img>`.
pub fn image_placeholder(k: usize) -> String {
    format!("<img><|image_{k}|></img>")
}

/// Checks the placeholders of `text` against `num_images` images, with the official rules
/// (distinct numbers exactly 1..=n, n == number of images; a number may repeat) plus an error
/// for an empty prompt. Returns the placeholder numbers in order of appearance (1-based).
pub fn check_placeholders(
    text: &str,
    num_images: usize,
) -> std::result::Result<Vec<u64>, PromptError> {
    if text.trim().is_empty() && num_images == 0 {
        return Err(PromptError::Empty);
    }
    let mut used = Vec::new();
    for tag in tags(text) {
        let Ok(k) = tag.digits.parse::<u64>() else {
            // Past u64: report the number as written, not a saturated stand-in.
            return Err(PromptError::NumberOutOfRange {
                digits: abbreviate_digits(tag.digits),
                images_given: num_images,
            });
        };
        used.push(k);
    }
    if let Some(&k) = used.iter().find(|&&k| k != 0 && k > num_images as u64) {
        return Err(PromptError::MissingImage {
            placeholder: k,
            images_given: num_images,
        });
    }
    let mut distinct = used.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.iter().enumerate().any(|(i, &k)| k != i as u64 + 1) {
        return Err(PromptError::BadNumbering { found: distinct });
    }
    if distinct.len() != num_images {
        return Err(PromptError::UnusedImages {
            used: distinct.len(),
            given: num_images,
        });
    }
    Ok(used)
}

/// A multimodal prompt: the official text form plus the images its placeholders name.
///
/// ```
/// use omnigen_pipeline::{ConditionImage, Prompt};
/// let img = ConditionImage::from_rgb(1, 1, vec![0, 0, 0]);
/// let built = Prompt::new().text("the man in ").image(img.clone()).text(" waves");
/// let parsed = Prompt::from_text("the man in <img><|image_1|></img> waves", vec![img]).unwrap();
/// assert_eq!(built.as_text(), parsed.as_text());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    text: String,
    images: Vec<ConditionImage>,
}

/// The serde form of a [`Prompt`]: its text and the paths of its images.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptForm {
    text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    images: Vec<PathBuf>,
}

/// `{"text": "... <img><|image_1|></img> ...", "images": ["a.png"]}`. Only images read from
/// files have a serde form: serializing a prompt with an in-memory image fails, naming it.
impl serde::Serialize for Prompt {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let images = self
            .images
            .iter()
            .map(|im| {
                im.path().map(Path::to_path_buf).ok_or_else(|| {
                    serde::ser::Error::custom(format!(
                        "{} has no serde form: only images read from files do",
                        im.describe()
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, S::Error>>()?;
        PromptForm {
            text: self.text.clone(),
            images,
        }
        .serialize(serializer)
    }
}

/// Reads the form [`Serialize`](serde::Serialize) writes, checked as [`Prompt::from_text`]
/// checks (the images are not read).
impl<'de> serde::Deserialize<'de> for Prompt {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let form = PromptForm::deserialize(deserializer)?;
        let images = form
            .images
            .into_iter()
            .map(ConditionImage::from_path)
            .collect();
        Prompt::from_text(form.text, images).map_err(serde::de::Error::custom)
    }
}

impl Prompt {
    /// An empty prompt, to be filled with [`Prompt::text`] and [`Prompt::image`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends literal text (no space is inserted). Text that itself contains `<|image_N|>`
    /// tags is taken as the official form would take it, and is checked at processing time.
    pub fn text(mut self, text: impl AsRef<str>) -> Self {
        self.text.push_str(text.as_ref());
        self
    }

    /// Appends a new image as `<img><|image_k|></img>`, k = the number of images so far + 1.
    pub fn image(mut self, image: impl Into<ConditionImage>) -> Self {
        self.images.push(image.into());
        self.text.push_str(&image_placeholder(self.images.len()));
        self
    }

    /// A prompt in the official text form with its images (`images[k-1]` is `<|image_k|>`).
    ///
    /// Fails with [`Error::Prompt`] if the placeholders do not match the images
    /// (see [`check_placeholders`]) or the prompt is empty.
    pub fn from_text(text: impl Into<String>, images: Vec<ConditionImage>) -> Result<Self> {
        let prompt = Self {
            text: text.into(),
            images,
        };
        prompt.check()?;
        Ok(prompt)
    }

    /// A text-only prompt; fails like [`Prompt::from_text`] (e.g. it contains a placeholder).
    pub fn from_str_checked(text: impl Into<String>) -> Result<Self> {
        Self::from_text(text, Vec::new())
    }

    /// The official text form (what the official pipeline takes as `prompt`).
    pub fn as_text(&self) -> &str {
        &self.text
    }

    /// The images, in placeholder order (`images()[k-1]` is `<|image_k|>`).
    pub fn images(&self) -> &[ConditionImage] {
        &self.images
    }

    /// The text split on placeholders (see [`parse_segments`]).
    pub fn segments(&self) -> Vec<PromptSegment> {
        parse_segments(&self.text)
    }

    /// Checks placeholders against images; returns the 1-based placeholder numbers in order.
    pub fn check(&self) -> std::result::Result<Vec<u64>, PromptError> {
        check_placeholders(&self.text, self.images.len())
    }
}

impl From<&str> for Prompt {
    /// A text-only prompt (not checked until processed).
    fn from(text: &str) -> Self {
        Self {
            text: text.to_string(),
            images: Vec::new(),
        }
    }
}

impl From<String> for Prompt {
    /// A text-only prompt (not checked until processed).
    fn from(text: String) -> Self {
        Self {
            text,
            images: Vec::new(),
        }
    }
}
