//! # omnigen-models
//!
//! OmniGen's networks as backend-generic burn modules: the SDXL VAE ([`vae`]), the Phi-3
//! diffusion transformer ([`transformer`]) and the denoising schedulers ([`scheduler`]). No I/O
//! policy and no prompts live here: modules are built from a [`weights::WeightReader`] and driven
//! with tensors; every op with a backend-specific kernel goes through [`ops`].
#![deny(missing_docs)]

pub mod backend;
pub mod loader;
pub mod lora;
pub mod ops;
pub mod scheduler;
pub mod transformer;
pub mod vae;
pub mod weights;

pub use backend::tune_host_allocator;
#[cfg(any(
    feature = "flex",
    feature = "ndarray",
    feature = "cuda",
    feature = "wgpu"
))]
pub use backend::{default_device, DefaultBackend, DEFAULT_BACKEND_NAME};
pub use ops::KernelBackend;
