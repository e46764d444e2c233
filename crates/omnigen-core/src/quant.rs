//! Weight-only quantization of the transformer's linear layers: int8 (symmetric) and fp8 e4m3,
//! each stored value times a per-output-channel (per-row) f32 scale.
//!
//! A quantized weight `name` (e.g. `llm.layers.0.mlp.down_proj.weight`) is stored as an `I8` or
//! `F8_E4M3` tensor of the layer's `[out, in]` shape beside `{name}_scale` ([`scale_key`]), an
//! `F32` tensor `[out]` (the `weight_scale` name that FP8 checkpoints of other tools use). An
//! `F8_E4M3` tensor without a scale tensor reads with scale 1; a scale of shape `[]` or `[1]`
//! (one scale for the tensor) is broadcast over the rows. The quantization scheme is also
//! named in the model's `config.json` ([`QUANTIZATION_CONFIG_KEY`]) for tools that read only
//! configs; the loader goes by the stored dtypes.

use rayon::prelude::*;

/// The `config.json` key naming the quantization of a folder `omnigen quantize` wrote:
/// `{"quant_method": "omnigen", "scheme": "int8" | "fp8_e4m3", "granularity": "per_channel"}`.
pub const QUANTIZATION_CONFIG_KEY: &str = "quantization_config";

/// The name of the per-row scale tensor of quantized weight `weight_key`.
pub fn scale_key(weight_key: &str) -> String {
    format!("{weight_key}_scale")
}

/// How a quantized weight's values are stored: one byte each, times the row's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantScheme {
    /// Symmetric int8 in `[-127, 127]`; the scale is the row's max |w| / 127.
    Int8,
    /// fp8 e4m3 (OCP "fn": no infinities, max 448); the scale is the row's max |w| / 448.
    Fp8E4M3,
}

impl QuantScheme {
    /// The scheme's name in configs and on the command line (`int8`, `fp8_e4m3`).
    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::Int8 => "int8",
            QuantScheme::Fp8E4M3 => "fp8_e4m3",
        }
    }

    /// Parses a scheme name: `int8`, `fp8`, `fp8_e4m3` or `e4m3`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "int8" | "i8" => Some(QuantScheme::Int8),
            "fp8" | "fp8_e4m3" | "e4m3" | "f8_e4m3" => Some(QuantScheme::Fp8E4M3),
            _ => None,
        }
    }

    /// The largest stored magnitude, which a row's largest |w| maps to.
    pub fn max_value(self) -> f32 {
        match self {
            QuantScheme::Int8 => 127.0,
            QuantScheme::Fp8E4M3 => FP8_E4M3_MAX,
        }
    }

    /// The unscaled value of each of the 256 stored bytes.
    pub fn table(self) -> &'static [f32; 256] {
        match self {
            QuantScheme::Int8 => &INT8_TABLE,
            QuantScheme::Fp8E4M3 => &FP8_E4M3_TABLE,
        }
    }

    /// The stored byte nearest to `x` (already divided by the scale), saturating at
    /// [`max_value`](Self::max_value); ties to even.
    pub fn encode(self, x: f32) -> u8 {
        match self {
            QuantScheme::Int8 => (x.round_ties_even().clamp(-127.0, 127.0) as i8) as u8,
            QuantScheme::Fp8E4M3 => f32_to_fp8_e4m3(x),
        }
    }
}

impl std::fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// fp8 e4m3's largest finite value.
pub const FP8_E4M3_MAX: f32 = 448.0;

const fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

const fn fp8_e4m3_to_f32_const(b: u8) -> f32 {
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    let magnitude = if e == 15 && b & 7 == 7 {
        f32::NAN
    } else if e == 0 {
        m / 8.0 * pow2(-6)
    } else {
        (1.0 + m / 8.0) * pow2(e - 7)
    };
    if b & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

const fn fp8_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = fp8_e4m3_to_f32_const(i as u8);
        i += 1;
    }
    t
}

const fn int8_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8 as i8) as f32;
        i += 1;
    }
    t
}

static FP8_E4M3_TABLE: [f32; 256] = fp8_table();
static INT8_TABLE: [f32; 256] = int8_table();

/// The value of fp8 e4m3 byte `b` (`0x7f`/`0xff` are NaN).
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    FP8_E4M3_TABLE[b as usize]
}

/// `x` rounded to the nearest fp8 e4m3 value (ties to even), saturating at ±448; NaN stays NaN.
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(FP8_E4M3_MAX);
    if a < pow2(-6) {
        // Subnormals are multiples of 2^-9; 8 · 2^-9 rounds up into the smallest normal, whose
        // encoding (exponent 1, mantissa 0) is 8 too.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut e = (bits >> 23) as i32 - 127 + 7;
    let mant = bits & 0x7f_ffff;
    let mut m = mant >> 20;
    let rest = mant & 0xf_ffff;
    if rest > 0x8_0000 || (rest == 0x8_0000 && m & 1 == 1) {
        m += 1;
    }
    if m == 8 {
        m = 0;
        e += 1;
    }
    // a ≤ 448 = 1.75 · 2^8 keeps e ≤ 15 with m ≤ 6 (never the NaN code).
    sign | ((e as u8) << 3) | m as u8
}

/// A quantized tensor as read from a checkpoint: one byte per value, rows of `cols` values, a
/// scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// How the bytes encode values.
    pub scheme: QuantScheme,
    /// The stored shape (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub values: Vec<u8>,
    /// One scale per row (`shape[0]` of them).
    pub scales: Vec<f32>,
}

impl QuantizedTensor {
    /// Quantizes row-major `values` of `shape` (rows = `shape[0]`) with one scale per row.
    ///
    /// Non-finite values are refused (an [`Error::InvalidArgument`](crate::Error) naming
    /// `name`): a NaN would make its whole row's scale NaN.
    pub fn quantize(
        name: &str,
        scheme: QuantScheme,
        shape: &[usize],
        values: &[f32],
    ) -> crate::Result<Self> {
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let cols = values.len() / rows;
        if rows * cols != values.len() {
            return Err(crate::Error::invalid_argument(
                "weights",
                format!(
                    "tensor `{name}`: {} values for shape {shape:?}",
                    values.len()
                ),
            ));
        }
        let mut out = vec![0u8; values.len()];
        let cols = cols.max(1);
        // Rows in parallel: a real-size layer is tens of millions of values.
        let scales = values
            .par_chunks(cols)
            .zip(out.par_chunks_mut(cols))
            .map(|(row, q)| {
                let mut amax = 0f32;
                for &v in row {
                    if !v.is_finite() {
                        return Err(crate::Error::invalid_argument(
                            "weights",
                            format!(
                                "tensor `{name}` holds NaN or infinite values: not quantizable"
                            ),
                        ));
                    }
                    amax = amax.max(v.abs());
                }
                // An all-zero row keeps scale 1, so that decoding never multiplies by 0 / 0.
                let scale = if amax > 0.0 {
                    amax / scheme.max_value()
                } else {
                    1.0
                };
                let inv = 1.0 / scale;
                for (b, &v) in q.iter_mut().zip(row) {
                    *b = scheme.encode(v * inv);
                }
                Ok(scale)
            })
            .collect::<crate::Result<Vec<f32>>>()?;
        Ok(Self {
            scheme,
            shape: shape.to_vec(),
            values: out,
            scales,
        })
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.values.len() / self.scales.len().max(1)
    }

    /// The dequantized values, row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let table = self.scheme.table();
        let cols = self.cols().max(1);
        let mut out = Vec::with_capacity(self.values.len());
        for (row, &s) in self.values.chunks(cols).zip(&self.scales) {
            out.extend(row.iter().map(|&b| table[b as usize] * s));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_e4m3_round_trips_every_finite_code() {
        for b in 0..=255u8 {
            let v = fp8_e4m3_to_f32(b);
            if b & 0x7f == 0x7f {
                assert!(v.is_nan(), "{b:#x}");
                continue;
            }
            // -0 encodes as 0x80, 0 as 0x00: both decode to a zero.
            assert_eq!(f32_to_fp8_e4m3(v), b, "{b:#x} = {v}");
        }
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(f32_to_fp8_e4m3(1e9), 0x7e, "saturates");
        assert_eq!(f32_to_fp8_e4m3(-1e9), 0xfe);
    }

    #[test]
    fn fp8_rounds_to_nearest_even() {
        // 1 + 1/16 is halfway between 1 (mantissa 0) and 1.125 (mantissa 1): even is 1.
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0625)), 1.0);
        // 1.1875 is halfway between 1.125 and 1.25: even is 1.25.
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.1875)), 1.25);
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.07)), 1.125);
        // Subnormal halfway: 1.5 · 2^-9 goes to 2 · 2^-9.
        assert_eq!(
            fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.5 * 2f32.powi(-9))),
            2f32.powi(-8)
        );
        // Every value maps to one of its two neighbours in the table.
        let mut x = -500.0f32;
        while x < 500.0 {
            let got = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x));
            let best = FP8_E4M3_TABLE
                .iter()
                .filter(|v| v.is_finite())
                .map(|v| (v - x.clamp(-448.0, 448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((got - x.clamp(-448.0, 448.0)).abs(), best, "{x}");
            x += 0.173;
        }
    }

    #[test]
    fn per_row_quantization_bounds_the_error() {
        let shape = [3, 50];
        let values: Vec<f32> = (0..150)
            .map(|i| (i as f32 * 0.37).sin() * (1 + i / 50) as f32)
            .collect();
        for scheme in [QuantScheme::Int8, QuantScheme::Fp8E4M3] {
            let q = QuantizedTensor::quantize("w", scheme, &shape, &values).unwrap();
            assert_eq!(q.scales.len(), 3);
            let back = q.dequantize();
            for (row, (orig, deq)) in values.chunks(50).zip(back.chunks(50)).enumerate() {
                let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The row's largest value is exact; int8 errs at most half a step, fp8 at most
                // 2^-4 relative (3 mantissa bits) or half a subnormal step.
                for (&o, &d) in orig.iter().zip(deq) {
                    let bound = match scheme {
                        QuantScheme::Int8 => 0.5 * amax / 127.0 * 1.0001,
                        QuantScheme::Fp8E4M3 => {
                            o.abs() / 16.0 + 0.5 * q.scales[row] * 2f32.powi(-9) + 1e-7
                        }
                    };
                    assert!((o - d).abs() <= bound, "{scheme} row {row}: {o} -> {d}");
                }
                let i = orig.iter().position(|v| v.abs() == amax).unwrap();
                assert!((deq[i].abs() - amax).abs() <= amax * 1e-6, "{scheme}");
            }
        }
        let bad = [1.0, f32::NAN];
        assert!(matches!(
            QuantizedTensor::quantize("w", QuantScheme::Int8, &[1, 2], &bad),
            Err(crate::Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn scheme_names_parse() {
        assert_eq!(QuantScheme::parse("int8"), Some(QuantScheme::Int8));
        assert_eq!(QuantScheme::parse("fp8"), Some(QuantScheme::Fp8E4M3));
        assert_eq!(QuantScheme::parse("FP8-E4M3"), Some(QuantScheme::Fp8E4M3));
        assert_eq!(QuantScheme::parse("nf4"), None);
        for s in [QuantScheme::Int8, QuantScheme::Fp8E4M3] {
            assert_eq!(QuantScheme::parse(s.name()), Some(s));
        }
    }
}
