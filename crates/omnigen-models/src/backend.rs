//! The backend chosen at compile time by cargo feature.
//!
//! | feature | backend | device |
//! |---|---|---|
//! | `flex` (default) | `burn::backend::Flex` — pure Rust, SIMD GEMM, threads, fused attention | CPU |
//! | `ndarray` | `burn::backend::NdArray` | CPU |
//! | `cuda` | `burn::backend::Cuda` (loads the CUDA driver at run time) | GPU 0 |
//! | `wgpu` | `burn::backend::Wgpu` (WGSL through wgpu: Vulkan, Metal, DX12) | the best adapter wgpu finds |
//!
//! When several features are on, `cuda` wins over `wgpu`, which wins over `flex`, which wins
//! over `ndarray`. Every module
//! in this crate is generic over [`KernelBackend`](crate::KernelBackend) (a burn `Backend` with
//! the capabilities that pick its kernels), so any other burn backend works too after an empty
//! `impl KernelBackend`; these aliases only make the common case one line.

#[cfg(feature = "cuda")]
mod chosen {
    /// The backend selected by cargo features.
    pub type DefaultBackend = burn::backend::Cuda<f32, i32>;
    /// Human-readable backend name.
    pub const NAME: &str = "cuda";
}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
mod chosen {
    /// The backend selected by cargo features.
    pub type DefaultBackend = burn::backend::Wgpu<f32, i32>;
    /// Human-readable backend name.
    pub const NAME: &str = "wgpu";
}

#[cfg(all(feature = "flex", not(any(feature = "cuda", feature = "wgpu"))))]
mod chosen {
    /// The backend selected by cargo features.
    pub type DefaultBackend = burn::backend::Flex<f32, i32>;
    /// Human-readable backend name.
    pub const NAME: &str = "flex";
}

#[cfg(all(
    feature = "ndarray",
    not(any(feature = "flex", feature = "cuda", feature = "wgpu"))
))]
mod chosen {
    /// The backend selected by cargo features.
    pub type DefaultBackend = burn::backend::NdArray<f32, i64>;
    /// Human-readable backend name.
    pub const NAME: &str = "ndarray";
}

#[cfg(any(
    feature = "flex",
    feature = "ndarray",
    feature = "cuda",
    feature = "wgpu"
))]
pub use chosen::{DefaultBackend, NAME as DEFAULT_BACKEND_NAME};

/// The default device of [`DefaultBackend`].
#[cfg(any(
    feature = "flex",
    feature = "ndarray",
    feature = "cuda",
    feature = "wgpu"
))]
pub fn default_device() -> burn::tensor::Device<DefaultBackend> {
    Default::default()
}

pub use omnigen_core::tune_host_allocator;
