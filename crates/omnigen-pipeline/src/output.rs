//! Writing generated images: atomically (temp file + rename, so a failure never leaves a partial
//! PNG), with the generation parameters in PNG text chunks so an output can be traced and
//! reproduced.

use std::io::Write;
use std::path::Path;

use image::RgbImage;
use omnigen_core::{Error, Result};

/// `(keyword, text)` pairs stored as PNG `iTXt` chunks.
pub type PngMetadata = Vec<(String, String)>;

/// Writes `image` as a PNG at `path`, atomically; `metadata` goes into text chunks.
pub fn save_png(path: &Path, image: &RgbImage, metadata: &PngMetadata) -> Result<()> {
    write_atomically(path, |file| write_png(file, image, metadata))
}

/// `image` as PNG bytes with `metadata` in text chunks, the same file [`save_png`] writes: for
/// callers that send images elsewhere than a file (a server's response).
pub fn encode_png(image: &RgbImage, metadata: &PngMetadata) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_png(&mut bytes, image, metadata).map_err(|e| Error::InvalidImage {
        source_name: format!("generated image {}x{}", image.width(), image.height()),
        reason: format!("cannot encode as PNG: {e}"),
    })?;
    Ok(bytes)
}

fn write_png(out: impl Write, image: &RgbImage, metadata: &PngMetadata) -> std::io::Result<()> {
    let mut encoder = png::Encoder::new(out, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, text) in metadata {
        encoder
            .add_itxt_chunk(key.clone(), text.clone())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let mut writer = encoder
        .write_header()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    writer
        .write_image_data(image.as_raw())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    writer
        .finish()
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Runs `write` against a temporary file beside `path` and renames it into place only when the
/// whole file was written and flushed.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = folder_of(path);
    check_target(path)?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".omnigen-").suffix(".partial");
    // Like any new file: 0666 less the umask (open(2) applies it), not tempfile's private 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a file in", dir, e))?;
    write(tmp.as_file_mut())
        .and_then(|()| tmp.as_file_mut().flush())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io("write", path, e))?;
    tmp.persist(path)
        .map_err(|e| Error::io("write", path, e.error))?;
    Ok(())
}

/// Checks before any work that [`write_atomically`] (and so [`save_png`]) can write `path`: an
/// existing target must be a regular file (a rename would replace a directory entry, device,
/// FIFO or socket), and its folder must exist and accept a new file (a probe file is created
/// there and removed).
pub fn check_output(path: &Path) -> Result<()> {
    check_target(path)?;
    let dir = folder_of(path);
    tempfile::Builder::new()
        .prefix(".omnigen-")
        .suffix(".probe")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| Error::io("create a file in", dir, e))
}

/// The folder `path` is written into (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// An existing `path` must be a regular file: the rename would replace whatever is there.
fn check_target(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            let kind = if meta.is_dir() {
                std::io::ErrorKind::IsADirectory
            } else {
                std::io::ErrorKind::InvalidInput
            };
            let what = format!("it is a {}, not a regular file", file_kind(&meta));
            Err(Error::io("write", path, std::io::Error::new(kind, what)))
        }
        _ => Ok(()),
    }
}

/// What a non-regular file is, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
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
        if t.is_socket() {
            return "socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device";
        }
    }
    "special file"
}

/// Reads back the text chunks of a PNG (for tests and tools tracing an output).
pub fn read_png_text(path: &Path) -> Result<PngMetadata> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| Error::InvalidImage {
        source_name: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let info = reader.info();
    let mut out: PngMetadata = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_pixels_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let meta = vec![("prompt".to_string(), "a cat — ünïcode".to_string())];
        save_png(&path, &img, &meta).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        assert_eq!(read_png_text(&path).unwrap(), meta);
        assert_eq!(
            encode_png(&img, &meta).unwrap(),
            std::fs::read(&path).unwrap()
        );
        // nothing but the PNG is left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unwritable_destination_is_a_typed_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::new(2, 2);
        let missing = dir.path().join("no/such/dir/out.png");
        assert!(matches!(
            save_png(&missing, &img, &vec![]),
            Err(Error::Io { .. })
        ));
        let err = save_png(dir.path(), &img, &vec![]).unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A FIFO made with the system's `mkfifo`, or `None` where there is none.
    #[cfg(unix)]
    fn fifo(path: &Path) -> Option<()> {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .ok()?;
        made.success().then_some(())
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_and_left_in_place() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        if fifo(&path).is_none() {
            eprintln!("no mkfifo here: skipped");
            return;
        }
        let err = save_png(&path, &RgbImage::new(2, 2), &vec![]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(
            err.to_string().contains("FIFO, not a regular file"),
            "{err}"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_fifo(), "the FIFO was replaced");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn new_files_get_0666_less_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let Some(umask) = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        else {
            eprintln!("no Umask line in /proc/self/status: skipped");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        save_png(&path, &RgbImage::new(2, 2), &vec![]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "mode {mode:o} with umask {umask:o}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        std::fs::write(&path, b"old").unwrap();
        let res = write_atomically(&path, |_| Err(std::io::Error::other("disk full")));
        assert!(res.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
