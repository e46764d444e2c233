//! A fast, content-based fingerprint of a weights file for output metadata.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use omnigen_core::{Error, Result};
use sha2::{Digest, Sha256};

const CHUNK: u64 = 64 * 1024;
const SAMPLES: u64 = 16;

/// SHA-256 over the file's length, its first and last 64 KiB (the safetensors header and the
/// tail) and 16 evenly spaced 64 KiB samples of the tensor data: a few MiB read instead of
/// hashing 15 GB, yet any re-trained or re-quantised checkpoint gets a different value.
/// Files up to 2 MiB are hashed whole.
pub fn weights_fingerprint(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("read", path, e))?
        .len();
    let mut hasher = Sha256::new();
    hasher.update(len.to_le_bytes());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut read_at = |hasher: &mut Sha256, offset: u64, n: u64| -> std::io::Result<()> {
        file.seek(SeekFrom::Start(offset))?;
        let n = n.min(len.saturating_sub(offset)) as usize;
        file.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        Ok(())
    };
    let result = if len <= 2 * 1024 * 1024 {
        (0..len.div_ceil(CHUNK)).try_for_each(|i| read_at(&mut hasher, i * CHUNK, CHUNK))
    } else {
        let stride = len / (SAMPLES + 1);
        std::iter::once(0)
            .chain((1..=SAMPLES).map(|i| i * stride))
            .chain(std::iter::once(len - CHUNK))
            .try_for_each(|off| read_at(&mut hasher, off, CHUNK))
    };
    result.map_err(|e| Error::io("read", path, e))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
