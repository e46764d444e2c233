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
    /// Seed; `None` (an unseeded run, not reproducible) writes no `Seed`.
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

/// A big-endian TIFF/EXIF block holding only `UserComment` (tag 0x9286) = `text`, in the
/// `UNICODE` (UCS-2, here the big-endian byte order the TIFF header declares) encoding A1111
/// writes and reads.
pub(crate) fn exif_user_comment(text: &str) -> Vec<u8> {
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    // Layout: header (8) | IFD0: 1 entry (2 + 12 + 4) | Exif IFD: 1 entry (2 + 12 + 4) | data.
    const EXIF_IFD: u32 = 8 + 18;
    const DATA: u32 = EXIF_IFD + 18;
    let mut tiff = Vec::with_capacity(DATA as usize + comment.len());
    tiff.extend_from_slice(b"MM\0\x2a");
    tiff.extend_from_slice(&8u32.to_be_bytes());
    let mut ifd = |tag: u16, kind: u16, count: u32, value: u32| {
        tiff.extend_from_slice(&1u16.to_be_bytes());
        tiff.extend_from_slice(&tag.to_be_bytes());
        tiff.extend_from_slice(&kind.to_be_bytes());
        tiff.extend_from_slice(&count.to_be_bytes());
        tiff.extend_from_slice(&value.to_be_bytes());
        tiff.extend_from_slice(&0u32.to_be_bytes());
    };
    // ExifIFDPointer (LONG) in IFD0, then UserComment (UNDEFINED) in the Exif IFD.
    ifd(0x8769, 4, 1, EXIF_IFD);
    let len = u32::try_from(comment.len()).unwrap_or(u32::MAX);
    ifd(0x9286, 7, len, DATA);
    tiff.extend_from_slice(&comment);
    tiff
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
        let exif = exif_user_comment("é,\n");
        assert_eq!(&exif[..8], b"MM\0\x2a\0\0\0\x08");
        // IFD0's one entry points at the Exif IFD, whose one entry is UserComment.
        assert_eq!(&exif[10..12], &0x8769u16.to_be_bytes());
        let exif_ifd = u32::from_be_bytes(exif[18..22].try_into().unwrap()) as usize;
        assert_eq!(&exif[exif_ifd + 2..exif_ifd + 4], &0x9286u16.to_be_bytes());
        let count = u32::from_be_bytes(exif[exif_ifd + 6..exif_ifd + 10].try_into().unwrap());
        let at = u32::from_be_bytes(exif[exif_ifd + 10..exif_ifd + 14].try_into().unwrap());
        let data = &exif[at as usize..at as usize + count as usize];
        assert_eq!(&data[..8], b"UNICODE\0");
        let units: Vec<u16> = data[8..]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&units).unwrap(), "é,\n");
        assert_eq!(at as usize + count as usize, exif.len());
    }
}
