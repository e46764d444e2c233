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

/// Tunes glibc's allocator for tensor work on the CPU backends (Linux/glibc; a no-op elsewhere).
///
/// burn's CPU backends and the host kernels allocate a fresh buffer for almost every op. glibc
/// serves blocks above its mmap threshold (128 KiB, growing dynamically, at most 32 MiB) with
/// `mmap`, so every such op pays page faults on fresh zeroed pages and an `munmap` when the
/// tensor drops: about 12 % of a cached transformer step, and a fifth of a 1024² VAE pass,
/// whose full-resolution activations are hundreds of MiB each. Here no block is mmapped
/// (`M_MMAP_MAX` 0): every one comes from the heap, and freed memory stays there for the next
/// op (trim threshold 1 GiB, top pad 64 MiB) instead of being faulted in afresh
/// (docs/performance.md has the measurements). The price: up to 1 GiB of freed memory beyond
/// the working set stays mapped; the peak is the working set's either way.
///
/// It changes process-wide malloc settings, so a library does not call it on its own: the
/// command-line tool, the examples and the benches call it first thing, and applications may.
/// The same effect without code: `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824
/// MALLOC_TOP_PAD_=67108864`.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called with valid constants.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
