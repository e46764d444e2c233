//! Building burn modules straight from checkpoint tensors.
//!
//! Modules are never randomly initialised and then overwritten: each parameter is created from
//! the tensor read out of the memory-mapped checkpoint, already in the target dtype. Linear
//! weights stay in PyTorch's `[out, in]` layout and are used through a transposed view, so no
//! copy is made to reorder them.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use omnigen_core::{Result, TransformerWeights, WeightSource};

/// Anything tensors can be read from by (canonical) name.
pub trait WeightReader {
    /// Reads `key` with the given shape, converted to `dtype`.
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData>;
}

impl WeightReader for WeightSource {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        WeightSource::read(self, key, shape, dtype)
    }
}

impl WeightReader for TransformerWeights {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        TransformerWeights::read(self, key, shape, dtype)
    }
}

/// Returns `base`'s tensors rounded to bf16 (round to nearest, ties to even), then converted to
/// the requested dtype: what the official pipeline's `model.to(torch.bfloat16)` in `__init__`
/// followed by `.to(dtype)` in `__call__` does to every weight and buffer. A no-op on a
/// checkpoint stored in bf16 (or holding only bf16-exact values).
pub struct Bf16RoundedReader<'a> {
    /// The reader rounded.
    pub base: &'a dyn WeightReader,
}

impl WeightReader for Bf16RoundedReader<'_> {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        if dtype == DType::BF16 {
            // The conversion to bf16 is the rounding.
            return self.base.read(key, shape, dtype);
        }
        let mut values = crate::lora::read_f32(self.base, key, shape)?;
        for v in &mut values {
            *v = crate::lora::round_bf16(*v);
        }
        Ok(TensorData::new(values, shape.to_vec()).convert_dtype(dtype))
    }
}

/// Reads parameters under a key prefix onto a device, in one dtype.
pub struct Loader<'a, B: Backend> {
    reader: &'a dyn WeightReader,
    prefix: String,
    device: B::Device,
    dtype: DType,
}

impl<'a, B: Backend> Loader<'a, B> {
    /// A loader at the root of `reader`.
    pub fn new(reader: &'a dyn WeightReader, device: &B::Device, dtype: DType) -> Self {
        Self {
            reader,
            prefix: String::new(),
            device: device.clone(),
            dtype,
        }
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
        let weight = self.tensor("weight", [d_out, d_in])?.transpose();
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

/// Deterministic random weights for any key and shape: benchmarks and tests of model shapes
/// without a checkpoint, through the same loading path as real weights.
///
/// Values depend only on `(seed, key)`, never on read order: matrices are uniform in
/// `±1/sqrt(fan_in)`, 1-D `*weight` tensors (norm scales) are `1 ± 0.1`, other 1-D tensors `±0.1`.
#[derive(Debug, Clone, Copy)]
pub struct RandomWeights {
    /// Seed mixed into every key.
    pub seed: u64,
}

impl WeightReader for RandomWeights {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        // FNV-1a of the key, mixed with the seed, drives a splitmix64 stream.
        let mut state = key
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let n: usize = shape.iter().product();
        let (offset, amp) = if shape.len() == 1 {
            if key.ends_with("weight") {
                (1.0, 0.1)
            } else {
                (0.0, 0.1)
            }
        } else {
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            (0.0, 1.0 / (fan_in as f32).sqrt())
        };
        let values: Vec<f32> = (0..n).map(|_| offset + amp * next()).collect();
        Ok(TensorData::new(values, shape.to_vec()).convert_dtype(dtype))
    }
}
