//! Which of burn's backends have which kernels: the one place that names backends.

use super::KernelBackend;

#[cfg(feature = "flex")]
impl KernelBackend for burn::backend::Flex {
    const HOST_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;
    const FUSED_ATTENTION: bool = true;
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> KernelBackend for burn::backend::NdArray<E, I, Q>
where
    Self: burn::tensor::backend::Backend,
{
    const HOST_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;
}

// Every op on burn's portable ops: cubecl's kernels.
#[cfg(feature = "cuda")]
impl<F, I> KernelBackend for burn::backend::Cuda<F, I> where Self: burn::tensor::backend::Backend {}
