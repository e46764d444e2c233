//! Writing generated images: atomically (temp file + rename, so a failure never leaves a partial
//! file), as PNG, JPEG or lossless WebP, with the provenance metadata
//! ([`OutputMetadata`]) in the place each format's readers
//! look for it:
//!
//! | format | XMP packet | A1111 `parameters` text | text pairs |
//! |---|---|---|---|
//! | PNG | `iTXt` `XML:com.adobe.xmp`, uncompressed, before `IDAT` | `tEXt` `parameters` (`iTXt` when not Latin-1) | `iTXt` chunks |
//! | JPEG | `APP1` `http://ns.adobe.com/xap/1.0/` | EXIF `UserComment` (`APP1` `Exif`) | — |
//! | WebP | `XMP ` chunk, flagged in `VP8X` | EXIF `UserComment` (`EXIF` chunk) | — |
//!
//! A JPEG segment holds at most 64 KiB: a prompt too long for one is shortened (with `…`) in
//! the JPEG's copy only, with a warning; PNG and WebP carry it whole.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use image::RgbImage;
use omnigen_core::{Error, Result};

use crate::provenance::{exif_user_comment, GenerationParameters, OutputMetadata};

/// `(keyword, text)` pairs stored as PNG `iTXt` chunks.
pub type PngMetadata = Vec<(String, String)>;

/// The file format of an output image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG, lossless.
    Png,
    /// Baseline JPEG, lossy, with this quality (1..=100).
    Jpeg {
        /// Encoder quality, 1 (smallest) to 100 (best).
        quality: u8,
    },
    /// WebP, lossless (VP8L).
    WebP,
}

impl ImageFormat {
    /// The JPEG quality [`ImageFormat::from_str`] and [`ImageFormat::for_path`] pick.
    pub const DEFAULT_JPEG_QUALITY: u8 = 90;

    /// The format a file name's extension names (`png`; `jpg`, `jpeg`; `webp`; any case), or
    /// `None` for another or no extension.
    pub fn from_extension(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        ext.parse().ok()
    }

    /// The format for writing `path`: its extension's ([`from_extension`](Self::from_extension)),
    /// PNG when the extension names none.
    pub fn for_path(path: &Path) -> Self {
        Self::from_extension(path).unwrap_or(Self::Png)
    }

    /// The format's short name: `png`, `jpeg` or `webp`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg { .. } => "jpeg",
            Self::WebP => "webp",
        }
    }
}

impl FromStr for ImageFormat {
    type Err = Error;

    /// `png`, `jpeg` or `jpg` (quality [`DEFAULT_JPEG_QUALITY`](Self::DEFAULT_JPEG_QUALITY)),
    /// `webp`; any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            "jpeg" | "jpg" => Ok(Self::Jpeg {
                quality: Self::DEFAULT_JPEG_QUALITY,
            }),
            "webp" => Ok(Self::WebP),
            _ => Err(Error::invalid_argument(
                "format",
                format!("`{s}` is not an image format (png, jpeg, webp)"),
            )),
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The keyword of the PNG `iTXt` chunk that holds XMP (XMP specification part 3, 1.1.5).
pub const PNG_XMP_KEYWORD: &str = "XML:com.adobe.xmp";
/// The identifier that starts a JPEG `APP1` segment holding XMP (XMP specification part 3).
pub const JPEG_XMP_SIGNATURE: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";
/// The identifier that starts a JPEG `APP1` segment holding EXIF.
const JPEG_EXIF_SIGNATURE: &[u8] = b"Exif\0\0";
/// The most a JPEG marker segment's payload can hold (its length field counts itself).
const JPEG_SEGMENT_MAX: usize = u16::MAX as usize - 2;

/// Writes `image` at `path` in `format`, atomically, with `metadata` in that format's standard
/// places (see the [module docs](self)).
///
/// Fails with [`Error::InvalidImage`] for an empty image (or one larger than WebP's 16384²
/// for [`ImageFormat::WebP`]), [`Error::InvalidArgument`] for a JPEG quality outside 1..=100,
/// and [`Error::Io`] naming `path` when the file cannot be written.
pub fn save_image(
    path: &Path,
    image: &RgbImage,
    format: ImageFormat,
    metadata: &OutputMetadata,
) -> Result<()> {
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::InvalidImage {
            source_name: path.display().to_string(),
            reason: format!(
                "cannot write an empty {}x{} image",
                image.width(),
                image.height()
            ),
        });
    }
    match format {
        ImageFormat::Png => write_atomically(path, |file| write_png(file, image, metadata)),
        ImageFormat::Jpeg { quality } => {
            if !(1..=100).contains(&quality) {
                return Err(Error::invalid_argument(
                    "jpeg_quality",
                    format!("{quality} is outside 1..=100"),
                ));
            }
            let bytes =
                encode_jpeg(image, quality, metadata).map_err(|e| Error::io("encode", path, e))?;
            write_atomically(path, |file| file.write_all(&bytes))
        }
        ImageFormat::WebP => {
            const WEBP_MAX: u32 = 1 << 14;
            if image.width() > WEBP_MAX || image.height() > WEBP_MAX {
                return Err(Error::InvalidImage {
                    source_name: path.display().to_string(),
                    reason: format!(
                        "{}x{} is larger than WebP allows ({WEBP_MAX}x{WEBP_MAX})",
                        image.width(),
                        image.height()
                    ),
                });
            }
            write_atomically(path, |file| write_webp(file, image, metadata))
        }
    }
}

fn write_png(out: impl Write, image: &RgbImage, metadata: &OutputMetadata) -> std::io::Result<()> {
    let other = |e: png::EncodingError| std::io::Error::other(e.to_string());
    let mut encoder = png::Encoder::new(out, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(packet) = metadata.xmp_packet() {
        // ITXtChunk::new is uncompressed, with empty language tag and translated keyword,
        // which is the form the XMP specification requires.
        encoder
            .add_itxt_chunk(PNG_XMP_KEYWORD.into(), packet)
            .map_err(other)?;
    }
    if let Some(generation) = &metadata.generation {
        let text = generation.parameters();
        // Pillow (and so A1111) writes `tEXt` when the text is Latin-1, `iTXt` otherwise.
        if text.chars().all(|c| (c as u32) < 0x100) {
            encoder
                .add_text_chunk("parameters".into(), text)
                .map_err(other)?;
        } else {
            encoder
                .add_itxt_chunk("parameters".into(), text)
                .map_err(other)?;
        }
    }
    for (key, text) in &metadata.text {
        encoder
            .add_itxt_chunk(key.clone(), text.clone())
            .map_err(other)?;
    }
    let mut writer = encoder.write_header().map_err(other)?;
    writer.write_image_data(image.as_raw()).map_err(other)?;
    writer.finish().map_err(other)
}

fn write_webp(
    file: &mut std::fs::File,
    image: &RgbImage,
    metadata: &OutputMetadata,
) -> std::io::Result<()> {
    let mut encoder = image_webp::WebPEncoder::new(std::io::BufWriter::new(&mut *file));
    if let Some(packet) = metadata.xmp_packet() {
        encoder.set_xmp_metadata(packet.into_bytes());
    }
    if let Some(generation) = &metadata.generation {
        encoder.set_exif_metadata(exif_user_comment(
            &generation.parameters(),
            image.dimensions(),
        ));
    }
    encoder
        .encode(
            image.as_raw(),
            image.width(),
            image.height(),
            image_webp::ColorType::Rgb8,
        )
        .map_err(|e| match e {
            image_webp::EncodingError::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
}

/// The JPEG bytes: the encoder's stream with the EXIF and XMP `APP1` segments spliced in right
/// after its `SOI` and `APP0` (JFIF), where readers expect them.
fn encode_jpeg(
    image: &RgbImage,
    quality: u8,
    metadata: &OutputMetadata,
) -> std::io::Result<Vec<u8>> {
    let mut stream = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut stream, quality)
        .encode(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (exif, xmp) = jpeg_segments(metadata, image.dimensions());
    // SOI is 2 bytes; the encoder writes an APP0 (JFIF) segment right after it.
    let at = match stream.get(2..6) {
        Some(&[0xFF, 0xE0, hi, lo]) => {
            (4 + u16::from_be_bytes([hi, lo]) as usize).min(stream.len())
        }
        _ => 2.min(stream.len()),
    };
    let extra = [&exif, &xmp]
        .iter()
        .filter_map(|b| b.as_ref())
        .map(|b| b.len() + 64)
        .sum::<usize>();
    let mut out = Vec::with_capacity(stream.len() + extra);
    out.extend_from_slice(&stream[..at]);
    for (signature, body) in [(JPEG_EXIF_SIGNATURE, exif), (JPEG_XMP_SIGNATURE, xmp)] {
        if let Some(body) = body {
            let len = (2 + signature.len() + body.len()) as u16;
            out.extend_from_slice(&[0xFF, 0xE1]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(signature);
            out.extend_from_slice(&body);
        }
    }
    out.extend_from_slice(&stream[at..]);
    Ok(out)
}

/// The EXIF and XMP payloads of a JPEG, each fitting one segment: a prompt or negative prompt
/// too long for that is shortened, the longer first (a JPEG cannot hold more without the
/// rarely-read ExtendedXMP).
fn jpeg_segments(
    metadata: &OutputMetadata,
    size: (u32, u32),
) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let fits = |sig: &[u8], body: &[u8]| sig.len() + body.len() <= JPEG_SEGMENT_MAX;
    let mut meta = metadata.clone();
    let mut shortened = false;
    loop {
        let exif = meta
            .generation
            .as_ref()
            .map(|g| exif_user_comment(&g.parameters(), size));
        let xmp = meta.xmp_packet().map(String::into_bytes);
        let ok = exif.as_deref().is_none_or(|b| fits(JPEG_EXIF_SIGNATURE, b))
            && xmp.as_deref().is_none_or(|b| fits(JPEG_XMP_SIGNATURE, b));
        if ok {
            if shortened {
                tracing::warn!(
                    "the generation parameters are too long for a JPEG metadata segment \
                     (64 KiB): the JPEG holds a shortened copy; write PNG or WebP to keep them whole"
                );
            }
            return (exif, xmp);
        }
        shortened = true;
        // Each pass removes something, so the loop ends: first text of the prompts, then (a
        // huge model name or extra value) the parameters, then a huge creator tool.
        if let Some(g) = meta.generation.as_mut() {
            if !shorten(g) {
                meta.generation = None;
            }
        } else if meta.creator_tool.is_some() {
            meta.creator_tool = None;
        } else {
            tracing::warn!("the XMP packet is too long for a JPEG segment: the JPEG has none");
            return (None, None);
        }
    }
}

/// Cuts the longer of the prompt and negative prompt to three quarters of its characters, with
/// a `…`; `false` when both are too short for that to shorten them.
fn shorten(g: &mut GenerationParameters) -> bool {
    let prompt_len = g.prompt.chars().count();
    let text = match g.negative_prompt.as_mut() {
        Some(neg) if neg.chars().count() > prompt_len => neg,
        _ => &mut g.prompt,
    };
    let len = text.chars().count();
    // keep + 1 (the `…`) < len needs len >= 5.
    if len < 5 {
        return false;
    }
    let cut: String = text.chars().take(len * 3 / 4).collect();
    *text = cut + "…";
    true
}

/// Writes `image` as a PNG at `path`, atomically; `metadata` goes into `iTXt` text chunks and
/// nothing else (no XMP: [`save_image`] with an [`OutputMetadata`] writes that).
pub fn save_png(path: &Path, image: &RgbImage, metadata: &PngMetadata) -> Result<()> {
    let metadata = OutputMetadata {
        text: metadata.clone(),
        ..OutputMetadata::empty()
    };
    write_atomically(path, |file| write_png(file, image, &metadata))
}

/// `image` as PNG bytes with `metadata` (XMP, A1111 `parameters`, text chunks), the same bytes
/// [`save_image`] writes for [`ImageFormat::Png`]: for callers that send images elsewhere than
/// a file (a server's response).
pub fn encode_png(image: &RgbImage, metadata: &OutputMetadata) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_png(&mut bytes, image, metadata).map_err(|e| Error::InvalidImage {
        source_name: format!("generated image {}x{}", image.width(), image.height()),
        reason: format!("cannot encode as PNG: {e}"),
    })?;
    Ok(bytes)
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
    // Held until this process ends or the file is renamed: a `.partial` nobody holds is the
    // leftover of a killed run, which the sweep below may remove.
    lock_exclusive(tmp.as_file());
    write(tmp.as_file_mut())
        .and_then(|()| tmp.as_file_mut().flush())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io("write", path, e))?;
    tmp.persist(path)
        .map_err(|e| Error::io("write", path, e.error))?;
    remove_stale_partials(dir);
    Ok(())
}

/// Takes an exclusive advisory lock on `file` without waiting; whether it got it.
fn lock_exclusive(file: &std::fs::File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor this function's caller owns.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        false
    }
}

/// Removes the `.omnigen-*.partial` files in `dir` left by killed runs: files no live writer
/// holds the lock of, a few seconds old (a file just created by another writer may not be
/// locked yet). Best effort: what cannot be removed stays.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(".omnigen-") && name.ends_with(".partial")) {
            continue;
        }
        let path = entry.path();
        let old = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() >= 2);
        if !old {
            continue;
        }
        if let Ok(file) = std::fs::File::open(&path) {
            if lock_exclusive(&file) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
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
            let what = format!(
                "it is a {}, not a regular file",
                omnigen_core::files::file_kind(&meta)
            );
            Err(Error::io("write", path, std::io::Error::new(kind, what)))
        }
        _ => Ok(()),
    }
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
            encode_png(
                &img,
                &OutputMetadata {
                    text: meta.clone(),
                    ..OutputMetadata::empty()
                }
            )
            .unwrap(),
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

    #[cfg(unix)]
    #[test]
    fn a_killed_runs_partial_is_removed_by_the_next_write_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".omnigen-dead.partial");
        std::fs::write(&stale, b"half a png").unwrap();
        let live = dir.path().join(".omnigen-live.partial");
        let held = std::fs::File::create(&live).unwrap();
        assert!(lock_exclusive(&held));
        let two_seconds_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(5);
        for p in [&stale, &live] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(two_seconds_ago)
                .unwrap();
        }
        let other = dir.path().join("keep.partial");
        std::fs::write(&other, b"not ours").unwrap();
        save_png(&dir.path().join("out.png"), &RgbImage::new(2, 2), &vec![]).unwrap();
        assert!(!stale.exists(), "the killed run's partial survived");
        assert!(live.exists(), "a partial a live writer holds was removed");
        assert!(other.exists());
        drop(held);
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

#[cfg(test)]
#[path = "output_tests.rs"]
mod format_tests;
