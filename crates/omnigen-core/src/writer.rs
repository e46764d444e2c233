//! Writing safetensors files one tensor at a time, as one file or as shards with an index.
//!
//! The `safetensors` crate serialises from views of every tensor at once, so a rewritten
//! checkpoint would be held whole in memory. Here the header is computed from the tensors'
//! dtypes and shapes alone, then each tensor's bytes are appended as they are produced: a
//! writer holds one tensor at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype as StDtype;

use crate::error::{Error, Result};

/// Hugging Face's default largest shard (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// One tensor to be written: its name, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The stored name.
    pub name: String,
    /// The stored dtype.
    pub dtype: StDtype,
    /// The stored shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n * self.dtype.bitsize()).div_ceil(8) as u64
    }
}

/// Groups `units` (tensors that must share a file, such as a quantized weight and its scale)
/// into shards of at most `max_bytes` each, in order; a unit larger than `max_bytes` gets a
/// shard of its own. Returns the indices of the units of each shard.
pub fn plan_shards(units: &[Vec<TensorSpec>], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, unit) in units.iter().enumerate() {
        let bytes: u64 = unit.iter().map(TensorSpec::bytes).sum();
        match shards.last_mut() {
            Some(shard) if size + bytes <= max_bytes => {
                shard.push(i);
                size += bytes;
            }
            _ => {
                shards.push(vec![i]);
                size = bytes;
            }
        }
    }
    shards
}

/// The file name of shard `i` (from 0) of `n` for weights `stem`:
/// `<stem>-0000{i+1}-of-0000{n}.safetensors`, the Hugging Face convention.
pub fn shard_name(stem: &str, i: usize, n: usize) -> String {
    format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)
}

/// Writes `<stem>.safetensors.index.json` into `dir`: the `weight_map` from tensor name to
/// shard file, and `metadata.total_size` (bytes of tensor data over all shards).
pub fn write_index(
    dir: &Path,
    stem: &str,
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
) -> Result<PathBuf> {
    let path = dir.join(format!("{stem}.safetensors.index.json"));
    let value = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&value).map_err(|e| Error::Io {
        action: "write",
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut file = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write", &path, e))?;
    Ok(path)
}

/// A safetensors file being written: its header (from the [`TensorSpec`]s) is written when it
/// is created, then every tensor's bytes, in the order [`Self::order`] gives.
pub struct StreamingFile {
    path: PathBuf,
    out: BufWriter<File>,
    /// The tensors in file order, and how many have been written.
    order: Vec<TensorSpec>,
    written: usize,
}

impl StreamingFile {
    /// Creates `path` (which must not exist) holding `tensors` and string `metadata`.
    ///
    /// Data is laid out by dtype size, largest first, then by name, as the `safetensors` crate
    /// does: with the header padded to a multiple of 8, every tensor starts at a multiple of
    /// its element size, so readers that map the file can use it in place.
    pub fn create(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut order = tensors.to_vec();
        order.sort_by(|a, b| {
            b.dtype
                .bitsize()
                .cmp(&a.dtype.bitsize())
                .then_with(|| a.name.cmp(&b.name))
        });
        if let Some(w) = order.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::invalid_argument(
                "tensors",
                format!("`{}` is listed twice for {}", w[0].name, path.display()),
            ));
        }
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(metadata));
        }
        let mut offset = 0u64;
        for t in &order {
            let end = offset + t.bytes();
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": format!("{:?}", t.dtype),
                    "shape": t.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut header = serde_json::to_vec(&header).map_err(|e| Error::Io {
            action: "write",
            path: path.into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        header.resize(header.len().next_multiple_of(8), b' ');
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(|e| Error::io("write", path, e))?;
        Ok(Self {
            path: path.into(),
            out,
            order,
            written: 0,
        })
    }

    /// The tensors in the order their bytes must be given to [`Self::write`].
    pub fn order(&self) -> &[TensorSpec] {
        &self.order
    }

    /// Appends the bytes of the next tensor in [`Self::order`], which must be `name`, of its
    /// declared size.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(next) = self.order.get(self.written) else {
            return Err(Error::invalid_argument(
                "tensors",
                format!("`{name}`: {} holds no more tensors", self.path.display()),
            ));
        };
        if next.name != name || next.bytes() != bytes.len() as u64 {
            return Err(Error::invalid_argument(
                "tensors",
                format!(
                    "{}: expected `{}` of {} bytes next, got `{name}` of {}",
                    self.path.display(),
                    next.name,
                    next.bytes(),
                    bytes.len()
                ),
            ));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io("write", &self.path, e))?;
        self.written += 1;
        Ok(())
    }

    /// Checks every tensor was written, flushes, and syncs the file to disk.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.order.get(self.written) {
            return Err(Error::invalid_argument(
                "tensors",
                format!(
                    "{}: `{}` was never written",
                    self.path.display(),
                    missing.name
                ),
            ));
        }
        let path = self.path;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("write", &path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io("write", &path, e))
    }
}

/// `a` before `b` with runs of digits compared as numbers (`layers.2` before `layers.10`), so
/// that shards follow the model's layer order.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> impl Iterator<Item = (bool, &str)> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (chunk, tail) = rest.split_at(end);
            rest = tail;
            Some((digit, chunk))
        })
    }
    let (mut x, mut y) = (chunks(a), chunks(b));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some((true, p)), Some((true, q))) => {
                let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                let o = p.len().cmp(&q.len()).then_with(|| p.cmp(q));
                if o.is_ne() {
                    return o;
                }
            }
            (Some((_, p)), Some((_, q))) => {
                let o = p.cmp(q);
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    fn spec(name: &str, dtype: StDtype, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn a_streamed_file_reads_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let tensors = [
            spec("b.codes", StDtype::I8, &[3, 5]),
            spec("a.weight", StDtype::BF16, &[2, 3]),
            spec("b.scale", StDtype::F32, &[3]),
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut file = StreamingFile::create(&path, &tensors, &meta).unwrap();
        let order: Vec<String> = file.order().iter().map(|t| t.name.clone()).collect();
        assert_eq!(order, ["b.scale", "a.weight", "b.codes"]);
        let data = |t: &TensorSpec| -> Vec<u8> {
            (0..t.bytes())
                .map(|i| (i as u8).wrapping_mul(7) ^ t.name.len() as u8)
                .collect()
        };
        // Out of order, or the wrong size: refused.
        assert!(file.write("a.weight", &[0; 12]).is_err());
        assert!(file.write("b.scale", &[0; 11]).is_err());
        for t in file.order().to_vec() {
            file.write(&t.name, &data(&t)).unwrap();
        }
        assert!(file.write("more", &[]).is_err());
        file.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(header_len % 8, 0);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for t in &tensors {
            let view = st.tensor(&t.name).unwrap();
            assert_eq!(view.dtype(), t.dtype);
            assert_eq!(view.shape(), t.shape.as_slice());
            assert_eq!(view.data(), data(t).as_slice());
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(
                (start - 8) % (t.dtype.bitsize() / 8),
                0,
                "{} aligned",
                t.name
            );
        }
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(metadata.metadata().as_ref().unwrap()["format"], "pt");
        // Never over an existing file.
        assert!(StreamingFile::create(&path, &tensors, &meta).is_err());
    }

    #[test]
    fn an_unfinished_file_is_an_error_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.safetensors");
        let tensors = [spec("a", StDtype::F32, &[2]), spec("b", StDtype::F32, &[1])];
        let mut file = StreamingFile::create(&path, &tensors, &BTreeMap::new()).unwrap();
        file.write("a", &[0; 8]).unwrap();
        assert!(file.finish().is_err());
        let twice = [spec("a", StDtype::F32, &[2]), spec("a", StDtype::F32, &[2])];
        let other = dir.path().join("z.safetensors");
        assert!(StreamingFile::create(&other, &twice, &BTreeMap::new()).is_err());
    }

    #[test]
    fn shards_fill_in_order_up_to_the_limit() {
        let unit = |bytes: usize| vec![spec("t", StDtype::U8, &[bytes])];
        let units = [unit(4), unit(4), unit(9), unit(1), unit(2)];
        assert_eq!(
            plan_shards(&units, 8),
            vec![vec![0, 1], vec![2], vec![3, 4]]
        );
        assert_eq!(plan_shards(&units, 100), vec![vec![0, 1, 2, 3, 4]]);
        assert!(plan_shards(&[], 8).is_empty());
        assert_eq!(
            shard_name("model", 0, 3),
            "model-00001-of-00003.safetensors"
        );
    }

    #[test]
    fn natural_order_compares_numbers_by_value() {
        let mut keys = vec![
            "llm.layers.10.mlp",
            "llm.layers.2.mlp",
            "llm.layers.2.attn",
            "llm.norm",
            "final",
        ];
        keys.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            keys,
            [
                "final",
                "llm.layers.2.attn",
                "llm.layers.2.mlp",
                "llm.layers.10.mlp",
                "llm.norm"
            ]
        );
    }
}
