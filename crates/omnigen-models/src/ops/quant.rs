//! The transformer's linear layers as [`super::linear`] reads them: a dense weight in any float
//! dtype, or a weight-only quantized one (int8 or fp8 e4m3 bytes with a per-output-channel
//! scale, see [`omnigen_core::quant`]), and the portable dequantisation.

use burn::module::{Module, Param, ParamId};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, IntDType, Tensor, TensorData};
use omnigen_core::QuantScheme;

/// A linear layer's parameters: dense (burn's [`Linear`], the PyTorch-layout weight as a
/// transposed view) or quantized.
#[derive(Module, Debug)]
pub enum LinearLayer<B: Backend> {
    /// A float weight (f32, bf16 or f16).
    Dense(Linear<B>),
    /// Quantized bytes and per-row scales.
    Quantized(QuantizedLinear<B>),
}

/// A weight-only quantized linear layer: `y = x · (q · s)ᵀ + b`, one scale per output feature.
#[derive(Module, Debug)]
pub struct QuantizedLinear<B: Backend> {
    /// The stored bytes `[out, in]` (PyTorch layout; `I32` on devices without byte integers): an `I8` tensor for int8, a `U8` tensor of
    /// fp8 e4m3 bit patterns.
    pub values: Param<Tensor<B, 2, Int>>,
    /// One f32 scale per output feature, `[out]`.
    pub scales: Param<Tensor<B, 1>>,
    /// Bias `[out]` in the activation dtype.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// How the bytes encode values.
    #[module(skip)]
    pub scheme: QuantScheme,
}

/// How a layer's weight is stored, for reports and the memory estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A float weight of this dtype.
    Dense(DType),
    /// A quantized weight (one byte per value plus one f32 scale per output feature).
    Quantized(QuantScheme),
}

impl WeightFormat {
    /// The name used by `--dtype`, `omnigen quantize --to` and reports: `f32`, `bf16`, `f16`,
    /// `int8`, `fp8_e4m3`.
    pub fn name(self) -> String {
        match self {
            WeightFormat::Dense(d) => format!("{d:?}").to_lowercase(),
            WeightFormat::Quantized(s) => s.name().to_string(),
        }
    }

    /// Bytes per weight value (scales not counted).
    pub fn bytes_per_value(self) -> usize {
        match self {
            WeightFormat::Dense(d) => d.size(),
            WeightFormat::Quantized(_) => 1,
        }
    }
}

impl<B: Backend> LinearLayer<B> {
    /// `(in, out)` features.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            LinearLayer::Dense(l) => l.weight.dims(),
            LinearLayer::Quantized(q) => {
                let [out, d_in] = q.values.dims();
                [d_in, out]
            }
        }
    }

    /// How the weight is stored.
    pub fn format(&self) -> WeightFormat {
        match self {
            LinearLayer::Dense(l) => WeightFormat::Dense(l.weight.val().dtype()),
            LinearLayer::Quantized(q) => WeightFormat::Quantized(q.scheme),
        }
    }

    /// Bytes the layer's parameters hold.
    pub fn bytes(&self) -> u64 {
        let [d_in, out] = self.dims();
        let (d_in, out) = (d_in as u64, out as u64);
        let bias = |b: &Option<Param<Tensor<B, 1>>>| {
            b.as_ref()
                .map_or(0, |b| b.dims()[0] as u64 * b.val().dtype().size() as u64)
        };
        match self {
            LinearLayer::Dense(l) => {
                d_in * out * l.weight.val().dtype().size() as u64 + bias(&l.bias)
            }
            LinearLayer::Quantized(q) => d_in * out + 4 * out + bias(&q.bias),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Param<Tensor<B, 1>>> {
        match self {
            LinearLayer::Dense(l) => l.bias.as_ref(),
            LinearLayer::Quantized(q) => q.bias.as_ref(),
        }
    }
}

/// The dtype `device` holds `scheme`'s codes in: one byte (`I8` for int8, `U8` for fp8 e4m3)
/// where the device has byte integers, else `I32` (WGSL has none, so on wgpu each code takes
/// four bytes, the same values).
pub fn code_dtype<B: Backend>(device: &B::Device, scheme: QuantScheme) -> DType {
    let byte = match scheme {
        QuantScheme::Int8 => DType::I8,
        QuantScheme::Fp8E4M3 => DType::U8,
    };
    if B::supports_dtype(device, byte) {
        byte
    } else {
        DType::I32
    }
}

impl<B: Backend> QuantizedLinear<B> {
    /// A layer from quantized bytes `[out, in]`, scales `[out]` and an optional bias.
    pub fn new(
        values: Vec<u8>,
        scales: Vec<f32>,
        shape: [usize; 2],
        scheme: QuantScheme,
        bias: Option<Param<Tensor<B, 1>>>,
        device: &B::Device,
    ) -> Self {
        let values: Tensor<B, 2, Int> = match (scheme, code_dtype::<B>(device, scheme)) {
            (QuantScheme::Int8, DType::I8) => {
                let v: Vec<i8> = values.into_iter().map(|b| b as i8).collect();
                Tensor::from_data(TensorData::new(v, shape), (device, DType::I8))
            }
            (QuantScheme::Fp8E4M3, DType::U8) => {
                Tensor::from_data(TensorData::new(values, shape), (device, DType::U8))
            }
            (QuantScheme::Int8, _) => {
                let v: Vec<i32> = values.into_iter().map(|b| i32::from(b as i8)).collect();
                Tensor::from_data(TensorData::new(v, shape), (device, DType::I32))
            }
            (QuantScheme::Fp8E4M3, _) => {
                let v: Vec<i32> = values.into_iter().map(i32::from).collect();
                Tensor::from_data(TensorData::new(v, shape), (device, DType::I32))
            }
        };
        let out = shape[0];
        Self {
            values: Param::initialized(ParamId::new(), values),
            scales: Param::from_tensor(Tensor::from_data(
                TensorData::new(scales, [out]),
                (device, DType::F32),
            )),
            bias,
            scheme,
        }
    }

    /// The dense layer in `dtype` (weight `[in, out]` as a transposed view, as a loaded
    /// [`Linear`] holds it): what the portable [`super::linear`] multiplies by, one layer at a
    /// time.
    pub fn dequantize(&self, dtype: DType) -> Linear<B> {
        let scales = self.scales.val().unsqueeze_dim::<2>(1); // [out, 1]
        let values = self.values.val();
        let unscaled = match self.scheme {
            QuantScheme::Int8 => values.cast(FloatDType::F32),
            QuantScheme::Fp8E4M3 => {
                let device = values.device();
                let [out, d_in] = values.dims();
                let table = Tensor::<B, 1>::from_data(
                    TensorData::new(self.scheme.table().to_vec(), [256]),
                    (&device, DType::F32),
                );
                let idx = values.reshape([out * d_in]).cast(IntDType::I32);
                table.select(0, idx).reshape([out, d_in])
            }
        };
        Linear {
            weight: Param::from_tensor((unscaled * scales).cast(dtype).transpose()),
            bias: self.bias.clone(),
        }
    }
}
