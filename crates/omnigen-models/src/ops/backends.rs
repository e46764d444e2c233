//! Which of burn's backends have which kernels: the one place that names backends.

use super::KernelBackend;

#[cfg(feature = "flex")]
impl KernelBackend for burn::backend::Flex {
    const HOST_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;
    const FUSED_ATTENTION: bool = true;
    const MIXED_PRECISION_LINEAR: bool = true;
    // `gemm` (burn-flex's matmul) packs a row-major right-hand side faster than a column-major
    // one at the real width (`docs/performance.md`, "2026-12-03 (Zen 4): f32 linear weights
    // stored input-major").
    const F32_LINEAR_INPUT_MAJOR: bool = true;

    fn float_bytes(tensor: &burn_flex::FlexTensor) -> Option<&[u8]> {
        flex_bytes(tensor)
    }

    fn int_bytes(tensor: &burn_flex::FlexTensor) -> Option<&[u8]> {
        flex_bytes(tensor)
    }
}

/// A Flex tensor's storage, when it is exactly the tensor's elements in row-major order.
#[cfg(feature = "flex")]
fn flex_bytes(tensor: &burn_flex::FlexTensor) -> Option<&[u8]> {
    let layout = tensor.layout();
    let len = layout.num_elements() * tensor.dtype().size();
    let bytes = tensor.bytes();
    (layout.is_contiguous() && layout.start_offset() == 0 && bytes.len() >= len)
        .then(|| &bytes[..len])
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> KernelBackend for burn_ndarray::NdArray<E, I, Q>
where
    burn_ndarray::NdArrayTensor:
        From<burn_ndarray::SharedArray<E>> + From<burn_ndarray::SharedArray<I>>,
    Self: burn::tensor::backend::Backend
        + burn::tensor::backend::BackendTypes<
            FloatTensorPrimitive = burn_ndarray::NdArrayTensor,
            IntTensorPrimitive = burn_ndarray::NdArrayTensor,
        >,
{
    const HOST_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;
    const MIXED_PRECISION_LINEAR: bool = true;

    fn float_bytes(tensor: &burn_ndarray::NdArrayTensor) -> Option<&[u8]> {
        use burn_ndarray::NdArrayTensor as T;
        match tensor {
            T::F32(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::F64(s) => s.view().to_slice().map(bytemuck::cast_slice),
            _ => None,
        }
    }

    fn int_bytes(tensor: &burn_ndarray::NdArrayTensor) -> Option<&[u8]> {
        use burn_ndarray::NdArrayTensor as T;
        match tensor {
            T::I64(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::I32(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::I16(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::I8(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::U64(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::U32(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::U16(s) => s.view().to_slice().map(bytemuck::cast_slice),
            T::U8(s) => s.view().to_slice(),
            _ => None,
        }
    }
}

// Every op on burn's portable ops: cubecl's kernels. (Only the default element types: the
// models choose their dtype at run time, not through the backend type.)
#[cfg(feature = "cuda")]
impl KernelBackend for burn::backend::Cuda {
    fn device_memory(device: &Self::Device) -> Option<super::DeviceMemory> {
        cube_memory::<cubecl::cuda::CudaRuntime>(device)
    }
}

#[cfg(feature = "wgpu")]
impl KernelBackend for burn::backend::Wgpu {
    fn device_memory(device: &Self::Device) -> Option<super::DeviceMemory> {
        cube_memory::<cubecl::wgpu::WgpuRuntime>(device)
    }
}

/// The memory cubecl's pools hold on `device`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn cube_memory<R: cubecl::Runtime>(device: &R::Device) -> Option<super::DeviceMemory> {
    let usage = R::client(device).memory_usage().ok()?;
    Some(super::DeviceMemory {
        in_use: usage.bytes_in_use,
        reserved: usage.bytes_reserved,
    })
}
