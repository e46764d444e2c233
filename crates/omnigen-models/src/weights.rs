//! Weight readers: where the tensors a model is built from come from, in the dtype asked for.
//!
//! [`Loader`](crate::loader::Loader) builds modules from any [`WeightReader`]: a checkpoint
//! ([`WeightSource`], [`TransformerWeights`] in either key layout), a wrapper that changes the
//! values on the way ([`Bf16RoundedReader`], [`LoraMergedReader`](crate::lora::LoraMergedReader))
//! or [`RandomWeights`] for benchmarks.

use burn::tensor::{bf16, DType, TensorData};
use omnigen_core::{Error, QuantizedTensor, Result, TransformerWeights, WeightSource};

/// Anything tensors can be read from by (canonical) name.
pub trait WeightReader {
    /// Reads `key` with the given shape, converted to `dtype`.
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData>;

    /// Reads `key` as stored quantized (int8 / fp8 bytes with per-row scales), or `None` when
    /// the reader holds it as floats (the default): then [`read`](Self::read) gives its values,
    /// dequantized if need be.
    fn read_quantized(&self, _key: &str, _shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        Ok(None)
    }
}

impl WeightReader for WeightSource {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        WeightSource::read(self, key, shape, dtype)
    }

    fn read_quantized(&self, key: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        WeightSource::read_quantized(self, key, shape)
    }
}

impl WeightReader for TransformerWeights {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        TransformerWeights::read(self, key, shape, dtype)
    }

    fn read_quantized(&self, key: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        TransformerWeights::read_quantized(self, key, shape)
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
        let mut values = read_f32(self.base, key, shape)?;
        for v in &mut values {
            *v = round_bf16(*v);
        }
        Ok(TensorData::new(values, shape.to_vec()).convert_dtype(dtype))
    }

    /// Quantized weights pass unchanged: their values are what the quantizer chose (int8 and
    /// fp8 values times an f32 scale), which rounding to bf16 would only perturb.
    fn read_quantized(&self, key: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        self.base.read_quantized(key, shape)
    }
}

/// Returns `base`'s tensors with the decoder layers' linear weights
/// ([`omnigen_core::quantize::QUANTIZED_MODULES`]) quantized with `scheme` on the way, as
/// `omnigen quantize` writes them: accuracy and speed measurements of a quantized model from
/// any reader (e.g. [`RandomWeights`] at real width) without writing a checkpoint.
pub struct QuantizingReader<'a> {
    /// The reader quantized.
    pub base: &'a dyn WeightReader,
    /// The quantization.
    pub scheme: omnigen_core::QuantScheme,
}

impl WeightReader for QuantizingReader<'_> {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        match self.read_quantized(key, shape)? {
            Some(q) => Ok(TensorData::new(q.dequantize(), shape.to_vec()).convert_dtype(dtype)),
            None => self.base.read(key, shape, dtype),
        }
    }

    fn read_quantized(&self, key: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        if let Some(q) = self.base.read_quantized(key, shape)? {
            return Ok(Some(q));
        }
        if !omnigen_core::quantize::is_quantized_key(key) {
            return Ok(None);
        }
        let values = read_f32(self.base, key, shape)?;
        QuantizedTensor::quantize(key, self.scheme, shape, &values).map(Some)
    }
}

/// `x` rounded to the nearest bf16 (ties to even, as `torch.Tensor.to(torch.bfloat16)`).
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Reads `key` from `reader` as f32 values.
pub fn read_f32(reader: &dyn WeightReader, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let data = reader.read(key, shape, DType::F32)?;
    data.into_vec::<f32>()
        .map_err(|e| Error::invalid_argument("weights", format!("tensor `{key}`: {e:?}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_bf16_ties_to_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: rounds up to even.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
    }
}
