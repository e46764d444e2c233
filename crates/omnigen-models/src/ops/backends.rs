//! Which of burn's backends have which kernels: the one place that names backends.

use super::KernelBackend;

#[cfg(feature = "flex")]
impl KernelBackend for burn::backend::Flex {
    const HOST_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;
    const FUSED_ATTENTION: bool = true;
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> KernelBackend for burn_ndarray::NdArray<E, I, Q>
where
    burn_ndarray::NdArrayTensor:
        From<burn_ndarray::SharedArray<E>> + From<burn_ndarray::SharedArray<I>>,
    Self: burn::tensor::backend::Backend,
{
    const HOST_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;
}

// Every op on burn's portable ops: cubecl's kernels. (Only the default element types: the
// models choose their dtype at run time, not through the backend type.)
#[cfg(feature = "cuda")]
impl KernelBackend for burn::backend::Cuda {}
