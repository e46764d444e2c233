//! # omnigen-test-support
//!
//! What the integration tests of every omnigen-rs crate share: the committed fixture root
//! ([`fixtures_root`], [`fixture`]), one reader of the fixture safetensors files
//! ([`SafetensorsFile`]), comparisons that report the largest absolute difference and where it
//! is ([`assert_close`], [`assert_close_tensors`]), the largest level difference of two 8-bit
//! images ([`max_level_diff`]) and the parsing of the `input_image_sizes` spans the reference
//! harness records ([`parse_spans`]).
//!
//! Helpers panic with the file and tensor named: they run only inside tests, where a panic is
//! the failure report.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use safetensors::SafeTensors;

pub use safetensors::Dtype;

/// `tests/fixtures` at the repository root: the reference harness's committed outputs.
/// `OMNIGEN_FIXTURES` names another copy (test binaries carried to a machine without the
/// source tree, as `tools/gpu/check.sh` runs them).
pub fn fixtures_root() -> PathBuf {
    match std::env::var_os("OMNIGEN_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// The dtype the parity tests load models in: `OMNIGEN_TEST_DTYPE` = `f32` (default), `bf16`
/// or `f16`. The fixtures are f32 references; in half precision every comparison is held to
/// [`HALF_PRECISION_TOLERANCE`] instead of its f32 tolerance (see [`assert_close`]).
pub fn test_dtype() -> DType {
    match std::env::var("OMNIGEN_TEST_DTYPE").as_deref() {
        Err(_) | Ok("f32") => DType::F32,
        Ok("bf16") => DType::BF16,
        Ok("f16") => DType::F16,
        Ok(other) => panic!("OMNIGEN_TEST_DTYPE={other}: expected f32, bf16 or f16"),
    }
}

/// The max-abs tolerance against the f32 references of a run in bf16 or f16
/// ([`test_dtype`]): what the GPU issue asks of bf16 (3e-2).
pub const HALF_PRECISION_TOLERANCE: f32 = 3e-2;

/// The tolerance a comparison whose f32 tolerance is `tol` uses under [`test_dtype`].
pub fn tolerance(tol: f32) -> f32 {
    if test_dtype() == DType::F32 {
        tol
    } else {
        tol.max(HALF_PRECISION_TOLERANCE)
    }
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: impl AsRef<Path>) -> PathBuf {
    fixtures_root().join(rel)
}

/// A JSON file, parsed.
pub fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// One safetensors file held in memory, read tensor by tensor.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl SafetensorsFile {
    /// Reads the file; its header is checked at once.
    pub fn open(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let file = Self { path, bytes };
        file.view();
        file
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: not safetensors: {e}", self.path.display()))
    }

    fn raw(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor `{name}` in {}: {e}", self.path.display()));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    /// Whether the file holds a tensor called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.view().tensor(name).is_ok()
    }

    /// Every tensor name.
    pub fn names(&self) -> Vec<String> {
        self.view()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.raw(name).1
    }

    /// A tensor's stored dtype.
    pub fn dtype(&self, name: &str) -> Dtype {
        self.raw(name).0
    }

    /// Panics unless `name` is stored as `dtype`.
    pub fn expect_dtype(&self, name: &str, dtype: Dtype) {
        let found = self.dtype(name);
        assert_eq!(found, dtype, "tensor `{name}` in {}", self.path.display());
    }

    /// A tensor's bytes as stored (little-endian).
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        self.raw(name).2
    }

    /// F32 values; U8, BOOL and I64 tensors (masks, ids) are converted.
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let (dtype, _, data) = self.raw(name);
        match dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::U8 | Dtype::BOOL => data.iter().map(|&v| f32::from(v)).collect(),
            Dtype::I64 => self.i64(name).into_iter().map(|v| v as f32).collect(),
            other => panic!(
                "tensor `{name}` in {}: unexpected dtype {other:?}",
                self.path.display()
            ),
        }
    }

    /// I64 values.
    pub fn i64(&self, name: &str) -> Vec<i64> {
        self.expect_dtype(name, Dtype::I64);
        self.bytes(name)
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    }

    /// U8 values.
    pub fn u8(&self, name: &str) -> Vec<u8> {
        self.expect_dtype(name, Dtype::U8);
        self.bytes(name)
    }

    /// A float tensor on `device` (see [`f32`](Self::f32) for the dtypes converted).
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.f32(name), self.shape(name)), device)
    }

    /// An I64 tensor on `device`.
    pub fn int_tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D, Int> {
        Tensor::from_data(TensorData::new(self.i64(name), self.shape(name)), device)
    }
}

/// Writes a safetensors file of raw tensors: `(name, dtype, shape, little-endian bytes)`.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let path = path.as_ref();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .unwrap_or_else(|e| panic!("tensor `{name}`: {e}"));
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes a safetensors file of F32 tensors: `(name, shape, values)`.
pub fn write_f32_safetensors(path: impl AsRef<Path>, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let raw: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.as_str(), Dtype::F32, shape.clone(), bytes)
        })
        .collect();
    write_safetensors(path, &raw);
}

/// The largest absolute difference of two equally long slices and its flat index. A NaN on
/// either side counts as an infinite difference, so that it can never pass a tolerance.
pub fn max_abs_diff_at(actual: &[f32], expected: &[f32]) -> (f32, usize) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "compared slices differ in length"
    );
    let mut worst = (0.0f32, 0usize);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let d = (a - e).abs();
        let d = if d.is_nan() { f32::INFINITY } else { d };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    worst
}

/// The largest absolute difference of two equally long slices (NaN counts as infinite).
pub fn max_abs_diff(actual: &[f32], expected: &[f32]) -> f32 {
    max_abs_diff_at(actual, expected).0
}

/// The largest difference of two equally long 8-bit images (any byte slices), in levels; 0 for
/// two empty ones.
pub fn max_level_diff(actual: &[u8], expected: &[u8]) -> u8 {
    assert_eq!(
        actual.len(),
        expected.len(),
        "compared images differ in length"
    );
    actual
        .iter()
        .zip(expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

/// The multi-index of flat index `flat` in a row-major tensor of `shape`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    index
}

/// Asserts `max |actual - expected| <= tol` ([`tolerance`]`(tol)` in half precision), printing
/// the figure; a failure names the element (its multi-index in `shape`) and both values.
/// Returns the largest difference.
pub fn assert_close(
    what: &str,
    actual: &[f32],
    expected: &[f32],
    shape: &[usize],
    tol: f32,
) -> f32 {
    let tol = tolerance(tol);
    let (d, at) = max_abs_diff_at(actual, expected);
    println!("{what}: max abs diff {d:.3e}");
    assert!(
        d <= tol,
        "{what}: max abs diff {d} > {tol} at {:?} (actual {}, expected {})",
        unravel(at, shape),
        actual[at],
        expected[at]
    );
    d
}

/// A tensor's values as f32 on the host (any float dtype).
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_else(|e| panic!("tensor to host: {e:?}"))
}

/// The largest absolute difference of two tensors of one shape (NaN counts as infinite).
pub fn tensor_max_abs_diff<B: Backend, const D: usize>(
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    max_abs_diff(&to_vec(actual), &to_vec(expected))
}

/// [`assert_close`] for two tensors of one shape.
pub fn assert_close_tensors<B: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tol: f32,
) -> f32 {
    let shape = actual.dims();
    assert_eq!(shape, expected.dims(), "{what}: shape mismatch");
    assert_close(what, &to_vec(actual), &to_vec(expected), &shape, tol)
}

/// The `input_image_sizes` the reference harness records (`{"row": [[start, end], ...]}`) as
/// `[start, end)` spans for each of `rows` rows; a row without an entry has none.
pub fn parse_spans(value: &serde_json::Value, rows: usize) -> Vec<Vec<(usize, usize)>> {
    let obj = value
        .as_object()
        .unwrap_or_else(|| panic!("input_image_sizes: expected an object, got {value}"));
    let bound = |v: &serde_json::Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("input_image_sizes: bad span bound {v}")) as usize
    };
    (0..rows)
        .map(|r| {
            obj.get(&r.to_string())
                .and_then(|v| v.as_array())
                .map(|spans| spans.iter().map(|s| (bound(&s[0]), bound(&s[1]))).collect())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_element_is_found_and_nan_never_passes() {
        assert_eq!(
            max_abs_diff_at(&[1.0, 2.0, 3.0], &[1.0, 2.5, 3.1]),
            (0.5, 1)
        );
        assert_eq!(max_abs_diff(&[1.0, f32::NAN], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(unravel(5, &[2, 3]), [1, 2]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }

    #[test]
    fn level_diff_is_the_largest_in_either_direction() {
        assert_eq!(max_level_diff(&[0, 255, 7], &[1, 250, 7]), 5);
        assert_eq!(max_level_diff(&[], &[]), 0);
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn level_diff_refuses_images_of_other_sizes() {
        max_level_diff(&[0, 1], &[0]);
    }

    #[test]
    #[should_panic(expected = "at [1, 0]")]
    fn assert_close_names_the_element() {
        assert_close("t", &[0.0, 0.0, 1.0, 0.0], &[0.0; 4], &[2, 2], 0.5);
    }

    #[test]
    fn spans_per_row() {
        let v = serde_json::json!({"1": [[3, 9], [10, 12]]});
        assert_eq!(parse_spans(&v, 2), vec![vec![], vec![(3, 9), (10, 12)]]);
    }

    #[test]
    fn fixture_files_read() {
        let f = SafetensorsFile::open(fixture("A/transformer_only.safetensors"));
        assert!(f.has("tf.x"));
        assert_eq!(f.dtype("tf.input_ids"), Dtype::I64);
        let n: usize = f.shape("tf.x").iter().product();
        assert_eq!(f.f32("tf.x").len(), n);
    }
}
