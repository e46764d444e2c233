//! The one error type of omnigen-rs.
//!
//! Every variant names the thing at fault (a file, a tensor, an argument) so that the message
//! alone tells a person what to fix.

use std::path::PathBuf;

/// Result alias used throughout omnigen-rs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading a checkpoint, building a prompt or generating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was attempted ("read", "open", "write", ...).
        action: &'static str,
        /// The file at fault.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// A configuration file is missing, not JSON, or lacks a required field.
    #[error("malformed config {path}: {reason}")]
    Config {
        /// The config file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A safetensors file is truncated, corrupt, or its header is inconsistent with its size.
    #[error("corrupt weights file {path}: {reason}")]
    CorruptWeights {
        /// The weight file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{name}` is missing from {path}")]
    MissingTensor {
        /// The checkpoint key that was looked up.
        name: String,
        /// The weight file (or directory) searched.
        path: PathBuf,
    },

    /// A tensor has a shape other than the one the configuration implies.
    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint key.
        name: String,
        /// The weight file.
        path: PathBuf,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A tensor is stored with a dtype that cannot be read as floating point weights.
    #[error("tensor `{name}` in {path} has dtype {found}, expected one of F32, F16, BF16")]
    UnsupportedDtype {
        /// The checkpoint key.
        name: String,
        /// The weight file.
        path: PathBuf,
        /// The dtype stored in the file.
        found: String,
    },

    /// The checkpoint's key names match neither the official nor the diffusers layout.
    #[error("cannot recognise the checkpoint layout of {path}: {reason}")]
    UnknownLayout {
        /// The weight file.
        path: PathBuf,
        /// Which keys were probed.
        reason: String,
    },

    /// A user-supplied argument is out of range or inconsistent with another.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument (builder method, CLI flag or field) at fault.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// An input image could not be read or decoded, or is empty.
    #[error("invalid image {source_name}: {reason}")]
    InvalidImage {
        /// The path, or a description such as "image 2 (raw buffer)".
        source_name: String,
        /// Why it was refused.
        reason: String,
    },

    /// The prompt's image placeholders do not match the images given.
    #[error("prompt error: {0}")]
    Prompt(String),

    /// The tokenizer could not be loaded or failed to encode text.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The request would not fit in the memory available.
    #[error(
        "request needs about {needed_mib} MiB but only {available_mib} MiB is available; {hint}"
    )]
    OutOfMemory {
        /// Estimated memory the request needs.
        needed_mib: u64,
        /// Memory available.
        available_mib: u64,
        /// Which option would make it fit.
        hint: String,
    },

    /// A model could not be found locally or fetched from the hub.
    #[error("cannot resolve model `{id}`: {reason}")]
    ModelNotFound {
        /// The hub id or directory given.
        id: String,
        /// What was tried and how to fix it.
        reason: String,
    },

    /// A stage produced NaN or infinite values: non-finite weights, a LoRA or a guidance scale
    /// that overflows. Reported instead of writing an all-black image.
    #[error(
        "the {stage} produced non-finite values (NaN or infinity){}; check the weights \
         (`omnigen inspect`), LoRA scales and guidance scales",
        at_step(.step)
    )]
    NonFinite {
        /// The stage whose output was checked: "denoising", "input-image encoding", "VAE decode".
        stage: &'static str,
        /// The denoising step (0-based), for the denoising stage.
        step: Option<usize>,
    },

    /// Generation was cancelled through its cancellation token.
    #[error("generation cancelled at step {step}")]
    Cancelled {
        /// The denoising step at which cancellation was observed.
        step: usize,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid_argument(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// " at step N" for a step, nothing otherwise.
fn at_step(step: &Option<usize>) -> String {
    step.map(|s| format!(" at step {s}")).unwrap_or_default()
}

/// [`Error::ModelNotFound`] for the folder `dir`, with `reason`.
pub(crate) fn missing_in(dir: &std::path::Path, reason: String) -> Error {
    Error::ModelNotFound {
        id: dir.display().to_string(),
        reason,
    }
}
