//! OmniGen's attention mask in the compact form its structure allows, and the form each
//! attention kernel reads it in.
//!
//! Every row of the official `[B, S, S]` 0/1 mask is one contiguous run of ones: a text token
//! sees `[pad, itself]` (or, inside an input image, `[pad, the image's end)`), the time and
//! image tokens see `[pad, S - padded image tokens)`, and padding rows see everything but the
//! batch's padded image tokens. [`KeyRanges`] keeps that run per row, `B·S` pairs instead of
//! `B·S²` floats; the host attention kernel reads it directly, other backends get the
//! additive bias expanded once per forward ([`attention_bias`]).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use omnigen_core::{Error, Result};

use super::KernelBackend;

/// Which keys each query row may attend to: one contiguous range `[start, end)` per row.
///
/// A row with an empty range attends to no key in particular: as under the official finite
/// mask (every score pushed to the dtype's minimum), its softmax is uniform over all keys.
///
/// # Shapes
/// Describes a `[B, S, T]` mask: `B` batch rows, `S` queries, `T` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRanges {
    batch: usize,
    queries: usize,
    keys: usize,
    /// `[B·S]` ranges, row-major.
    ranges: Vec<(u32, u32)>,
}

impl KeyRanges {
    /// Ranges for a `[batch, queries, keys]` mask, row-major, each `start <= end <= keys`.
    pub fn new(
        batch: usize,
        queries: usize,
        keys: usize,
        ranges: Vec<(usize, usize)>,
    ) -> Result<Self> {
        let rows = batch.checked_mul(queries);
        if rows != Some(ranges.len()) {
            return Err(Error::invalid_argument(
                "attention_mask",
                format!(
                    "{} key ranges for a [{batch}, {queries}, {keys}] mask",
                    ranges.len()
                ),
            ));
        }
        u32::try_from(keys).map_err(|_| {
            Error::invalid_argument("attention_mask", format!("{keys} keys exceed 2^32"))
        })?;
        let mut packed = Vec::new();
        packed
            .try_reserve_exact(ranges.len())
            .map_err(|_| too_large(ranges.len() as u64 * 8, "the attention mask's key ranges"))?;
        for (row, &(start, end)) in ranges.iter().enumerate() {
            if start > end || end > keys {
                return Err(Error::invalid_argument(
                    "attention_mask",
                    format!(
                        "row {row} (batch {}, query {}): key range [{start}, {end}) must lie \
                         within the {keys} keys",
                        row / queries.max(1),
                        row % queries.max(1)
                    ),
                ));
            }
            // Both fit: end <= keys <= u32::MAX.
            packed.push((start as u32, end as u32));
        }
        Ok(Self {
            batch,
            queries,
            keys,
            ranges: packed,
        })
    }

    /// Reads a dense 0/1 (or boolean-valued) mask `[B, S, T]`, row-major, nonzero = may
    /// attend. Each row's ones must be one contiguous run, as every mask of OmniGen's
    /// collator is; a row without ones is an empty range.
    pub fn from_dense(mask: &[f32], [batch, queries, keys]: [usize; 3]) -> Result<Self> {
        let len = batch.checked_mul(queries).and_then(|n| n.checked_mul(keys));
        if len != Some(mask.len()) {
            return Err(Error::invalid_argument(
                "attention_mask",
                format!(
                    "{} values for a [{batch}, {queries}, {keys}] mask",
                    mask.len()
                ),
            ));
        }
        let mut ranges = Vec::with_capacity(batch * queries);
        for (row, values) in mask.chunks_exact(keys.max(1)).enumerate() {
            let start = values.iter().position(|&m| m != 0.0);
            let range = match start {
                None => (0, 0),
                Some(start) => {
                    let run = values[start..].iter().take_while(|&&m| m != 0.0).count();
                    let end = start + run;
                    if values[end..].iter().any(|&m| m != 0.0) {
                        return Err(Error::invalid_argument(
                            "attention_mask",
                            format!(
                                "row {row} (batch {}, query {}) is not one contiguous run of \
                                 visible keys, which OmniGen's masks always are",
                                row / queries,
                                row % queries
                            ),
                        ));
                    }
                    (start, end)
                }
            };
            ranges.push(range);
        }
        if keys == 0 {
            ranges.resize(batch * queries, (0, 0));
        }
        Self::new(batch, queries, keys, ranges)
    }

    /// `[B, S, T]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.batch, self.queries, self.keys]
    }

    /// The visible keys `[start, end)` of query `query` in batch row `batch`.
    pub fn range(&self, batch: usize, query: usize) -> (usize, usize) {
        let (start, end) = self.ranges[batch * self.queries + query];
        (start as usize, end as usize)
    }

    /// Queries `start..start + len` of every batch row (e.g. the rows a KV cache's later steps
    /// compute), over the same keys.
    pub fn query_rows(&self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.queries, "query rows out of range");
        let ranges = (0..self.batch)
            .flat_map(|b| {
                let row0 = b * self.queries + start;
                self.ranges[row0..row0 + len].iter().copied()
            })
            .collect();
        Self {
            batch: self.batch,
            queries: len,
            keys: self.keys,
            ranges,
        }
    }

    /// The same mask with queries `first_query..` blind to keys `first_query..`: the official
    /// pipeline's first step with a KV cache, whose new tokens see only the cached ones.
    pub fn without_new_keys(&self, first_query: usize) -> Self {
        let mut out = self.clone();
        let cap = first_query.min(self.keys) as u32;
        for b in 0..self.batch {
            let rows = &mut out.ranges[b * self.queries..(b + 1) * self.queries];
            for r in rows.iter_mut().skip(first_query) {
                r.1 = r.1.min(cap);
                r.0 = r.0.min(r.1);
            }
        }
        out
    }

    /// The dense 0/1 mask `[B, S, T]`, row-major (an empty row stays all zeros).
    ///
    /// An allocation that fails is [`Error::OutOfMemory`], not an abort.
    pub fn to_dense(&self) -> Result<Vec<f32>> {
        let len = self
            .batch
            .checked_mul(self.queries)
            .and_then(|n| n.checked_mul(self.keys))
            .ok_or_else(|| too_large(self.dense_bytes(), "the dense attention mask"))?;
        let mut mask = Vec::new();
        mask.try_reserve_exact(len)
            .map_err(|_| too_large(self.dense_bytes(), "the dense attention mask"))?;
        mask.resize(len, 0f32);
        if self.keys > 0 {
            for (row, &(start, end)) in mask.chunks_exact_mut(self.keys).zip(&self.ranges) {
                row[start as usize..end as usize].fill(1.0);
            }
        }
        Ok(mask)
    }

    /// Bytes of the dense f32 mask `B·S·T·4` (saturating): what [`to_dense`](Self::to_dense)
    /// and the additive bias of backends without the host kernel allocate.
    pub fn dense_bytes(&self) -> u64 {
        (self.batch as u64)
            .saturating_mul(self.queries as u64)
            .saturating_mul(self.keys as u64)
            .saturating_mul(4)
    }
}

/// The refusal of a buffer the allocator cannot provide.
fn too_large(bytes: u64, what: &str) -> Error {
    Error::OutOfMemory {
        needed_mib: bytes >> 20,
        available_mib: 0,
        hint: format!(
            "{what} cannot be allocated: request a smaller output size or a shorter prompt"
        ),
    }
}

/// The additive value for a masked-out score: the dtype's most negative finite value, as the
/// official `(1 - mask) * finfo(dtype).min`. Finite so that a row can never become NaN.
pub fn mask_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        // bf16's largest finite value; f32::MIN would round to -inf in bf16.
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN as f64,
    }
}

/// A mask in the form [`attention`](super::attention) reads on backend `B`: built once per
/// forward by [`attention_bias`] and shared by every layer.
#[derive(Debug, Clone)]
pub struct AttentionBias<B: Backend> {
    pub(super) repr: BiasRepr<B>,
}

#[derive(Debug, Clone)]
pub(super) enum BiasRepr<B: Backend> {
    /// The host kernel computes the mask from the ranges as it goes.
    Ranges(KeyRanges),
    /// The official additive bias `[B, 1, S, T]` in the compute dtype.
    Additive(Tensor<B, 4>),
}

impl<B: Backend> AttentionBias<B> {
    /// `[B, S, T]` of the mask.
    pub fn dims(&self) -> [usize; 3] {
        match &self.repr {
            BiasRepr::Ranges(r) => r.dims(),
            BiasRepr::Additive(t) => {
                let [b, _, s, t] = t.dims();
                [b, s, t]
            }
        }
    }

    /// Bytes this bias holds on its device (the ranges' few bytes, or the dense bias).
    pub fn bytes(&self) -> u64 {
        match &self.repr {
            BiasRepr::Ranges(r) => r.ranges.len() as u64 * 8,
            BiasRepr::Additive(t) => {
                let n: u64 = t.dims().iter().map(|&d| d as u64).product();
                n * t.dtype().size() as u64
            }
        }
    }
}

/// `mask` in the form attention on `B` reads for q, k and v of `dtype`: the ranges themselves
/// where the host kernel runs ([`KernelBackend::HOST_KERNELS`], f32), otherwise the official
/// additive bias `(1 - mask) · min(dtype)` as one `[B, 1, S, T]` tensor built on `device` from
/// the ranges (only `2·B·S` integers travel there).
pub fn attention_bias<B: KernelBackend>(
    mask: &KeyRanges,
    dtype: DType,
    device: &B::Device,
) -> AttentionBias<B> {
    let repr = if !super::attention_mask_is_dense::<B>(dtype) {
        BiasRepr::Ranges(mask.clone())
    } else {
        BiasRepr::Additive(additive_bias(mask, dtype, device))
    };
    AttentionBias { repr }
}

/// The official additive bias `[B, 1, S, T]` of `mask` in `dtype`, computed on `device`.
pub(super) fn additive_bias<B: Backend>(
    mask: &KeyRanges,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 4> {
    let [b, s, t] = mask.dims();
    let (starts, ends): (Vec<i64>, Vec<i64>) = mask
        .ranges
        .iter()
        .map(|&(lo, hi)| (lo as i64, hi as i64))
        .unzip();
    let starts = Tensor::<B, 3, Int>::from_data(TensorData::new(starts, [b, s, 1]), device);
    let ends = Tensor::<B, 3, Int>::from_data(TensorData::new(ends, [b, s, 1]), device);
    let cols = Tensor::<B, 1, Int>::arange(0..t as i64, device)
        .reshape([1, 1, t])
        .expand([b, s, t]);
    let hidden = cols
        .clone()
        .lower(starts.expand([b, s, t]))
        .bool_or(cols.greater_equal(ends.expand([b, s, t]))); // [B, S, T]
    Tensor::<B, 3>::zeros([b, s, t], (device, dtype))
        .mask_fill(hidden, mask_min(dtype))
        .unsqueeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_round_trip_and_refusals() {
        #[rustfmt::skip]
        let dense = [
            1.0, 0.0, 0.0,
            1.0, 1.0, 0.0,
            0.0, 0.0, 0.0,
            0.0, 1.0, 1.0,
        ];
        let r = KeyRanges::from_dense(&dense, [2, 2, 3]).unwrap();
        assert_eq!(r.range(0, 1), (0, 2));
        assert_eq!(r.range(1, 0), (0, 0));
        assert_eq!(r.range(1, 1), (1, 3));
        assert_eq!(r.to_dense().unwrap(), dense);
        let err = KeyRanges::from_dense(&[1.0, 0.0, 1.0], [1, 1, 3]).unwrap_err();
        assert!(err.to_string().contains("contiguous"), "{err}");
        assert!(KeyRanges::from_dense(&[1.0; 5], [1, 2, 3]).is_err());
        assert!(KeyRanges::new(1, 1, 3, vec![(2, 4)]).is_err());
        assert!(KeyRanges::new(1, 2, 3, vec![(0, 1)]).is_err());
    }

    #[test]
    fn rows_and_new_key_cut() {
        let r = KeyRanges::new(
            2,
            3,
            3,
            vec![(0, 1), (0, 3), (1, 3), (0, 1), (0, 2), (2, 3)],
        )
        .unwrap();
        let tail = r.query_rows(1, 2);
        assert_eq!(tail.dims(), [2, 2, 3]);
        assert_eq!(tail.range(1, 1), (2, 3));
        let cut = r.without_new_keys(2);
        assert_eq!(
            cut.range(0, 1),
            (0, 3),
            "rows before the cut keep their keys"
        );
        assert_eq!(cut.range(0, 2), (1, 2));
        assert_eq!(
            cut.range(1, 2),
            (2, 2),
            "an emptied range stays well-formed"
        );
    }
}
