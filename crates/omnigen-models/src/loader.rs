//! Building burn modules straight from checkpoint tensors.
//!
//! Modules are never randomly initialised and then overwritten: each parameter is created from
//! the tensor read out of the memory-mapped checkpoint, already in the target dtype. Linear
//! weights stay in PyTorch's `[out, in]` layout and are used through a transposed view, so no
//! copy is made to reorder them, except dense f32 weights on a backend whose GEMM reads them
//! faster input-major ([`KernelBackend::F32_LINEAR_INPUT_MAJOR`], set by
//! [`Loader::with_kernel_layout`]): those are transposed once, as they are read.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use omnigen_core::host_memory::fresh_zeroed;
use omnigen_core::{Error, Result};
use rayon::prelude::*;

use crate::ops::{KernelBackend, LinearLayer, QuantizedLinear};
use crate::weights::WeightReader;

/// Reads parameters under a key prefix onto a device, in one dtype.
pub struct Loader<'a, B: Backend> {
    reader: &'a dyn WeightReader,
    prefix: String,
    device: B::Device,
    dtype: DType,
    weight_dtype: DType,
    f32_linear_input_major: bool,
}

impl<'a, B: Backend> Loader<'a, B> {
    /// A loader at the root of `reader`.
    pub fn new(reader: &'a dyn WeightReader, device: &B::Device, dtype: DType) -> Self {
        Self {
            reader,
            prefix: String::new(),
            device: device.clone(),
            dtype,
            weight_dtype: dtype,
            f32_linear_input_major: false,
        }
    }

    /// The same loader with the weights of [`linear_layer`](Self::linear_layer)s stored in
    /// `weight_dtype` (every other parameter keeps the loader's dtype): bf16 weights with f32
    /// compute on backends with [`KernelBackend::MIXED_PRECISION_LINEAR`](crate::KernelBackend).
    pub fn with_weight_dtype(mut self, weight_dtype: DType) -> Self {
        self.weight_dtype = weight_dtype;
        self
    }

    /// The same loader storing dense f32 linear weights `[in, out]` contiguous (`true`) or as
    /// the transposed view of the checkpoint's `[out, in]` (`false`, the default); see
    /// [`with_kernel_layout`](Self::with_kernel_layout).
    pub fn with_f32_linear_input_major(mut self, input_major: bool) -> Self {
        self.f32_linear_input_major = input_major;
        self
    }

    /// Whether dense f32 linear weights are stored `[in, out]` contiguous.
    pub fn f32_linear_input_major(&self) -> bool {
        self.f32_linear_input_major
    }

    /// A loader for the sub-module `name` (keys `prefix.name.*`).
    pub fn sub(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            reader: self.reader,
            prefix,
            device: self.device.clone(),
            dtype: self.dtype,
            weight_dtype: self.weight_dtype,
            f32_linear_input_major: self.f32_linear_input_major,
        }
    }

    /// The device parameters are created on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The dtype parameters are created in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of [`linear_layer`](Self::linear_layer) weights and [`table`](Self::table)s.
    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// The reader tensors come from.
    pub(crate) fn reader(&self) -> &'a dyn WeightReader {
        self.reader
    }

    /// The full key of `name` under this loader's prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Reads tensor `name` with the given shape.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self.reader.read(&self.key(name), &shape, self.dtype)?;
        // The dtype must be given: `from_data` with only a device converts to the device's
        // default float dtype (f32), which would silently load a bf16/f16 model in f32.
        Ok(Tensor::from_data(data, (&self.device, self.dtype)))
    }

    /// Reads tensor `name` in the weight dtype (see
    /// [`with_weight_dtype`](Self::with_weight_dtype)): for tables that are only looked up, and
    /// whose rows are cast to the compute dtype where they are used.
    pub fn table<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self
            .reader
            .read(&self.key(name), &shape, self.weight_dtype)?;
        Ok(Tensor::from_data(data, (&self.device, self.weight_dtype)))
    }

    /// Reads tensor `name` as a parameter.
    pub fn param<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape)?))
    }

    /// A `Linear` from `weight` `[d_out, d_in]` (PyTorch layout, used transposed) and optional `bias`.
    pub fn linear(&self, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let key = self.key("weight");
        let data = self.reader.read(&key, &[d_out, d_in], self.dtype)?;
        let weight = self.linear_weight(&key, data, self.dtype)?;
        let bias = if bias {
            Some(self.param("bias", [d_out])?)
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// A [`LinearLayer`] from `weight` `[d_out, d_in]` and optional `bias`: quantized when the
    /// reader holds the weight quantized, else dense in the loader's weight dtype (see
    /// [`with_weight_dtype`](Self::with_weight_dtype)); the bias is in the loader's dtype.
    pub fn linear_layer(&self, d_in: usize, d_out: usize, bias: bool) -> Result<LinearLayer<B>> {
        let bias = if bias {
            Some(self.param("bias", [d_out])?)
        } else {
            None
        };
        let key = self.key("weight");
        if let Some(q) = self.reader.read_quantized(&key, &[d_out, d_in])? {
            return Ok(LinearLayer::Quantized(QuantizedLinear::new(
                q.values,
                q.scales,
                [d_out, d_in],
                q.scheme,
                bias,
                &self.device,
            )));
        }
        let data = self.reader.read(&key, &[d_out, d_in], self.weight_dtype)?;
        let weight = self.linear_weight(&key, data, self.weight_dtype)?;
        Ok(LinearLayer::Dense(Linear {
            weight: Param::from_tensor(weight),
            bias,
        }))
    }

    /// burn's `[in, out]` weight from the checkpoint's `[out, in]` `data`: the transposed view,
    /// or, for f32 with [`f32_linear_input_major`](Self::f32_linear_input_major), a contiguous
    /// transposed copy.
    fn linear_weight(&self, key: &str, data: TensorData, dtype: DType) -> Result<Tensor<B, 2>> {
        if !(self.f32_linear_input_major && dtype == DType::F32) {
            return Ok(Tensor::<B, 2>::from_data(data, (&self.device, dtype)).transpose());
        }
        let [rows, cols] = [data.shape[0], data.shape[1]];
        let transposed = match data.as_slice::<f32>() {
            Ok(values) => transpose(values, rows, cols),
            Err(_) => {
                let values = data.to_vec::<f32>().map_err(|e| {
                    Error::invalid_argument(
                        "weights",
                        format!("`{key}` was not read as f32: {e:?}"),
                    )
                })?;
                transpose(&values, rows, cols)
            }
        };
        Ok(Tensor::from_data(
            TensorData::new(transposed, [cols, rows]),
            (&self.device, DType::F32),
        ))
    }

    /// A `Conv2d` from PyTorch-layout `weight` `[out, in, k, k]` and `bias`.
    pub fn conv2d(
        &self,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d<B>> {
        Ok(Conv2d {
            weight: self.param("weight", [c_out, c_in, kernel, kernel])?,
            bias: Some(self.param("bias", [c_out])?),
            stride: [stride, stride],
            kernel_size: [kernel, kernel],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(padding, padding, padding, padding),
        })
    }

    /// An affine `GroupNorm` from `weight` and `bias`.
    pub fn group_norm(
        &self,
        num_groups: usize,
        num_channels: usize,
        epsilon: f64,
    ) -> Result<GroupNorm<B>> {
        Ok(GroupNorm {
            gamma: Some(self.param("weight", [num_channels])?),
            beta: Some(self.param("bias", [num_channels])?),
            num_groups,
            num_channels,
            epsilon,
            affine: true,
        })
    }
}

impl<B: KernelBackend> Loader<'_, B> {
    /// The same loader with the parameter layouts `B`'s kernels read fastest
    /// ([`KernelBackend::F32_LINEAR_INPUT_MAJOR`]).
    pub fn with_kernel_layout(self) -> Self {
        self.with_f32_linear_input_major(B::F32_LINEAR_INPUT_MAJOR)
    }
}

/// `src` `[rows, cols]` row-major, transposed: `[cols, rows]` row-major.
///
/// Through 16 × 16 tiles on the stack, so that each source row segment (one cache line) is
/// read once and each destination segment written once: the rows of a tile are a multiple of
/// 4 KiB apart at the real width, where reading a column at a time would keep evicting its own
/// cache lines. Bands of output rows run in parallel.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 16;
    const BAND: usize = 4 * TILE;
    debug_assert_eq!(src.len(), rows * cols);
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    // A weight: fresh memory written once, as the checkpoint's reads are (`host_memory`), not
    // heap memory that `vec!` would zero first.
    let mut out = fresh_zeroed::<f32>(rows * cols);
    out.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, dst)| {
            let c0 = band * BAND;
            let width = dst.len() / rows; // output rows (source columns) in this band
            let mut tile = [[0.0f32; TILE]; TILE];
            for r0 in (0..rows).step_by(TILE) {
                let height = TILE.min(rows - r0);
                for c in (0..width).step_by(TILE) {
                    let w = TILE.min(width - c);
                    if height < TILE || w < TILE {
                        for r in 0..height {
                            for j in 0..w {
                                dst[(c + j) * rows + r0 + r] = src[(r0 + r) * cols + c0 + c + j];
                            }
                        }
                        continue;
                    }
                    for r in 0..TILE {
                        let row = &src[(r0 + r) * cols + c0 + c..][..TILE];
                        for (j, &v) in row.iter().enumerate() {
                            tile[j][r] = v;
                        }
                    }
                    for (j, column) in tile.iter().enumerate() {
                        dst[(c + j) * rows + r0..][..TILE].copy_from_slice(column);
                    }
                }
            }
        });
    out
}
