//! `save_image` in each format: the XMP packet and the A1111 text are found where readers look
//! (parsed here from the container's own bytes), the XMP is well-formed XML that gives back the
//! very prompt, and the pixels decode back.

use std::path::Path;

use image::RgbImage;

use super::*;
use crate::provenance::{GenerationParameters, OutputMetadata, TRAINED_ALGORITHMIC_MEDIA};

/// A prompt with every character XML and A1111's format treat specially.
const NASTY: &str = "a <b>cat</b> & \"dog\" 'x' ]]> <!-- -->, key: value\nsecond line \u{1} é 猫";

fn gradient() -> RgbImage {
    RgbImage::from_fn(48, 32, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
    })
}

fn generation(prompt: &str) -> GenerationParameters {
    GenerationParameters {
        prompt: prompt.to_string(),
        negative_prompt: Some("blurry, <ugly>".to_string()),
        steps: 12,
        sampler: "Euler".to_string(),
        guidance_scale: 2.5,
        img_guidance_scale: Some(1.6),
        seed: Some(18446744073709551615),
        size: (48, 32),
        model_hash: Some("0123456789".to_string()),
        model: Some("OmniGen-v1".to_string()),
        version: Some("omnigen-rs test".to_string()),
        extra: vec![],
    }
}

fn metadata(prompt: &str) -> OutputMetadata {
    OutputMetadata {
        text: vec![("prompt".to_string(), prompt.to_string())],
        generation: Some(generation(prompt)),
        ..OutputMetadata::default()
    }
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// `(type, data)` of every PNG chunk, in order.
fn png_chunks(bytes: &[u8]) -> Vec<([u8; 4], &[u8])> {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let len = be32(&bytes[at..]);
        let kind: [u8; 4] = bytes[at + 4..at + 8].try_into().unwrap();
        out.push((kind, &bytes[at + 8..at + 8 + len]));
        at += 12 + len;
    }
    out
}

/// The text of the PNG `iTXt` chunk `keyword`, checking it is stored uncompressed with empty
/// language tag and translated keyword (what the XMP specification requires).
fn png_itxt<'a>(chunks: &[([u8; 4], &'a [u8])], keyword: &str) -> Option<&'a str> {
    chunks.iter().find_map(|(kind, data)| {
        let rest = data.strip_prefix(keyword.as_bytes())?.strip_prefix(b"\0")?;
        (kind == b"iTXt").then_some(())?;
        assert_eq!(&rest[..2], &[0, 0], "compressed iTXt");
        assert_eq!(&rest[2..4], b"\0\0", "language tag / translated keyword");
        Some(std::str::from_utf8(&rest[4..]).unwrap())
    })
}

/// The payloads of the JPEG `APP1` segments that start with `signature`, before the scan.
fn jpeg_app1<'a>(bytes: &'a [u8], signature: &[u8]) -> Vec<&'a [u8]> {
    assert_eq!(&bytes[..2], &[0xFF, 0xD8]);
    let mut out = Vec::new();
    let mut at = 2;
    while bytes[at] == 0xFF && bytes[at + 1] != 0xDA {
        let len = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
        let payload = &bytes[at + 4..at + 2 + len];
        if bytes[at + 1] == 0xE1 {
            if let Some(body) = payload.strip_prefix(signature) {
                out.push(body);
            }
        }
        at += 2 + len;
    }
    out
}

/// `(fourcc, data)` of every chunk of a RIFF WebP file.
fn webp_chunks(bytes: &[u8]) -> Vec<([u8; 4], &[u8])> {
    assert_eq!(&bytes[..4], b"RIFF");
    assert_eq!(&bytes[8..12], b"WEBP");
    let riff_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    assert_eq!(riff_len + 8, bytes.len(), "RIFF size");
    let mut out = Vec::new();
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let kind: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        out.push((kind, &bytes[at + 8..at + 8 + len]));
        at += 8 + len + len % 2;
    }
    out
}

/// Parses `xml` with a real XML parser (so it must be well-formed and namespace-correct) and
/// returns the `Iptc4xmpExt:DigitalSourceType` attribute and the `dc:description` text.
fn read_xmp(xml: &str) -> (Option<String>, Option<String>) {
    use xml::reader::{EventReader, XmlEvent};
    const IPTC: &str = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/";
    const DC: &str = "http://purl.org/dc/elements/1.1/";
    let (mut source_type, mut description) = (None, None);
    let mut in_description = false;
    for event in EventReader::new(xml.as_bytes()) {
        match event.unwrap_or_else(|e| panic!("XMP is not well-formed XML: {e}\n{xml}")) {
            XmlEvent::StartElement {
                name, attributes, ..
            } => {
                for a in attributes {
                    if a.name.namespace.as_deref() == Some(IPTC)
                        && a.name.local_name == "DigitalSourceType"
                    {
                        source_type = Some(a.value);
                    }
                }
                if name.namespace.as_deref() == Some(DC) && name.local_name == "description" {
                    in_description = true;
                }
            }
            XmlEvent::EndElement { name } if name.local_name == "description" => {
                in_description = false;
            }
            XmlEvent::Characters(text) if in_description => {
                description.get_or_insert_with(String::new).push_str(&text);
            }
            _ => {}
        }
    }
    (source_type, description)
}

/// The prompt as XMP can carry it: XML 1.0 cannot hold U+0001.
fn xml_form(prompt: &str) -> String {
    prompt.replace('\u{1}', "\u{fffd}")
}

/// What A1111's `parse_generation_parameters` reads back from a `parameters` text: the prompt,
/// the negative prompt and the `Key: value` pairs of the last line (JSON-quoted values unquoted).
fn parse_a1111(text: &str) -> (String, String, Vec<(String, String)>) {
    let (head, last) = text.rsplit_once('\n').unwrap();
    let (prompt, negative) = match head.split_once("\nNegative prompt: ") {
        Some((p, n)) => (p.to_string(), n.to_string()),
        None => (head.to_string(), String::new()),
    };
    let mut pairs = Vec::new();
    let mut rest = last;
    while !rest.is_empty() {
        let (key, after) = rest.split_once(": ").unwrap();
        let (value, next) = if after.starts_with('"') {
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
            let value = de.next().unwrap().unwrap();
            (value, &after[de.byte_offset()..])
        } else {
            let end = after.find(", ").unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.to_string(), value));
        rest = next.strip_prefix(", ").unwrap_or(next);
    }
    (prompt, negative, pairs)
}

fn check_parameters(text: &str, prompt: &str) {
    let (p, n, pairs) = parse_a1111(text);
    assert_eq!(p, prompt);
    assert_eq!(n, "blurry, <ugly>");
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("Steps"), Some("12"));
    assert_eq!(get("Sampler"), Some("Euler"));
    assert_eq!(get("CFG scale"), Some("2.5"));
    assert_eq!(get("Image CFG scale"), Some("1.6"));
    assert_eq!(get("Seed"), Some("18446744073709551615"));
    assert_eq!(get("Size"), Some("48x32"));
    assert_eq!(get("Model hash"), Some("0123456789"));
    assert_eq!(get("Model"), Some("OmniGen-v1"));
}

fn exif_comment(tiff: &[u8]) -> String {
    crate::provenance::read_exif_user_comment(tiff).expect("no UserComment")
}

fn write(format: ImageFormat, meta: &OutputMetadata) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("out.{}", format.name()));
    save_image(&path, &gradient(), format, meta).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // nothing but the image is left behind
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    (dir, bytes)
}

#[test]
fn png_carries_xmp_before_the_pixels_and_a1111_parameters() {
    let (_dir, bytes) = write(ImageFormat::Png, &metadata(NASTY));
    let chunks = png_chunks(&bytes);
    let xmp = png_itxt(&chunks, PNG_XMP_KEYWORD).expect("no XMP iTXt chunk");
    let xmp_at = chunks
        .iter()
        .position(|(_, d)| d.starts_with(b"XML:com.adobe.xmp\0"));
    let idat_at = chunks.iter().position(|(k, _)| k == b"IDAT");
    assert!(xmp_at < idat_at, "XMP must precede IDAT");
    assert!(!xmp.contains(NASTY), "the prompt went into XML unescaped");
    let (source, description) = read_xmp(xmp);
    assert_eq!(source.as_deref(), Some(TRAINED_ALGORITHMIC_MEDIA));
    assert_eq!(description, Some(xml_form(NASTY)));
    // `parameters` has a non-Latin-1 character (猫), so it is iTXt, as Pillow writes it.
    check_parameters(png_itxt(&chunks, "parameters").unwrap(), NASTY);
    assert_eq!(
        image::load_from_memory(&bytes).unwrap().to_rgb8(),
        gradient()
    );
}

#[test]
fn latin1_parameters_are_a_text_chunk() {
    let (_dir, bytes) = write(ImageFormat::Png, &metadata("a cat, 2 dogs"));
    let chunks = png_chunks(&bytes);
    let text = chunks
        .iter()
        .find_map(|(k, d)| (k == b"tEXt").then_some(*d)?.strip_prefix(b"parameters\0"))
        .expect("no tEXt parameters");
    let text: String = text.iter().map(|&b| b as char).collect();
    check_parameters(&text, "a cat, 2 dogs");
}

#[test]
fn jpeg_carries_xmp_and_exif_in_app1() {
    let (_dir, bytes) = write(ImageFormat::Jpeg { quality: 95 }, &metadata(NASTY));
    let xmp = jpeg_app1(&bytes, JPEG_XMP_SIGNATURE);
    assert_eq!(xmp.len(), 1, "one XMP segment");
    let (source, description) = read_xmp(std::str::from_utf8(xmp[0]).unwrap());
    assert_eq!(source.as_deref(), Some(TRAINED_ALGORITHMIC_MEDIA));
    assert_eq!(description, Some(xml_form(NASTY)));
    let exif = jpeg_app1(&bytes, b"Exif\0\0");
    assert_eq!(exif.len(), 1, "one EXIF segment");
    check_parameters(&exif_comment(exif[0]), NASTY);
    let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(back.dimensions(), gradient().dimensions());
    let mean_err = back
        .as_raw()
        .iter()
        .zip(gradient().as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / back.as_raw().len() as f64;
    assert!(mean_err < 3.0, "JPEG mean error {mean_err}");
}

#[test]
fn webp_carries_xmp_flagged_in_vp8x_and_is_lossless() {
    let (_dir, bytes) = write(ImageFormat::WebP, &metadata(NASTY));
    let chunks = webp_chunks(&bytes);
    assert_eq!(&chunks[0].0, b"VP8X", "extended header first");
    let flags = chunks[0].1[0];
    assert!(flags & 0b100 != 0, "XMP flag");
    assert!(flags & 0b1000 != 0, "EXIF flag");
    let xmp = chunks
        .iter()
        .find(|(k, _)| k == b"XMP ")
        .expect("XMP chunk")
        .1;
    let (source, description) = read_xmp(std::str::from_utf8(xmp).unwrap());
    assert_eq!(source.as_deref(), Some(TRAINED_ALGORITHMIC_MEDIA));
    assert_eq!(description, Some(xml_form(NASTY)));
    let exif = chunks
        .iter()
        .find(|(k, _)| k == b"EXIF")
        .expect("EXIF chunk")
        .1;
    check_parameters(&exif_comment(exif), NASTY);
    let mut decoder = image_webp::WebPDecoder::new(std::io::Cursor::new(&bytes)).unwrap();
    let mut pixels = vec![0; decoder.output_buffer_size().unwrap()];
    decoder.read_image(&mut pixels).unwrap();
    assert_eq!(pixels, gradient().into_raw());
}

#[test]
fn a_prompt_too_long_for_a_jpeg_segment_is_shortened_in_the_jpeg_only() {
    let long = "<&>".repeat(40_000);
    let (_dir, bytes) = write(ImageFormat::Jpeg { quality: 80 }, &metadata(&long));
    let xmp = jpeg_app1(&bytes, JPEG_XMP_SIGNATURE);
    let (source, description) = read_xmp(std::str::from_utf8(xmp[0]).unwrap());
    assert_eq!(source.as_deref(), Some(TRAINED_ALGORITHMIC_MEDIA));
    let description = description.unwrap();
    assert!(description.ends_with('…') && description.len() < long.len());
    assert!(long.starts_with(description.trim_end_matches('…')));
    assert_eq!(jpeg_app1(&bytes, b"Exif\0\0").len(), 1);
    assert!(image::load_from_memory(&bytes).is_ok());
    // PNG keeps it whole.
    let (_dir, bytes) = write(ImageFormat::Png, &metadata(&long));
    let xmp = png_itxt(&png_chunks(&bytes), PNG_XMP_KEYWORD).unwrap();
    assert_eq!(read_xmp(xmp).1, Some(long));
}

#[test]
fn empty_metadata_writes_no_xmp_and_default_only_the_marker() {
    for format in [
        ImageFormat::Png,
        ImageFormat::Jpeg { quality: 90 },
        ImageFormat::WebP,
    ] {
        let (_dir, bytes) = write(format, &OutputMetadata::empty());
        let needle = b"adobe:ns:meta";
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{format}"
        );
        let (_dir, bytes) = write(format, &OutputMetadata::default());
        let xml = bytes
            .windows(9)
            .position(|w| w == b"<?xpacket")
            .map(|at| String::from_utf8_lossy(&bytes[at..]).into_owned())
            .unwrap();
        let end = xml.find("<?xpacket end=\"w\"?>").unwrap() + 19;
        assert_eq!(
            read_xmp(&xml[..end]),
            (Some(TRAINED_ALGORITHMIC_MEDIA.to_string()), None),
            "{format}"
        );
    }
}

#[test]
fn bad_images_and_qualities_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.jpg");
    let meta = OutputMetadata::default();
    let err = save_image(&path, &RgbImage::new(0, 4), ImageFormat::WebP, &meta).unwrap_err();
    assert!(matches!(err, Error::InvalidImage { .. }), "{err}");
    let err = save_image(&path, &gradient(), ImageFormat::Jpeg { quality: 0 }, &meta).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "jpeg_quality",
                ..
            }
        ),
        "{err}"
    );
    let huge = RgbImage::new(16385, 1);
    let err = save_image(&path, &huge, ImageFormat::WebP, &meta).unwrap_err();
    assert!(err.to_string().contains("larger than WebP allows"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn formats_parse_from_names_and_extensions() {
    assert_eq!(
        "JPG".parse::<ImageFormat>().unwrap(),
        ImageFormat::Jpeg { quality: 90 }
    );
    assert_eq!("webp".parse::<ImageFormat>().unwrap(), ImageFormat::WebP);
    assert!("gif".parse::<ImageFormat>().is_err());
    assert_eq!(
        ImageFormat::for_path(Path::new("a/b.WebP")),
        ImageFormat::WebP
    );
    assert_eq!(ImageFormat::for_path(Path::new("a/b.jpeg")).name(), "jpeg");
    assert_eq!(ImageFormat::for_path(Path::new("a/b")), ImageFormat::Png);
    assert_eq!(ImageFormat::from_extension(Path::new("b.gif")), None);
}
