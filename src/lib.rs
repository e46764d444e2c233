//! # omnigen
//!
//! OmniGen ("OmniGen: Unified Image Generation", Xiao et al., arXiv 2409.11340) in Rust on
//! [burn](https://burn.dev): one diffusion model — an SDXL VAE and a Phi-3 transformer — that
//! takes text and images interleaved in one prompt and does text-to-image, instruction editing,
//! subject-driven generation from several reference images and visual-condition generation.
//!
//! This facade re-exports the three crates of the workspace:
//! - [`core`] (`omnigen-core`): errors, configs, safetensors loading;
//! - [`models`] (`omnigen-models`): the VAE, the transformer and the schedulers, generic over
//!   any burn backend that implements [`KernelBackend`](omnigen_models::KernelBackend) (the
//!   kernel dispatch layer, `omnigen_models::ops`);
//! - [`pipeline`] (`omnigen-pipeline`): prompts, the processor and the generation loop.
//!
//! ```no_run
//! use omnigen::prelude::*;
//!
//! # fn main() -> omnigen::Result<()> {
//! let pipeline = OmniGenPipeline::<DefaultBackend>::from_dir("OmniGen-v1", &default_device())?;
//! let request = GenerationRequest::new("a red cat on a blue mat").size(512, 512).seed(7);
//! let generation = pipeline.generate(&request)?;
//! save_png("cat.png".as_ref(), &generation.images[0], &vec![])?;
//! # Ok(())
//! # }
//! ```
//!
//! The backend is chosen at compile time: `flex` (default, CPU), `ndarray` (CPU), `cuda` or `wgpu`
//! (Vulkan, Metal, DX12) (`omnigen = { features = ["cuda"] }`); see `docs/backends.md`.
#![deny(missing_docs)]

pub use omnigen_core as core;
pub use omnigen_models as models;
pub use omnigen_pipeline as pipeline;

pub use omnigen_core::{Error, Result};
pub use omnigen_pipeline::io;

/// Everything a program generating images needs, in one import.
pub mod prelude {
    pub use omnigen_core::{Error, Result};
    pub use omnigen_models::scheduler::{FlowMatchEulerScheduler, Scheduler, SchedulerKind};
    pub use omnigen_models::KernelBackend;
    #[cfg(any(
        feature = "flex",
        feature = "ndarray",
        feature = "cuda",
        feature = "wgpu"
    ))]
    pub use omnigen_models::{default_device, DefaultBackend};
    pub use omnigen_pipeline::{
        parse_sigmas, save_image, save_png, CancellationToken, CfgRange, ConditionImage,
        Generation, GenerationRequest, Hooks, ImageFormat, InitialLatents, InputLatents, KvCache,
        OmniGenPipeline, OutputMetadata, Progress, Prompt,
    };
}
