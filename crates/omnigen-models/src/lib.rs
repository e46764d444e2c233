//! # omnigen-models
//!
//! OmniGen's networks as backend-generic burn modules: the SDXL VAE ([`vae`]), the Phi-3
//! diffusion transformer ([`transformer`]) and the denoising schedulers ([`scheduler`]). No I/O
//! policy and no prompts live here: modules are built from a [`loader::WeightReader`] and driven
//! with tensors.
#![deny(missing_docs)]

pub mod backend;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod host;
pub mod loader;
pub mod lora;
pub mod scheduler;
pub mod transformer;
pub mod vae;

pub use backend::tune_host_allocator;
#[cfg(any(feature = "flex", feature = "ndarray", feature = "cuda"))]
pub use backend::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};
