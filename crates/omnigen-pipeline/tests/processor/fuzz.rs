//! Property-based fuzzing of the prompt path as a generation takes it: arbitrary text (rich in
//! `<img>`, `<|image_N|>` fragments, huge `N`, any Unicode) with 0-2 images, through
//! `Prompt::from_text` and the processor (placeholders, tokenizer, images, collation). Each
//! input gives `Ok` or a typed error, never a panic. Bounded so it runs in seconds.

use omnigen_core::Error;
use omnigen_pipeline::{ConditionImage, OmniGenProcessor, ProcessorOptions, Prompt, PromptError};
use proptest::prelude::*;

use crate::prompt::tricky_text;
use crate::support::fixture_a;

/// `default` cases, or `PROPTEST_CASES` for a longer campaign (`with_cases` alone would
/// ignore the variable).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Text with placeholders whose numbers are near or past `u64::MAX`.
fn huge_placeholders() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("0".to_string()),
        Just("00000000000000000000001".to_string()),
        "[1-9][0-9]{18,80}",
    ];
    (tricky_text(), number, tricky_text())
        .prop_map(|(a, n, b)| format!("{a}<img><|image_{n}|></img>{b}"))
}

/// The tiny checkpoint's processor, loaded once for all cases.
fn processor() -> &'static OmniGenProcessor {
    static PROCESSOR: std::sync::OnceLock<OmniGenProcessor> = std::sync::OnceLock::new();
    PROCESSOR.get_or_init(|| OmniGenProcessor::from_dir(fixture_a("model")).unwrap())
}

fn image() -> ConditionImage {
    ConditionImage::from_rgb(16, 24, (0..16 * 24 * 3).map(|i| i as u8).collect())
}

/// Whether `e` is one of the errors a bad prompt may give.
fn is_prompt_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Prompt(_) | Error::Tokenizer { .. } | Error::InvalidArgument { .. }
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(96)))]

    #[test]
    fn processing_any_prompt_is_ok_or_a_typed_error(
        text in prop_oneof![tricky_text(), huge_placeholders(), any::<String>()],
        negative in proptest::option::of(tricky_text()),
        n in 0usize..3,
        joint in any::<bool>(),
    ) {
        let processor = processor();
        let options = ProcessorOptions {
            height: 32,
            width: 48,
            negative_prompt: negative,
            max_input_image_size: 32,
            separate_cfg_infer: !joint,
            ..ProcessorOptions::default()
        };
        // Both ways in: the checked constructor, and the unchecked `From` the processor checks.
        let checked = Prompt::from_text(text.clone(), vec![image(); n]);
        if let Err(e) = &checked {
            prop_assert!(matches!(e, Error::Prompt(_)), "{e:?}");
        }
        let unchecked = Prompt::from(text.as_str());
        for prompt in checked.into_iter().chain([unchecked]) {
            if let Err(e) = processor.process(&[prompt], &options) {
                prop_assert!(is_prompt_error(&e), "{e:?}");
            }
        }
    }
}

#[test]
fn a_placeholder_past_u64_is_reported_as_written() {
    let digits = "99999999999999999999999";
    let text = format!("x <img><|image_{digits}|></img>");
    let err = omnigen_pipeline::check_placeholders(&text, 1).unwrap_err();
    assert_eq!(
        err,
        PromptError::NumberOutOfRange {
            digits: digits.into(),
            images_given: 1
        }
    );
    let msg = Error::from(err).to_string();
    assert!(msg.contains(&format!("<|image_{digits}|>")), "{msg}");
    assert!(!msg.contains("18446744073709551615"), "{msg}");
    // A thousand digits are elided in the message, not copied whole.
    let long = "7".repeat(1000);
    let msg = Error::from(
        omnigen_pipeline::check_placeholders(&format!("<|image_{long}|>"), 0).unwrap_err(),
    )
    .to_string();
    assert!(msg.contains("7777777777…7777777777 (1000 digits)"), "{msg}");
    assert!(msg.len() < 200, "{msg}");
}
