//! What an output image says about how it was made, in the forms other tools read:
//!
//! - an XMP packet (Adobe XMP, ISO 16684-1) with IPTC's `Iptc4xmpExt:DigitalSourceType` set to
//!   [`TRAINED_ALGORITHMIC_MEDIA`], the IPTC term for "created by a trained model", which photo
//!   managers, news-agency tools, exiftool and social platforms read as "AI-generated";
//! - an AUTOMATIC1111-style `parameters` text (`<prompt>\nNegative prompt: ..\nSteps: ..`), which
//!   image browsers and galleries (A1111's PNG Info, ComfyUI, InvokeAI, Civitai, ...) parse;
//! - for JPEG and WebP, which have no text chunks, that text as the EXIF `UserComment`, where
//!   A1111 itself puts it in those formats.
//!
//! [`OutputMetadata`] holds what goes into a file; [`crate::output::save_image`] writes it in
//! each container's standard place.

use crate::output::PngMetadata;

/// IPTC NewsCodes digital source type of media created by a trained algorithmic model.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// The name and version written as the XMP `xmp:CreatorTool` by default.
pub const CREATOR_TOOL: &str = concat!("omnigen-rs ", env!("CARGO_PKG_VERSION"));

/// Everything written into an output image besides its pixels.
///
/// [`OutputMetadata::default`] marks the image as AI-generated and names this software, with no
/// generation parameters; [`OutputMetadata::empty`] writes no metadata at all.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputMetadata {
    /// `(keyword, text)` pairs written as PNG `iTXt` chunks (PNG only: JPEG and WebP have no
    /// text chunks; their XMP and EXIF carry the [`generation`](Self::generation) instead).
    pub text: PngMetadata,
    /// The parameters of the generation: the XMP description and the A1111 `parameters` text
    /// are made from them. `None` writes neither.
    pub generation: Option<GenerationParameters>,
    /// IPTC digital source type URI (XMP `Iptc4xmpExt:DigitalSourceType`); by default
    /// [`TRAINED_ALGORITHMIC_MEDIA`].
    pub digital_source_type: Option<String>,
    /// The software that made the image (XMP `xmp:CreatorTool`); by default [`CREATOR_TOOL`].
    pub creator_tool: Option<String>,
}

impl Default for OutputMetadata {
    fn default() -> Self {
        Self {
            text: Vec::new(),
            generation: None,
            digital_source_type: Some(TRAINED_ALGORITHMIC_MEDIA.to_string()),
            creator_tool: Some(CREATOR_TOOL.to_string()),
        }
    }
}

impl OutputMetadata {
    /// No metadata at all: the file holds only its pixels.
    pub fn empty() -> Self {
        Self {
            text: Vec::new(),
            generation: None,
            digital_source_type: None,
            creator_tool: None,
        }
    }

    /// Whether an XMP packet is written (any of its fields is set).
    pub fn has_xmp(&self) -> bool {
        self.generation.is_some()
            || self.digital_source_type.is_some()
            || self.creator_tool.is_some()
    }

    /// The XMP packet (UTF-8, `<?xpacket?>`-wrapped), or `None` when there is nothing to say.
    /// Every user-supplied string is XML-escaped ([`xml_escape`]).
    pub fn xmp_packet(&self) -> Option<String> {
        if !self.has_xmp() {
            return None;
        }
        let mut attrs = String::new();
        if let Some(uri) = &self.digital_source_type {
            attrs.push_str(&format!(
                "\n    Iptc4xmpExt:DigitalSourceType=\"{}\"",
                xml_escape(uri)
            ));
        }
        if let Some(tool) = &self.creator_tool {
            attrs.push_str(&format!("\n    xmp:CreatorTool=\"{}\"", xml_escape(tool)));
        }
        let mut body = String::new();
        if let Some(g) = &self.generation {
            body.push_str(&format!(
                "\n   <dc:description>\n    <rdf:Alt>\n     \
                 <rdf:li xml:lang=\"x-default\">{}</rdf:li>\n    </rdf:Alt>\n   \
                 </dc:description>",
                xml_escape(&g.prompt)
            ));
            body.push_str(&format!(
                "\n   <exif:UserComment>\n    <rdf:Alt>\n     \
                 <rdf:li xml:lang=\"x-default\">{}</rdf:li>\n    </rdf:Alt>\n   \
                 </exif:UserComment>",
                xml_escape(&g.parameters())
            ));
        }
        Some(format!(
            "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
             <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n \
             <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n  \
             <rdf:Description rdf:about=\"\"\n    \
             xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\"\n    \
             xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\"\n    \
             xmlns:dc=\"http://purl.org/dc/elements/1.1/\"\n    \
             xmlns:exif=\"http://ns.adobe.com/exif/1.0/\"{attrs}>{body}\n  \
             </rdf:Description>\n \
             </rdf:RDF>\n\
             </x:xmpmeta>\n\
             <?xpacket end=\"w\"?>"
        ))
    }
}

/// The parameters of one generated image, as image browsers expect to find them.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    /// The prompt of this image, in the official text form (with its `<|image_N|>` tags).
    pub prompt: String,
    /// The negative prompt used; `None` writes no `Negative prompt:` line.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Sampler name (OmniGen's flow-matching Euler is A1111's `Euler`).
    pub sampler: String,
    /// Text guidance scale (`CFG scale`).
    pub guidance_scale: f32,
    /// Image guidance scale (`Image CFG scale`, as A1111 writes it for instruct-pix2pix);
    /// `None` when the prompt has no input image, since it is then unused.
    pub img_guidance_scale: Option<f32>,
    /// Seed of the run; `None` writes no `Seed` (only for images whose seed is unknown: the
    /// pipeline always has one, see [`crate::io::output_metadata`]).
    pub seed: Option<u64>,
    /// Output `(width, height)` in pixels.
    pub size: (u32, u32),
    /// Short hash of the weights (`Model hash`).
    pub model_hash: Option<String>,
    /// Model name (`Model`).
    pub model: Option<String>,
    /// Software version (`Version`).
    pub version: Option<String>,
    /// Further `key: value` pairs appended after the standard ones.
    pub extra: Vec<(String, String)>,
}

impl GenerationParameters {
    /// The A1111 `parameters` text: the prompt, a `Negative prompt:` line, then one line of
    /// `Key: value` pairs joined by `, ` — values holding `,`, `:` or a line break are JSON-quoted
    /// as A1111 quotes them, so its parser reads them back whole.
    pub fn parameters(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
            ("CFG scale", self.guidance_scale.to_string()),
        ];
        if let Some(g) = self.img_guidance_scale {
            pairs.push(("Image CFG scale", g.to_string()));
        }
        if let Some(seed) = self.seed {
            pairs.push(("Seed", seed.to_string()));
        }
        pairs.push(("Size", format!("{}x{}", self.size.0, self.size.1)));
        if let Some(hash) = &self.model_hash {
            pairs.push(("Model hash", hash.clone()));
        }
        if let Some(model) = &self.model {
            pairs.push(("Model", model.clone()));
        }
        for (k, v) in &self.extra {
            pairs.push((k.as_str(), v.clone()));
        }
        if let Some(version) = &self.version {
            pairs.push(("Version", version.clone()));
        }
        let line = pairs
            .iter()
            .map(|(k, v)| format!("{k}: {}", a1111_quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = self.prompt.clone();
        if let Some(neg) = self.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            out.push_str("\nNegative prompt: ");
            out.push_str(neg);
        }
        out.push('\n');
        out.push_str(&line);
        out
    }
}

/// A1111's `quote`: a value with `,`, `:` or a line break is written as a JSON string.
fn a1111_quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::Value::String(v.to_string()).to_string()
    } else {
        v.to_string()
    }
}

/// Escapes `text` for XML element content and attribute values. Characters XML 1.0 cannot
/// carry at all (C0 controls other than tab, line feed and carriage return; U+FFFE, U+FFFF)
/// become U+FFFD; tab, line feed and carriage return become character references, which
/// survive attribute-value normalisation.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#x9;"),
            '\n' => out.push_str("&#xA;"),
            '\r' => out.push_str("&#xD;"),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// One EXIF field value.
enum ExifValue {
    Short(u16),
    Long(u32),
    Rational(u32, u32),
    Undefined(Vec<u8>),
}

impl ExifValue {
    /// `(TIFF type, count, big-endian bytes)`.
    fn encode(&self) -> (u16, u32, Vec<u8>) {
        match self {
            Self::Short(v) => (3, 1, v.to_be_bytes().to_vec()),
            Self::Long(v) => (4, 1, v.to_be_bytes().to_vec()),
            Self::Rational(n, d) => (5, 1, [n.to_be_bytes(), d.to_be_bytes()].concat()),
            Self::Undefined(bytes) => {
                let count = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                (7, count, bytes.clone())
            }
        }
    }
}

/// One IFD at byte offset `at` of the TIFF block: its directory (entries sorted by tag, as TIFF
/// requires), then the values longer than 4 bytes, each at an even offset.
fn exif_ifd(at: u32, entries: &[(u16, ExifValue)]) -> Vec<u8> {
    let dir_len = 2 + 12 * entries.len() as u32 + 4;
    let (mut dir, mut data) = (Vec::new(), Vec::new());
    dir.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    for (tag, value) in entries {
        let (kind, count, bytes) = value.encode();
        dir.extend_from_slice(&tag.to_be_bytes());
        dir.extend_from_slice(&kind.to_be_bytes());
        dir.extend_from_slice(&count.to_be_bytes());
        if bytes.len() <= 4 {
            // Inline values are left-justified in the 4-byte field.
            let mut field = [0u8; 4];
            field[..bytes.len()].copy_from_slice(&bytes);
            dir.extend_from_slice(&field);
        } else {
            let offset = at.saturating_add(dir_len).saturating_add(data.len() as u32);
            dir.extend_from_slice(&offset.to_be_bytes());
            data.extend_from_slice(&bytes);
            if data.len() % 2 == 1 {
                data.push(0);
            }
        }
    }
    dir.extend_from_slice(&0u32.to_be_bytes());
    dir.extend_from_slice(&data);
    dir
}

/// A big-endian TIFF/EXIF block with `UserComment` (tag 0x9286) = `text` in the `UNICODE`
/// encoding A1111 writes and reads (UCS-2 in the byte order the TIFF header declares), plus the
/// fields EXIF 2.3 requires of a JPEG (versions, colour space, resolution, pixel size), so that
/// validators accept it.
pub(crate) fn exif_user_comment(text: &str, size: (u32, u32)) -> Vec<u8> {
    use ExifValue::*;
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    let ifd0 = |exif_at: u32| {
        vec![
            (0x011a, Rational(72, 1)), // XResolution
            (0x011b, Rational(72, 1)), // YResolution
            (0x0128, Short(2)),        // ResolutionUnit: inches
            (0x0213, Short(1)),        // YCbCrPositioning: centred
            (0x8769, Long(exif_at)),   // ExifIFDPointer
        ]
    };
    // IFD0's length does not depend on the pointer's value, so lay it out once to learn it.
    let ifd0_len = exif_ifd(8, &ifd0(0)).len() as u32;
    let exif_at = 8 + ifd0_len;
    let exif = [
        (0x9000, Undefined(b"0232".to_vec())), // ExifVersion
        (0x9101, Undefined(vec![1, 2, 3, 0])), // ComponentsConfiguration: Y Cb Cr
        (0x9286, Undefined(comment)),          // UserComment
        (0xa000, Undefined(b"0100".to_vec())), // FlashpixVersion
        (0xa001, Short(1)),                    // ColorSpace: sRGB
        (0xa002, Long(size.0)),                // PixelXDimension
        (0xa003, Long(size.1)),                // PixelYDimension
    ];
    let mut tiff = b"MM\0\x2a".to_vec();
    tiff.extend_from_slice(&8u32.to_be_bytes());
    tiff.extend(exif_ifd(8, &ifd0(exif_at)));
    tiff.extend(exif_ifd(exif_at, &exif));
    tiff
}

/// The `UserComment` text of an EXIF block as [`save_image`](crate::output::save_image) writes it (for tests and tools
/// tracing an output); `None` if `tiff` is not such a block.
pub fn read_exif_user_comment(tiff: &[u8]) -> Option<String> {
    let u16_at = |at: usize| Some(u16::from_be_bytes(tiff.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_be_bytes(tiff.get(at..at + 4)?.try_into().ok()?));
    if tiff.get(..4)? != b"MM\0\x2a" {
        return None;
    }
    // Entries of the IFD at `at`: (tag, count, value-or-offset).
    let entries = |at: usize| -> Option<Vec<(u16, u32, u32)>> {
        let n = u16_at(at)? as usize;
        (0..n)
            .map(|i| {
                let e = at + 2 + 12 * i;
                Some((u16_at(e)?, u32_at(e + 4)?, u32_at(e + 8)?))
            })
            .collect()
    };
    let ifd0 = entries(u32_at(4)? as usize)?;
    let exif_at = ifd0.iter().find(|e| e.0 == 0x8769)?.2 as usize;
    let (_, count, at) = *entries(exif_at)?.iter().find(|e| e.0 == 0x9286)?;
    let data = tiff.get(at as usize..(at as usize).checked_add(count as usize)?)?;
    let units: Vec<u16> = data
        .strip_prefix(b"UNICODE\0")?
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParameters {
        GenerationParameters {
            prompt: "a cat".into(),
            negative_prompt: Some("blurry, ugly".into()),
            steps: 20,
            sampler: "Euler".into(),
            guidance_scale: 7.0,
            img_guidance_scale: None,
            seed: Some(1),
            size: (512, 512),
            model_hash: Some("0123456789".into()),
            model: Some("OmniGen-v1".into()),
            version: None,
            extra: vec![],
        }
    }

    #[test]
    fn parameters_follow_a1111() {
        assert_eq!(
            params().parameters(),
            "a cat\nNegative prompt: blurry, ugly\nSteps: 20, Sampler: Euler, CFG scale: 7, \
             Seed: 1, Size: 512x512, Model hash: 0123456789, Model: OmniGen-v1"
        );
        let p = GenerationParameters {
            negative_prompt: None,
            img_guidance_scale: Some(1.6),
            seed: None,
            model: Some("C:\\models, v1".into()),
            ..params()
        };
        assert_eq!(
            p.parameters(),
            "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Image CFG scale: 1.6, \
             Size: 512x512, Model hash: 0123456789, Model: \"C:\\\\models, v1\""
        );
    }

    #[test]
    fn escaping_covers_markup_quotes_and_forbidden_characters() {
        assert_eq!(
            xml_escape("<a href=\"x\">'&'</a>\u{1}\u{ffff}\t\n\r é"),
            "&lt;a href=&quot;x&quot;&gt;&apos;&amp;&apos;&lt;/a&gt;\u{fffd}\u{fffd}\
             &#x9;&#xA;&#xD; é"
        );
    }

    #[test]
    fn empty_metadata_has_no_packet_and_default_only_the_marker() {
        assert_eq!(OutputMetadata::empty().xmp_packet(), None);
        let packet = OutputMetadata::default().xmp_packet().unwrap();
        assert!(packet.contains(TRAINED_ALGORITHMIC_MEDIA), "{packet}");
        assert!(!packet.contains("dc:description"), "{packet}");
    }

    #[test]
    fn user_comment_is_a_valid_big_endian_exif_block() {
        let exif = exif_user_comment("é,\n", (48, 32));
        assert_eq!(&exif[..8], b"MM\0\x2a\0\0\0\x08");
        assert_eq!(read_exif_user_comment(&exif).as_deref(), Some("é,\n"));
        // Tags ascend within each IFD, and every out-of-line value lies inside the block.
        let be16 = |at: usize| u16::from_be_bytes([exif[at], exif[at + 1]]) as usize;
        let be32 = |at: usize| u32::from_be_bytes(exif[at..at + 4].try_into().unwrap()) as usize;
        let mut ifd = be32(4);
        for _ in 0..2 {
            let n = be16(ifd);
            let tags: Vec<usize> = (0..n).map(|i| be16(ifd + 2 + 12 * i)).collect();
            assert!(tags.windows(2).all(|w| w[0] < w[1]), "{tags:x?}");
            for i in 0..n {
                let e = ifd + 2 + 12 * i;
                let bytes = match be16(e + 2) {
                    3 => 2,
                    4 => 4,
                    5 => 8,
                    _ => 1,
                } * be32(e + 4);
                if bytes > 4 {
                    assert!(be32(e + 8) % 2 == 0 && be32(e + 8) + bytes <= exif.len());
                }
            }
            // the second IFD is the Exif IFD that IFD0 points at
            let pointer = (0..n)
                .map(|i| ifd + 2 + 12 * i)
                .find(|&e| be16(e) == 0x8769);
            if let Some(e) = pointer {
                ifd = be32(e + 8);
            }
        }
        assert_eq!(read_exif_user_comment(b"II*\0"), None);
    }
}
