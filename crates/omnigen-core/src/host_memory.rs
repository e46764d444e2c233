//! glibc's allocator settings for tensor work on the CPU, and the one exception to them:
//! loaded weights.
//!
//! [`tune_host_allocator`] serves every block from the heap (no `mmap`), so that freed
//! activations are reused instead of faulted in afresh. Weights are the opposite case: long
//! lived, written once by a read from the checkpoint. From the heap they would come as reused
//! memory that `calloc` zeroes with a `memset` (faulting every page in) before the read writes
//! it again; [`with_fresh_mappings`] lets their allocations be fresh anonymous mappings, which
//! the read faults in once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`tune_host_allocator`] turned `mmap`ped blocks off.
static HEAP_ONLY: AtomicBool = AtomicBool::new(false);

/// glibc's default `M_MMAP_MAX`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const DEFAULT_MMAP_MAX: libc::c_int = 65_536;

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
/// the working set stays mapped; the peak is the working set's either way. Weights being
/// loaded are still fresh mappings ([`with_fresh_mappings`]).
///
/// It changes process-wide malloc settings, so a library does not call it on its own: the
/// command-line tool, the examples and the benches call it first thing, and applications may.
/// The same effect without code: `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824
/// MALLOC_TOP_PAD_=67108864` (weights then come from the heap too).
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called with valid constants.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    HEAP_ONLY.store(true, Ordering::SeqCst);
}

/// Runs `alloc` with `mmap`ped blocks allowed again where [`tune_host_allocator`] turned them
/// off, so that a large allocation inside it is a fresh anonymous mapping (freed with `munmap`
/// whatever the settings are by then). An allocation another thread makes meanwhile may be
/// mapped too: either kind of block is valid, only where it lives differs.
pub fn with_fresh_mappings<R>(alloc: impl FnOnce() -> R) -> R {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if HEAP_ONLY.load(Ordering::SeqCst) {
        // SAFETY: as in `tune_host_allocator`.
        unsafe { libc::mallopt(libc::M_MMAP_MAX, DEFAULT_MMAP_MAX) };
        let out = alloc();
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) };
        return out;
    }
    alloc()
}

/// `n` zeroed values in memory that nothing has touched yet, advised to be backed by
/// transparent huge pages (Linux): a large allocation is a fresh anonymous mapping, so filling
/// it then takes one page fault per 2 MiB instead of one per 4 KiB. (`vec![T::zeroed(); n]`
/// writes every element for types without a zero-allocation shortcut, such as `bf16`.) For
/// buffers that are written once and live long: weights.
pub fn fresh_zeroed<T: bytemuck::Pod>(n: usize) -> Vec<T> {
    let Ok(layout) = std::alloc::Layout::array::<T>(n) else {
        // More bytes than the address space: the same failure `vec!` reports.
        panic!(
            "capacity overflow: {n} values of {} bytes",
            std::mem::size_of::<T>()
        );
    };
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: the layout has a non-zero size; all-zero bytes are a valid `T` (`Pod`); the
    // pointer comes from the global allocator with exactly this layout, as
    // `Vec::from_raw_parts` requires, with length = capacity = n.
    let values = unsafe {
        let ptr = with_fresh_mappings(|| std::alloc::alloc_zeroed(layout)).cast::<T>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(ptr, n, n)
    };
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let base = values.as_ptr() as usize;
        let (lo, hi) = (
            base.next_multiple_of(HUGE),
            (base + layout.size()) / HUGE * HUGE,
        );
        if hi > lo {
            // SAFETY: advice only: MADV_HUGEPAGE on whole pages inside this allocation
            // changes how the kernel backs them, never their contents. A refusal (THP off,
            // an old kernel) leaves ordinary pages, hence ignored.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    values
}
