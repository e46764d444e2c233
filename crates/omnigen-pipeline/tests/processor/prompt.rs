//! Property tests of the prompt parser and builder.

use omnigen_pipeline::{
    check_placeholders, image_placeholder, parse_segments, ConditionImage, Prompt, PromptSegment,
};
use proptest::prelude::*;

fn image() -> ConditionImage {
    ConditionImage::from_rgb(1, 1, vec![1, 2, 3])
}

/// Strings rich in placeholder-like fragments.
pub(crate) fn tricky_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<|image_".to_string()),
        Just("|>".to_string()),
        Just("<img>".to_string()),
        Just("</img>".to_string()),
        Just("<|image_1|>".to_string()),
        Just("<|image_2|>".to_string()),
        Just("<".to_string()),
        Just("|".to_string()),
        "[0-9]{1,25}",
        "\\PC{0,6}",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

/// Builder pieces: text without placeholders, or an image.
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Image,
}

fn pieces() -> impl Strategy<Value = Vec<Piece>> {
    let text = "[^<]{0,12}".prop_map(Piece::Text);
    prop::collection::vec(prop_oneof![text, Just(Piece::Image)], 0..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parser_never_panics_and_reassembles(text in tricky_text(), n in 0usize..4) {
        let segments = parse_segments(&text);
        // Text segments and placeholders alternate, starting and ending with text.
        prop_assert_eq!(segments.len() % 2, 1);
        let mut rebuilt = String::new();
        for (i, s) in segments.iter().enumerate() {
            match s {
                PromptSegment::Text(t) => { prop_assert_eq!(i % 2, 0); rebuilt.push_str(t); }
                PromptSegment::Image(_) => { prop_assert_eq!(i % 2, 1); }
            }
        }
        // Removing the placeholders from the text leaves exactly the text segments.
        let placeholders = segments.iter().filter(|s| matches!(s, PromptSegment::Image(_))).count();
        prop_assert!(rebuilt.len() <= text.len());
        prop_assert!(placeholders <= text.matches("<|image_").count());
        let _ = check_placeholders(&text, n);
        let _ = Prompt::from_text(text.clone(), vec![image(); n]);
    }

    #[test]
    fn arbitrary_unicode_never_panics(text in any::<String>(), n in 0usize..3) {
        let _ = parse_segments(&text);
        let _ = Prompt::from_text(text, vec![image(); n]);
    }

    #[test]
    fn builder_and_text_forms_round_trip(pieces in pieces()) {
        let mut built = Prompt::new();
        let mut text = String::new();
        let mut images = 0;
        let mut expected = vec![PromptSegment::Text(String::new())];
        for p in &pieces {
            match p {
                Piece::Text(t) => {
                    built = built.text(t);
                    text.push_str(t);
                    if let Some(PromptSegment::Text(last)) = expected.last_mut() { last.push_str(t); }
                }
                Piece::Image => {
                    built = built.image(image());
                    images += 1;
                    text.push_str(&image_placeholder(images));
                    if let Some(PromptSegment::Text(last)) = expected.last_mut() { last.push_str("<img>"); }
                    expected.push(PromptSegment::Image(images as u64));
                    expected.push(PromptSegment::Text("</img>".to_string()));
                }
            }
        }
        prop_assert_eq!(built.as_text(), text.as_str());
        prop_assert_eq!(built.images().len(), images);
        prop_assert_eq!(built.segments(), expected.clone());
        if images > 0 || !text.trim().is_empty() {
            let parsed = Prompt::from_text(text.clone(), vec![image(); images]).unwrap();
            prop_assert_eq!(parsed.as_text(), built.as_text());
            prop_assert_eq!(parsed.segments(), expected);
            prop_assert_eq!(built.check().unwrap(), (1..=images as u64).collect::<Vec<_>>());
        }
    }
}
