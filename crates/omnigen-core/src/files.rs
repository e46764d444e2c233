//! Opening the files a user names as inputs: only regular files, with a size cap, and never
//! blocking (a FIFO given as an input would otherwise wait forever for a writer, and a device
//! such as `/dev/zero` would be read until memory runs out).

use std::fs::File;
use std::io;
use std::path::Path;

use crate::{Error, Result};

/// The largest input image file accepted (256 MiB): far above any photograph, far below what
/// would exhaust memory before the decoder's own limits apply.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Opens `path` for reading when it is a regular file (symbolic links followed) of at most
/// `max_bytes` bytes; anything else is an [`Error::Io`] naming the file and what it is.
pub fn open_regular(path: &Path, max_bytes: Option<u64>) -> Result<File> {
    let refuse = |reason: String| {
        Error::io(
            "read",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, reason),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open", path, e))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "is a {}, not a regular file",
            file_kind(&meta)
        )));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // The file could be swapped for a FIFO between the check and the open: never block on it.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| Error::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("read", path, e))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "is a {}, not a regular file",
            file_kind(&meta)
        )));
    }
    if let Some(max) = max_bytes.filter(|&m| meta.len() > m) {
        return Err(refuse(format!(
            "is {} MiB, more than the {} MiB accepted",
            meta.len() >> 20,
            max >> 20
        )));
    }
    Ok(file)
}

/// What a non-regular file is, in words ("directory", "FIFO", "device", "socket").
pub fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    if meta.is_dir() {
        return "directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    "special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_open_and_others_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.bin");
        std::fs::write(&file, [0u8; 100]).unwrap();
        assert!(open_regular(&file, Some(100)).is_ok());
        let err = open_regular(&file, Some(99)).unwrap_err().to_string();
        assert!(err.contains("a.bin") && err.contains("accepted"), "{err}");
        let err = open_regular(dir.path(), None).unwrap_err().to_string();
        assert!(err.ends_with("is a directory, not a regular file"), "{err}");
        #[cfg(unix)]
        {
            let err = open_regular(Path::new("/dev/zero"), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("is a device, not a regular file"), "{err}");
            let fifo = dir.path().join("fifo.png");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let err = open_regular(&fifo, None).unwrap_err().to_string();
            assert!(err.contains("is a FIFO, not a regular file"), "{err}");
        }
        let err = open_regular(&dir.path().join("none"), None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot open"), "{err}");
    }
}
