//! The OmniGen processor: instruction template, tokenisation, guidance branches, batching.
//!
//! Mirrors the official `OmniGenProcessor.__call__` (OmniGen 1.0.3) together with the checks
//! the official pipeline does before calling it.

use std::path::{Path, PathBuf};

use omnigen_core::{Error, ModelFolder, Result};
use tokenizers::Tokenizer;

use crate::collator::{collate, ModelInput, TokenizedRow};
use crate::image_preprocess::{preprocess_image, PreprocessedImage};
use crate::prompt::{image_placeholder, parse_segments, Prompt, PromptSegment};

/// The negative prompt the official processor uses when none is given.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers.";

/// Token id of `<s>`, which the tokenizer prepends to every chunk.
const BOS_TOKEN_ID: u32 = 1;

/// Wraps a prompt in the instruction template (the official `add_prefix_instruction`).
pub fn add_prefix_instruction(prompt: &str) -> String {
    format!(
        "<|user|>\nGenerate an image according to the following instructions\n{prompt}<|end|>\n<|assistant|>\n<|diffusion|>"
    )
}

/// Options of a processor call; [`Default`] gives the official pipeline defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorOptions {
    /// Output height in pixels; a positive multiple of 16 (default 1024).
    pub height: usize,
    /// Output width in pixels; a positive multiple of 16 (default 1024).
    pub width: usize,
    /// Negative prompt of the unconditional branch; `None` = [`DEFAULT_NEGATIVE_PROMPT`].
    pub negative_prompt: Option<String>,
    /// Add the image-conditional branch when a prompt has images (default true).
    pub use_img_guidance: bool,
    /// Longest side input images are resized to (default 1024).
    pub max_input_image_size: u32,
    /// Use the (single) input image's processed size as the output size (default false).
    pub use_input_image_size_as_output: bool,
    /// One forward per guidance branch instead of one joint batch (default true).
    pub separate_cfg_infer: bool,
}

impl Default for ProcessorOptions {
    fn default() -> Self {
        Self {
            height: 1024,
            width: 1024,
            negative_prompt: None,
            use_img_guidance: true,
            max_input_image_size: 1024,
            use_input_image_size_as_output: false,
            separate_cfg_infer: true,
        }
    }
}

/// A classifier-free-guidance branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// The user's prompt with its images.
    Cond,
    /// The negative prompt, no images.
    Uncond,
    /// The images alone (`<img><|image_1|></img> <img><|image_2|></img> ...`), no instruction.
    ImgCond,
}

/// The guidance batch in one of the two official forms.
#[derive(Debug, Clone, PartialEq)]
pub enum GuidanceInputs {
    /// `separate_cfg_infer = true`: one [`ModelInput`] per branch, each holding every
    /// prompt's row for that branch (the official `OmniGenSeparateCollator`).
    Separate(Vec<(Branch, ModelInput)>),
    /// `separate_cfg_infer = false`: one [`ModelInput`] with rows
    /// `[cond_1..cond_n, uncond_1..uncond_n, imgcond_1..imgcond_n]` (`OmniGenCollator`).
    Joint(ModelInput),
}

/// Everything the pipeline needs from the processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedBatch {
    /// Number of prompts (n).
    pub num_prompts: usize,
    /// The branches in row/group order: `[Cond, Uncond]` or `[Cond, Uncond, ImgCond]`.
    pub branches: Vec<Branch>,
    /// Output image height in pixels.
    pub height: usize,
    /// Output image width in pixels.
    pub width: usize,
    /// The model inputs.
    pub inputs: GuidanceInputs,
}

impl ProcessedBatch {
    /// True when the image-conditional branch is present (3-branch guidance).
    pub fn uses_img_guidance(&self) -> bool {
        self.branches.contains(&Branch::ImgCond)
    }

    /// The model inputs in forward order (one per branch, or the single joint batch).
    pub fn model_inputs(&self) -> Vec<&ModelInput> {
        match &self.inputs {
            GuidanceInputs::Separate(groups) => groups.iter().map(|(_, m)| m).collect(),
            GuidanceInputs::Joint(m) => vec![m],
        }
    }
}

/// Tokenizer plus the official prompt processing.
#[derive(Clone)]
pub struct OmniGenProcessor {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
}

impl std::fmt::Debug for OmniGenProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OmniGenProcessor")
            .field("tokenizer_path", &self.tokenizer_path)
            .finish()
    }
}

impl OmniGenProcessor {
    /// Loads the tokenizer of a model directory: `DIR/tokenizer.json` (official layout) or
    /// `DIR/tokenizer/tokenizer.json` (diffusers layout), as [`ModelFolder::tokenizer`] finds it.
    /// A folder without one is an [`Error::Tokenizer`] naming the file looked for.
    pub fn from_dir(model_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = model_dir.as_ref();
        let path = ModelFolder::open(dir)
            .and_then(|folder| folder.tokenizer())
            .map_err(|e| match e {
                Error::ModelNotFound { reason, .. } => Error::Tokenizer {
                    path: dir.to_path_buf(),
                    reason,
                },
                other => other,
            })?;
        Self::from_tokenizer_file(path)
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_tokenizer_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            tokenizer,
            tokenizer_path: path.to_path_buf(),
        })
    }

    /// Tokenises text like the official `tokenizer(text).input_ids` (BOS prepended).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                reason: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The token strings of `ids` (for debugging and golden tests).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The official `process_multi_modal_prompt`: wraps `prompt` in the template, splits it
    /// on placeholders, tokenises each chunk (dropping the BOS of chunks after the first) and
    /// inserts a run of id 0 per placeholder, sized to that image's token count.
    ///
    /// `images[k-1]` is the processed image of `<|image_k|>`. The placeholders are expected
    /// to have been checked against the images; an out-of-range placeholder is an error.
    pub fn tokenize_prompt(
        &self,
        prompt: &str,
        images: &[PreprocessedImage],
    ) -> Result<TokenizedRow> {
        let text = add_prefix_instruction(prompt);
        if images.is_empty() {
            let ids = self.encode(&text)?;
            return Ok(TokenizedRow {
                input_ids: ids.into_iter().map(i64::from).collect(),
                images: Vec::new(),
                image_spans: Vec::new(),
            });
        }
        let mut row = TokenizedRow {
            input_ids: Vec::new(),
            images: Vec::new(),
            image_spans: Vec::new(),
        };
        for (i, segment) in parse_segments(&text).into_iter().enumerate() {
            match segment {
                PromptSegment::Text(chunk) => {
                    let ids = self.encode(&chunk)?;
                    // Every chunk gets a BOS from the tokenizer; only the first keeps it.
                    let skip = usize::from(i > 0 && ids.first() == Some(&BOS_TOKEN_ID));
                    row.input_ids
                        .extend(ids[skip..].iter().map(|&id| i64::from(id)));
                }
                PromptSegment::Image(k) => {
                    let image = usize::try_from(k)
                        .ok()
                        .and_then(|k| k.checked_sub(1))
                        .and_then(|k| images.get(k))
                        .ok_or_else(|| {
                            Error::Prompt(format!(
                                "placeholder <|image_{k}|> names an image that was not given ({} given)",
                                images.len()
                            ))
                        })?;
                    let start = row.input_ids.len();
                    let n = image.num_tokens();
                    row.input_ids.extend(std::iter::repeat_n(0i64, n));
                    row.image_spans.push((start, start + n));
                    row.images.push(image.clone());
                }
            }
        }
        Ok(row)
    }

    /// Processes prompts into the guidance batch, as the official pipeline + processor do.
    ///
    /// Errors: [`Error::InvalidArgument`] for no prompts, an output size that is not a
    /// positive multiple of 16, `max_input_image_size == 0`, or
    /// `use_input_image_size_as_output` without exactly one prompt with exactly one image;
    /// [`Error::Prompt`] for an empty prompt or placeholders that do not match the images;
    /// [`Error::InvalidImage`] for an unreadable or empty image; [`Error::Tokenizer`].
    ///
    /// Image guidance is on when `use_img_guidance` is set and at least one prompt has images
    /// (the official pipeline turns it off when no images are given at all); a prompt without
    /// images then uses its negative row as its image-conditional row, as officially.
    pub fn process(
        &self,
        prompts: &[Prompt],
        options: &ProcessorOptions,
    ) -> Result<ProcessedBatch> {
        if prompts.is_empty() {
            return Err(Error::invalid_argument(
                "prompts",
                "at least one prompt is required",
            ));
        }
        if options.max_input_image_size == 0 {
            return Err(Error::invalid_argument(
                "max_input_image_size",
                "must be at least 1",
            ));
        }
        if options.use_input_image_size_as_output {
            if prompts.len() != 1 || prompts[0].images().len() != 1 {
                return Err(Error::invalid_argument(
                    "use_input_image_size_as_output",
                    "needs exactly one prompt with exactly one input image",
                ));
            }
        } else {
            for (name, v) in [("height", options.height), ("width", options.width)] {
                if v == 0 || v % 16 != 0 {
                    return Err(Error::invalid_argument(
                        name,
                        format!("{v} is not a positive multiple of 16"),
                    ));
                }
            }
        }
        for prompt in prompts {
            prompt.check()?;
        }
        let use_img_cfg =
            options.use_img_guidance && prompts.iter().any(|p| !p.images().is_empty());
        let negative = options
            .negative_prompt
            .as_deref()
            .unwrap_or(DEFAULT_NEGATIVE_PROMPT);

        let mut cond_rows = Vec::with_capacity(prompts.len());
        let mut uncond_rows = Vec::with_capacity(prompts.len());
        let mut img_rows = Vec::new();
        let mut sizes = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let images = prompt
                .images()
                .iter()
                .map(|img| {
                    let rgb = img.load_rgb8()?;
                    preprocess_image(&rgb, options.max_input_image_size, &img.describe())
                })
                .collect::<Result<Vec<_>>>()?;
            let cond = self.tokenize_prompt(prompt.as_text(), &images)?;
            let uncond = self.tokenize_prompt(negative, &[])?;
            if use_img_cfg {
                if images.is_empty() {
                    img_rows.push(uncond.clone());
                } else {
                    let text = (1..=images.len())
                        .map(image_placeholder)
                        .collect::<Vec<_>>()
                        .join(" ");
                    img_rows.push(self.tokenize_prompt(&text, &images)?);
                }
            }
            // The official code takes the first consumed image (first placeholder's image).
            let size = match (options.use_input_image_size_as_output, cond.images.first()) {
                (true, Some(first)) => (first.height, first.width),
                _ => (options.height, options.width),
            };
            sizes.push(size);
            cond_rows.push(cond);
            uncond_rows.push(uncond);
        }

        let mut branches = vec![Branch::Cond, Branch::Uncond];
        if use_img_cfg {
            branches.push(Branch::ImgCond);
        }
        let (height, width) = sizes[0];
        let inputs = if options.separate_cfg_infer {
            let mut groups = vec![
                (Branch::Cond, collate(&cond_rows, &sizes)),
                (Branch::Uncond, collate(&uncond_rows, &sizes)),
            ];
            if use_img_cfg {
                groups.push((Branch::ImgCond, collate(&img_rows, &sizes)));
            }
            GuidanceInputs::Separate(groups)
        } else {
            let mut rows = cond_rows;
            rows.extend(uncond_rows);
            rows.extend(img_rows);
            let all_sizes: Vec<_> = sizes.iter().copied().cycle().take(rows.len()).collect();
            GuidanceInputs::Joint(collate(&rows, &all_sizes))
        };
        Ok(ProcessedBatch {
            num_prompts: prompts.len(),
            branches,
            height,
            width,
            inputs,
        })
    }
}
