//! Memory-mapped safetensors weight source.
//!
//! Every read is checked: the tensor must exist, have the shape the configuration implies and a
//! floating-point dtype (F32, F16 or BF16, or a quantized I8 / F8_E4M3 weight with its scales,
//! see [`crate::quant`]); it is converted to the dtype the caller asks for, so a
//! bf16 checkpoint can feed an f32 model and an f32 checkpoint a bf16 one without an intermediate
//! copy in the stored dtype. Headers are bounds-checked against the file size before any tensor is
//! touched, so a truncated download fails at open time with the file named.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{missing_in, Error, Result};
use crate::quant::{scale_key, QuantScheme, QuantizedTensor};

/// The safetensors files of one set of weights: a single file, or the shards an index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// `<stem>.safetensors.index.json` for sharded weights, `None` for a single file.
    pub index: Option<PathBuf>,
    /// The files to open, in a stable order (the single file, or the shards sorted by name).
    pub files: Vec<PathBuf>,
}

impl WeightFiles {
    /// Finds the weights called `stem` in `dir`: `<stem>.safetensors`, or the shards listed by
    /// `<stem>.safetensors.index.json` (every one must exist).
    ///
    /// A missing file is an [`Error::ModelNotFound`] naming it (a shard without its index too);
    /// an index that is not JSON or has no `weight_map` is an [`Error::Config`].
    pub fn find(dir: &Path, stem: &str) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.is_file() {
            return Ok(Self {
                index: None,
                files: vec![single],
            });
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            let files = shards_of_index(&index)?
                .into_iter()
                .map(|name| dir.join(name))
                .collect::<Vec<_>>();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(missing_in(
                    dir,
                    format!(
                        "shard {} listed by {} is missing",
                        missing.display(),
                        index.display()
                    ),
                ));
            }
            return Ok(Self {
                index: Some(index),
                files,
            });
        }
        let shard_prefix = format!("{stem}-");
        let stray_shard = std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.filter_map(|e| e.ok()).find(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(&shard_prefix) && name.ends_with(".safetensors")
            })
        });
        Err(missing_in(
            dir,
            match stray_shard {
                Some(shard) => format!(
                    "found shard {} but not the index {} that lists the shards",
                    shard.path().display(),
                    index.display()
                ),
                None => format!(
                    "missing {} (or a sharded {})",
                    single.display(),
                    index.display()
                ),
            },
        ))
    }

    /// The one file of unsharded weights; `None` for shards.
    pub fn single(&self) -> Option<&Path> {
        match (&self.index, self.files.as_slice()) {
            (None, [file]) => Some(file),
            _ => None,
        }
    }
}

/// The shard file names an index's `weight_map` refers to, sorted and deduplicated.
fn shards_of_index(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io("read", index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.into(),
        reason: e.to_string(),
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.into(),
            reason: "missing `weight_map` object".into(),
        })?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Config {
            path: index.into(),
            reason: format!("`weight_map.{tensor}` is not a file name"),
        })?;
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(Error::Config {
            path: index.into(),
            reason: "`weight_map` lists no shard".into(),
        });
    }
    Ok(shards.into_iter().collect())
}

/// One memory-mapped safetensors file with its validated header.
struct MappedFile {
    path: PathBuf,
    file: std::fs::File,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path, None)?;
        // SAFETY: the map is read-only; we never hand out references that outlive `self`, and
        // checkpoint files are not expected to be modified while a model is being loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-map", path, e))?;
        if let Some(reason) = offset_past_the_end(&mmap) {
            return Err(Error::CorruptWeights {
                path: path.into(),
                reason,
            });
        }
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::CorruptWeights {
                path: path.into(),
                reason: describe_st_error(&e, &mmap),
            })?;
        Ok(Self {
            path: path.into(),
            file,
            mmap,
            header_len,
            metadata,
        })
    }

    /// `name`'s values read with `pread` straight into a buffer of their own type, when they
    /// are stored as `T`: no page of the map is touched, so none becomes resident, and no
    /// per-page fault is taken on it (the kernel copies from its page cache). The buffer is
    /// fresh memory backed by huge pages where the kernel grants them
    /// ([`fresh_zeroed`](crate::host_memory::fresh_zeroed)),
    /// and large tensors are read in parallel slices ([`read_parallel`]). `None` elsewhere (a
    /// short read, a size that is not a whole number of `T`, a platform without `pread`).
    fn read_pod<T: bytemuck::Pod>(&self, name: &str) -> Option<Vec<T>> {
        let info = self.metadata.info(name)?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let len = info.data_offsets.1 - info.data_offsets.0;
        if len % std::mem::size_of::<T>() != 0 {
            return None;
        }
        let mut values = crate::host_memory::fresh_zeroed::<T>(len / std::mem::size_of::<T>());
        #[cfg(unix)]
        {
            read_parallel(
                &self.file,
                bytemuck::cast_slice_mut(&mut values),
                start as u64,
            )
            .ok()?;
            Some(values)
        }
        #[cfg(not(unix))]
        {
            let _ = (start, &mut values);
            None
        }
    }

    /// `name`'s values as `T` (its stored type): read by [`Self::read_pod`], or decoded from the
    /// map where that cannot (`bytes` is the tensor's mapped data).
    fn values<T: bytemuck::Pod>(&self, name: &str, bytes: &[u8]) -> Vec<T> {
        self.read_pod::<T>(name)
            .unwrap_or_else(|| decode::<T>(bytes))
    }

    /// Drops this process's mapping of `name`'s pages once its values have been copied out, so
    /// that a loaded model does not keep the file's pages resident beside the converted copy
    /// (they stay in the page cache, where a later read finds them).
    fn release(&self, name: &str) {
        let Some(info) = self.metadata.info(name) else {
            return;
        };
        let start = 8 + self.header_len + info.data_offsets.0;
        let len = info.data_offsets.1 - info.data_offsets.0;
        #[cfg(unix)]
        // SAFETY: the map is a read-only mapping of a file: MADV_DONTNEED only unmaps its pages
        // from this process, and a later access faults the same file contents back in, so no
        // slice into the map ever sees different bytes. Failure (an old kernel) only means the
        // pages stay resident, hence ignored.
        unsafe {
            let _ =
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
        }
        #[cfg(not(unix))]
        let _ = (start, len);
    }

    fn bytes(&self, name: &str) -> Option<(&[u8], StDtype, &[usize])> {
        let info = self.metadata.info(name)?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        Some((&self.mmap[start..end], info.dtype, &info.shape))
    }
}

/// A tensor whose `data_offsets` point past the end of the file's data section, described;
/// `None` when there is none or the header is unreadable (the `safetensors` crate then reports
/// it). Checked first because the crate adds the last offset to the header size unchecked: with
/// offsets near 2^64 that overflows (a panic in debug builds).
fn offset_past_the_end(file: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    let header_end = usize::try_from(n).ok()?.checked_add(8)?;
    if n > MAX_HEADER_BYTES || header_end > file.len() {
        return None;
    }
    let data_len = (file.len() - header_end) as u64;
    let header: serde_json::Value = serde_json::from_slice(&file[8..header_end]).ok()?;
    header.as_object()?.iter().find_map(|(name, info)| {
        let offsets = info.get("data_offsets")?.as_array()?;
        let past = offsets
            .iter()
            .filter_map(|o| o.as_u64())
            .any(|o| o > data_len);
        past.then(|| {
            format!(
                "tensor `{name}` has data_offsets {} past the end of the {data_len}-byte data \
                 section: the file is truncated, or its header is corrupt",
                info["data_offsets"]
            )
        })
    })
}

/// The largest header the `safetensors` crate reads (its `MAX_HEADER_SIZE`); a real checkpoint's
/// header is a few hundred KiB.
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn describe_st_error(e: &safetensors::SafeTensorError, file: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let file_len = file.len();
    let declared = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    match (e, declared) {
        (E::HeaderTooSmall, _) => {
            format!("file is {file_len} bytes, too short for a safetensors header")
        }
        (E::HeaderTooLarge | E::InvalidHeaderLength, Some(n)) if n > MAX_HEADER_BYTES => format!(
            "header length field declares {n} bytes, more than the {MAX_HEADER_BYTES} a \
             safetensors header may have (corrupt, or not safetensors)"
        ),
        (E::HeaderTooLarge | E::InvalidHeaderLength, Some(n)) => format!(
            "header length field declares {n} bytes, past the end of the {file_len}-byte file \
             (truncated, or not safetensors)"
        ),
        (E::HeaderTooLarge | E::InvalidHeaderLength, None) => {
            format!("header length field points past the end of the {file_len}-byte file")
        }
        (E::MetadataIncompleteBuffer, _) => {
            format!("tensor data does not match the file size ({file_len} bytes): the file is truncated or padded")
        }
        (other, _) => format!("invalid header: {other}"),
    }
}

/// Where the tensors of a checkpoint live: one or more memory-mapped safetensors files.
pub struct WeightSource {
    files: Vec<MappedFile>,
    index: HashMap<String, usize>,
    /// Names read so far, so a loader can tell which tensors nothing used.
    read: std::sync::Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSource")
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl WeightSource {
    /// Opens one safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_many([path.as_ref().to_path_buf()])
    }

    /// Opens several files of one checkpoint (shards); a key present in two files is an error.
    pub fn open_many(paths: impl IntoIterator<Item = PathBuf>) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = MappedFile::open(&path)?;
            let slot = files.len();
            for name in file.metadata.tensors().keys() {
                if index.insert(name.clone(), slot).is_some() {
                    return Err(Error::CorruptWeights {
                        path: path.clone(),
                        reason: format!("tensor `{name}` also appears in another shard"),
                    });
                }
            }
            files.push(file);
        }
        if files.is_empty() {
            return Err(Error::invalid_argument(
                "weights",
                "no safetensors file given",
            ));
        }
        Ok(Self {
            files,
            index,
            read: Default::default(),
        })
    }

    /// The tensors no [`read`](Self::read) has asked for yet, sorted: after a model is built
    /// from this source, what the checkpoint holds that the model does not use.
    pub fn unread_keys(&self) -> Vec<String> {
        let read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<String> = self
            .index
            .keys()
            .filter(|k| !read.contains(*k))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Opens the weights of a model folder: `<stem>.safetensors`, or the shards listed in
    /// `<stem>.safetensors.index.json` (found by [`WeightFiles::find`]).
    pub fn open_in_dir(dir: impl AsRef<Path>, stem: &str) -> Result<Self> {
        Self::open_files(&WeightFiles::find(dir.as_ref(), stem)?)
    }

    /// Opens weights located by a [`ModelFolder`](crate::ModelFolder).
    pub fn open_files(files: &WeightFiles) -> Result<Self> {
        Self::open_many(files.files.iter().cloned())
    }

    /// The file holding `name`, for messages (the first file when absent).
    pub fn path_of(&self, name: &str) -> &Path {
        let slot = self.index.get(name).copied().unwrap_or(0);
        &self.files[slot].path
    }

    /// Whether the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.index.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// Tensor names that start with `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<&str> {
        self.keys()
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect()
    }

    /// Shape of a tensor as stored.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let slot = *self.index.get(name)?;
        self.files[slot].bytes(name).map(|(_, _, s)| s.to_vec())
    }

    /// The dtype a tensor is stored with, as its file's header declares it (for reports such as
    /// a checkpoint's dtype census; reads go through [`read`](Self::read), which converts).
    pub fn stored_dtype(&self, name: &str) -> Option<StDtype> {
        let slot = *self.index.get(name)?;
        self.files[slot].metadata.info(name).map(|info| info.dtype)
    }

    /// `name`'s file, mapped bytes and stored dtype, once it is known to exist with
    /// `expected_shape`; records it as read.
    fn locate(
        &self,
        name: &str,
        expected_shape: &[usize],
    ) -> Result<(&MappedFile, &[u8], StDtype)> {
        let slot = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            path: self.files[0].path.clone(),
        })?;
        self.read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        let file = &self.files[slot];
        let (bytes, st_dtype, shape) = file.bytes(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            path: file.path.clone(),
        })?;
        if shape != expected_shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                path: file.path.clone(),
                expected: expected_shape.to_vec(),
                found: shape.to_vec(),
            });
        }
        Ok((file, bytes, st_dtype))
    }

    /// Reads a floating-point tensor, checking its shape, converted to `dtype`
    /// (`F32`, `F16` or `BF16`).
    pub fn read(&self, name: &str, expected_shape: &[usize], dtype: DType) -> Result<TensorData> {
        let (file, bytes, st_dtype) = self.locate(name, expected_shape)?;
        let unsupported = || Error::UnsupportedDtype {
            name: name.into(),
            path: file.path.clone(),
            found: format!("{st_dtype:?}"),
        };
        let shape = expected_shape.to_vec();
        if matches!(st_dtype, StDtype::I8 | StDtype::F8_E4M3) {
            // A quantized weight read as floats (LoRA merges, portable reads of other modules).
            let q = self
                .read_quantized(name, expected_shape)?
                .ok_or_else(unsupported)?;
            return Ok(TensorData::new(q.dequantize(), shape).convert_dtype(dtype));
        }
        let data = match (st_dtype, dtype) {
            (StDtype::F32, DType::F32) => TensorData::new(file.values::<f32>(name, bytes), shape),
            (StDtype::F16, DType::F16) => TensorData::new(file.values::<f16>(name, bytes), shape),
            (StDtype::BF16, DType::BF16) => {
                TensorData::new(file.values::<bf16>(name, bytes), shape)
            }
            (StDtype::F32, DType::F16) => TensorData::new(
                convert(file.values::<f32>(name, bytes), f16::from_f32),
                shape,
            ),
            (StDtype::F32, DType::BF16) => TensorData::new(
                convert(file.values::<f32>(name, bytes), bf16::from_f32),
                shape,
            ),
            (StDtype::F16, DType::F32) => {
                TensorData::new(convert(file.values::<f16>(name, bytes), f16::to_f32), shape)
            }
            (StDtype::BF16, DType::F32) => TensorData::new(
                convert(file.values::<bf16>(name, bytes), bf16::to_f32),
                shape,
            ),
            (StDtype::F16, DType::BF16) => TensorData::new(
                convert(file.values::<f16>(name, bytes), |x| {
                    bf16::from_f32(x.to_f32())
                }),
                shape,
            ),
            (StDtype::BF16, DType::F16) => TensorData::new(
                convert(file.values::<bf16>(name, bytes), |x| {
                    f16::from_f32(x.to_f32())
                }),
                shape,
            ),
            (StDtype::F32 | StDtype::F16 | StDtype::BF16, other) => {
                return Err(Error::invalid_argument(
                    "dtype",
                    format!("{other:?} is not a supported weight dtype"),
                ))
            }
            _ => return Err(unsupported()),
        };
        file.release(name);
        Ok(data)
    }

    /// The stored bytes, dtype and shape of `name`, unconverted (for tools that rewrite a
    /// checkpoint, such as `omnigen quantize`).
    pub fn raw(&self, name: &str) -> Option<(&[u8], StDtype, &[usize])> {
        let slot = *self.index.get(name)?;
        self.files[slot].bytes(name)
    }

    /// Drops this process's mapping of `name`'s pages after its [`raw`](Self::raw) bytes have
    /// been used (they stay in the page cache), so that a tool streaming a whole checkpoint
    /// does not end with all of it resident. A later `raw` faults them back in.
    pub fn release(&self, name: &str) {
        if let Some(&slot) = self.index.get(name) {
            self.files[slot].release(name);
        }
    }

    /// Reads a quantized tensor (stored `I8` or `F8_E4M3`) with its per-row scales, checking its
    /// shape; `None` when `name` is stored in another dtype.
    ///
    /// The scale tensor is [`scale_key`]`(name)`, `[rows]` or `[rows, 1]` (one per row) or `[]` /
    /// `[1]` (one for the tensor), in any float dtype; an `I8` tensor must have one, an `F8_E4M3`
    /// tensor without one reads with scale 1.
    pub fn read_quantized(
        &self,
        name: &str,
        expected_shape: &[usize],
    ) -> Result<Option<QuantizedTensor>> {
        let scheme = match self.stored_dtype(name) {
            Some(StDtype::I8) => QuantScheme::Int8,
            Some(StDtype::F8_E4M3) => QuantScheme::Fp8E4M3,
            Some(_) => return Ok(None),
            None => {
                return Err(Error::MissingTensor {
                    name: name.into(),
                    path: self.files[0].path.clone(),
                })
            }
        };
        let (file, bytes, _) = self.locate(name, expected_shape)?;
        let rows = expected_shape.first().copied().unwrap_or(1);
        let scale_name = scale_key(name);
        let scales = match self.shape(&scale_name) {
            Some(s) => {
                let n: usize = s.iter().product();
                if n != rows && n != 1 {
                    return Err(Error::ShapeMismatch {
                        name: scale_name.clone(),
                        path: self.path_of(&scale_name).into(),
                        expected: vec![rows],
                        found: s,
                    });
                }
                let values = self.read_f32(&scale_name, &s)?;
                if let Some(bad) = values.iter().find(|v| !v.is_finite() || **v < 0.0) {
                    return Err(Error::CorruptWeights {
                        path: self.path_of(&scale_name).into(),
                        reason: format!("scale tensor `{scale_name}` holds {bad}"),
                    });
                }
                if n == rows {
                    values
                } else {
                    vec![values[0]; rows]
                }
            }
            None if scheme == QuantScheme::Fp8E4M3 => vec![1.0; rows],
            None => {
                return Err(Error::MissingTensor {
                    name: scale_name,
                    path: file.path.clone(),
                })
            }
        };
        let values = file.values::<u8>(name, bytes);
        file.release(name);
        Ok(Some(QuantizedTensor {
            scheme,
            shape: expected_shape.to_vec(),
            values,
            scales,
        }))
    }

    /// Reads a tensor and returns it as `f32` values, checking its shape.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let data = self.read(name, expected_shape, DType::F32)?;
        data.into_vec::<f32>().map_err(|e| Error::CorruptWeights {
            path: self.path_of(name).into(),
            reason: format!("tensor `{name}`: {e:?}"),
        })
    }
}

/// Fills `buf` from `file` at `offset` with `pread`, in slices of at least 16 MiB on the
/// rayon threads: the copy out of the page cache and the faults on fresh pages are per-core
/// work, so one thread alone leaves the other cores idle while a model loads.
#[cfg(unix)]
fn read_parallel(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    const MIN_SLICE: usize = 16 << 20;
    let slice = buf
        .len()
        .div_ceil(rayon::current_num_threads().max(1))
        .max(MIN_SLICE);
    buf.par_chunks_mut(slice)
        .enumerate()
        .try_for_each(|(i, chunk)| file.read_exact_at(chunk, offset + (i * slice) as u64))
}

/// Decodes little-endian values; the mmap is not guaranteed to be aligned for `T`.
fn decode<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(slice) => slice.to_vec(),
        Err(_) => bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect(),
    }
}

/// `values` converted element by element, in parallel.
fn convert<A: Copy + Sync, B: Send>(values: Vec<A>, f: impl Fn(A) -> B + Sync) -> Vec<B> {
    use rayon::prelude::*;
    values
        .par_iter()
        .with_min_len(1 << 16)
        .map(|&x| f(x))
        .collect()
}
