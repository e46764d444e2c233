//! Typed errors of prompts and the processor: every bad input is an `Err`, never a panic.

use crate::support::*;
use omnigen_core::Error;
use omnigen_pipeline::{
    check_placeholders, ConditionImage, OmniGenProcessor, ProcessorOptions, Prompt, PromptError,
};

fn processor() -> OmniGenProcessor {
    OmniGenProcessor::from_dir(fixture_a("model")).expect("tokenizer")
}

fn tiny_image() -> ConditionImage {
    ConditionImage::from_rgb(32, 32, vec![128; 32 * 32 * 3])
}

fn small_options() -> ProcessorOptions {
    ProcessorOptions {
        height: 64,
        width: 64,
        ..ProcessorOptions::default()
    }
}

/// `image` followed by the text " edit".
fn edit_prompt(image: ConditionImage) -> Prompt {
    Prompt::new().image(image).text(" edit")
}

/// The error of processing `prompt` alone with [`small_options`]; panics if it succeeds.
fn process_error(prompt: Prompt) -> Error {
    processor()
        .process(&[prompt], &small_options())
        .unwrap_err()
}

#[test]
fn placeholder_naming_a_missing_image() {
    assert_eq!(
        check_placeholders("<img><|image_1|></img> and <img><|image_2|></img>", 1),
        Err(PromptError::MissingImage {
            placeholder: 2,
            images_given: 1
        })
    );
    assert_eq!(
        check_placeholders("<img><|image_1|></img>", 0),
        Err(PromptError::MissingImage {
            placeholder: 1,
            images_given: 0
        })
    );
    let err =
        Prompt::from_text("x <|image_99999999999999999999999|>", vec![tiny_image()]).unwrap_err();
    assert!(
        matches!(err, Error::Prompt(ref m) if m.contains("not given")),
        "{err}"
    );
}

#[test]
fn images_no_placeholder_uses() {
    assert_eq!(
        check_placeholders("<img><|image_1|></img> waves", 2),
        Err(PromptError::UnusedImages { used: 1, given: 2 })
    );
    assert_eq!(
        check_placeholders("no placeholder", 1),
        Err(PromptError::UnusedImages { used: 0, given: 1 })
    );
    let err = Prompt::from_text("a cat", vec![tiny_image()]).unwrap_err();
    assert!(matches!(err, Error::Prompt(_)), "{err}");
}

#[test]
fn placeholders_not_numbered_one_to_n() {
    assert_eq!(
        check_placeholders("<|image_1|> <|image_3|>", 3),
        Err(PromptError::BadNumbering { found: vec![1, 3] })
    );
    assert_eq!(
        check_placeholders("<|image_0|>", 1),
        Err(PromptError::BadNumbering { found: vec![0] })
    );
    assert_eq!(
        check_placeholders("<|image_2|>", 2),
        Err(PromptError::BadNumbering { found: vec![2] })
    );
    // Repeating a placeholder is allowed (the image is used twice), as officially.
    assert_eq!(
        check_placeholders("<|image_1|> <|image_2|> <|image_1|>", 2),
        Ok(vec![1, 2, 1])
    );
}

#[test]
fn empty_prompt() {
    assert_eq!(check_placeholders("", 0), Err(PromptError::Empty));
    assert_eq!(check_placeholders("  \n", 0), Err(PromptError::Empty));
    let err = processor()
        .process(&[Prompt::new()], &small_options())
        .unwrap_err();
    assert!(
        matches!(err, Error::Prompt(ref m) if m.contains("empty")),
        "{err}"
    );
    let err = processor().process(&[], &small_options()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "prompts",
                ..
            }
        ),
        "{err}"
    );
    // An empty negative prompt is a legitimate choice, not an error.
    let options = ProcessorOptions {
        negative_prompt: Some(String::new()),
        ..small_options()
    };
    assert!(processor()
        .process(&[Prompt::from("a cat")], &options)
        .is_ok());
}

#[test]
fn builder_text_with_stray_placeholder_is_caught_at_processing() {
    let err = process_error(Prompt::new().text("see <|image_2|>").image(tiny_image()));
    assert!(matches!(err, Error::Prompt(_)), "{err}");
}

#[test]
fn unreadable_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.png");
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"this is not a png").unwrap();
    for path in [missing, garbage] {
        let err = process_error(edit_prompt(ConditionImage::from_path(&path)));
        assert!(
            matches!(err, Error::InvalidImage { ref source_name, .. } if source_name.contains(path.file_name().unwrap().to_str().unwrap())),
            "{err}"
        );
    }
}

#[test]
fn zero_size_or_inconsistent_image() {
    for image in [
        ConditionImage::from_rgb(0, 10, Vec::new()),
        ConditionImage::from_rgb(10, 0, Vec::new()),
        ConditionImage::from_rgb(4, 4, vec![0; 5]),
        ConditionImage::from_rgb(u32::MAX, u32::MAX, vec![0; 3]),
        ConditionImage::from_dynamic(image::DynamicImage::new_rgb8(0, 0)),
    ] {
        let err = process_error(edit_prompt(image));
        assert!(matches!(err, Error::InvalidImage { .. }), "{err}");
    }
}

#[test]
fn extreme_aspect_ratio_is_an_error_not_a_panic() {
    // 4000x1 with max side 1024: the short side would round to 0 pixels.
    let image = ConditionImage::from_rgb(4000, 1, vec![7; 4000 * 3]);
    let err = process_error(edit_prompt(image));
    assert!(matches!(err, Error::InvalidImage { .. }), "{err}");
}

#[test]
fn output_size_not_a_positive_multiple_of_16() {
    for (h, w, name) in [
        (0, 64, "height"),
        (64, 0, "width"),
        (65, 64, "height"),
        (64, 1000, "width"),
    ] {
        let options = ProcessorOptions {
            height: h,
            width: w,
            ..small_options()
        };
        let err = processor()
            .process(&[Prompt::from("a cat")], &options)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: n, .. } if n == name),
            "{err}"
        );
    }
}

#[test]
fn input_size_as_output_needs_exactly_one_image() {
    let options = ProcessorOptions {
        use_input_image_size_as_output: true,
        ..small_options()
    };
    let two = Prompt::new()
        .image(tiny_image())
        .text(" and ")
        .image(tiny_image());
    for prompts in [vec![Prompt::from("a cat")], vec![two]] {
        let err = processor().process(&prompts, &options).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    name: "use_input_image_size_as_output",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn zero_max_input_image_size() {
    let options = ProcessorOptions {
        max_input_image_size: 0,
        ..small_options()
    };
    let prompt = Prompt::new().image(tiny_image()).text(" edit");
    let err = processor().process(&[prompt], &options).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "max_input_image_size",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        OmniGenProcessor::from_dir(dir.path()),
        Err(Error::Tokenizer { .. })
    ));
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    assert!(matches!(
        OmniGenProcessor::from_tokenizer_file(&bad),
        Err(Error::Tokenizer { .. })
    ));
}
