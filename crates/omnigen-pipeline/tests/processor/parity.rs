//! Parity of the processor with the official pipeline dumps in `tests/fixtures/{A,B}`:
//! token ids, masks and position ids exactly, input images exactly (u8) or to 1e-6 (f32).

use std::path::Path;

use crate::support::*;
use omnigen_pipeline::{
    add_prefix_instruction, ConditionImage, GuidanceInputs, OmniGenProcessor, ProcessorOptions,
    Prompt,
};

fn processor() -> OmniGenProcessor {
    OmniGenProcessor::from_dir(fixture_a("model")).expect("tokenizer")
}

fn options_from_json(json: &serde_json::Value) -> ProcessorOptions {
    let args = &json["pipeline_call_args"];
    ProcessorOptions {
        height: args["height"].as_u64().unwrap() as usize,
        width: args["width"].as_u64().unwrap() as usize,
        negative_prompt: None,
        use_img_guidance: args["use_img_guidance"].as_bool().unwrap(),
        max_input_image_size: args["max_input_image_size"].as_u64().unwrap() as u32,
        use_input_image_size_as_output: args["use_input_image_size_as_output"].as_bool().unwrap(),
        separate_cfg_infer: args["separate_cfg_infer"].as_bool().unwrap(),
    }
}

/// The prompts of a case: `prompt` is a string or a list; `input_images` null, a list of
/// paths (one prompt) or a list of lists.
fn prompts_from_json(json: &serde_json::Value, dir: &Path) -> Vec<Prompt> {
    let args = &json["pipeline_call_args"];
    let texts: Vec<&str> = match args["prompt"].as_array() {
        Some(list) => list.iter().map(|p| p.as_str().unwrap()).collect(),
        None => vec![args["prompt"].as_str().unwrap()],
    };
    let to_images = |list: &serde_json::Value| -> Vec<ConditionImage> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|p| ConditionImage::from_path(dir.join(p.as_str().unwrap())))
            .collect()
    };
    let images: Vec<Vec<ConditionImage>> = match args["input_images"].as_array() {
        None => vec![Vec::new(); texts.len()],
        Some(list) if list.first().is_some_and(|x| x.is_array()) => {
            list.iter().map(to_images).collect()
        }
        Some(_) => vec![to_images(&args["input_images"])],
    };
    texts
        .into_iter()
        .zip(images)
        .map(|(t, i)| Prompt::from_text(t, i).expect("valid prompt"))
        .collect()
}

/// Runs the processor on a pipeline case and compares every `proc.*` tensor.
fn check_case(dir: &Path, case: &str) {
    let json = read_json(dir.join(format!("{case}.json")));
    let tensors = SafetensorsFile::open(dir.join(format!("{case}.safetensors")));
    let proc = OmniGenProcessor::from_dir(dir.join("model")).expect("tokenizer");
    let prompts = prompts_from_json(&json, dir);
    let options = options_from_json(&json);

    if prompts.len() == 1 {
        let recorded = &json["prompts_after_prefix"];
        assert_eq!(
            add_prefix_instruction(prompts[0].as_text()),
            recorded["cond"].as_str().unwrap(),
            "{case}"
        );
    }
    let batch = proc.process(&prompts, &options).unwrap();
    if let Some(hw) = json.get("output_height_width").and_then(|v| v.as_array()) {
        assert_eq!(
            vec![batch.height as u64, batch.width as u64],
            hw.iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>()
        );
    }
    if let Some(n) = json.get("num_cfg_branches").and_then(|v| v.as_u64()) {
        assert_eq!(batch.branches.len() as u64, n, "{case} branches");
    }
    match &batch.inputs {
        GuidanceInputs::Separate(groups) => {
            assert!(options.separate_cfg_infer);
            for (k, (_, input)) in groups.iter().enumerate() {
                let prefix = format!("proc.b{k}");
                let spans = json[&prefix].get("input_image_sizes");
                assert!(spans.is_some(), "{case}: no spans recorded for {prefix}");
                assert_model_input_matches(input, &tensors, &prefix, spans);
                assert_eq!(input.batch_size, prompts.len());
                let ids = format!("step0.b{k}.input_ids");
                if tensors.has(&ids) {
                    assert_eq!(input.input_ids, tensors.i64(&ids), "{case} {ids}");
                }
            }
            assert!(
                !tensors.has(&format!("proc.b{}.input_ids", groups.len())),
                "{case}: missing branch"
            );
        }
        GuidanceInputs::Joint(input) => {
            assert!(!options.separate_cfg_infer);
            let spans = json["proc.batch"].get("input_image_sizes");
            assert!(spans.is_some(), "{case}: no spans recorded");
            assert_model_input_matches(input, &tensors, "proc.batch", spans);
            assert_eq!(input.batch_size, prompts.len() * batch.branches.len());
        }
    }
}

fn case_a(case: &str) {
    check_case(&fixtures_dir().join("A"), case);
}

#[test]
fn t2i_separate() {
    case_a("t2i");
    case_a("t2i_nokv");
}

#[test]
fn t2i_joint() {
    case_a("t2i_joint");
}

#[test]
fn edit_one_image_separate() {
    case_a("edit");
    case_a("edit_nokv");
}

#[test]
fn edit_one_image_joint() {
    case_a("edit_joint");
}

#[test]
fn two_images_in_one_prompt() {
    case_a("two_img");
    case_a("two_img_joint");
}

#[test]
fn batch_of_two_prompts_with_images() {
    case_a("batch2");
    case_a("batch2_joint");
}

#[test]
fn batch_of_two_text_prompts_of_different_lengths_joint() {
    case_a("batch2_t2i_joint");
}

/// Every pipeline case present in A and B (so new fixtures are covered without new code).
#[test]
fn every_recorded_pipeline_case() {
    let mut checked = 0;
    for set in ["A", "B"] {
        let dir = fixtures_dir().join(set);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut cases: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .collect();
        cases.sort();
        for case in cases {
            let json = read_json(dir.join(format!("{case}.json")));
            if json.get("pipeline_call_args").is_some()
                && dir.join(format!("{case}.safetensors")).is_file()
            {
                check_case(&dir, &case);
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "only {checked} cases found");
}

#[test]
fn token_strings_match_recorded_tokens() {
    let json = read_json(fixture_a("t2i.json"));
    let proc = processor();
    for (branch, text) in json["prompts_after_prefix"].as_object().unwrap() {
        let ids = proc.encode(text.as_str().unwrap()).unwrap();
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| proc.id_to_token(id).unwrap())
            .collect();
        let expected: Vec<String> = json["prompt_tokens"][branch]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tokens, expected, "branch {branch}");
    }
}

#[test]
fn builder_path_dynamic_and_raw_rgb_give_identical_batches() {
    let json = read_json(fixture_a("edit.json"));
    let proc = processor();
    let options = options_from_json(&json);
    let from_text = prompts_from_json(&json, &fixtures_dir().join("A")).remove(0);
    let built = Prompt::new()
        .image(ConditionImage::from_path(fixture_a("edit_in.png")))
        .text(" make the cat green and add a hat");
    assert_eq!(built.as_text(), from_text.as_text());
    let decoded = image::open(fixture_a("edit_in.png")).unwrap();
    let in_memory = Prompt::new()
        .image(decoded.clone())
        .text(" make the cat green and add a hat");
    let raw = Prompt::new()
        .image(ConditionImage::from_rgb(
            decoded.width(),
            decoded.height(),
            decoded.to_rgb8().into_raw(),
        ))
        .text(" make the cat green and add a hat");
    let reference = proc.process(&[from_text], &options).unwrap();
    for p in [built, in_memory, raw] {
        assert_eq!(proc.process(&[p], &options).unwrap(), reference);
    }
}

#[test]
fn edit_input_image_size_as_output() {
    let json = read_json(fixture_a("edit.json"));
    let proc = processor();
    let mut options = options_from_json(&json);
    options.use_input_image_size_as_output = true;
    options.height = 7; // ignored in this mode
    let prompts = prompts_from_json(&json, &fixtures_dir().join("A"));
    let batch = proc.process(&prompts, &options).unwrap();
    assert_eq!((batch.height, batch.width), (48, 64));
    for input in batch.model_inputs() {
        assert_eq!(input.num_output_tokens, vec![12]);
        assert_eq!(input.seq_len, input.text_len + 1 + 12);
    }
}

#[test]
fn diffusers_layout_tokenizer_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tokenizer")).unwrap();
    std::fs::copy(
        fixture_a("model/tokenizer.json"),
        dir.path().join("tokenizer/tokenizer.json"),
    )
    .unwrap();
    let a = OmniGenProcessor::from_dir(dir.path()).unwrap();
    assert_eq!(
        a.encode("a red cat").unwrap(),
        processor().encode("a red cat").unwrap()
    );
}
