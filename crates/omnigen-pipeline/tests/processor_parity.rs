//! Parity of the processor with the official dumps of `tests/fixtures/A` (t2i, edit).

mod processor_support;

use omnigen_pipeline::{
    add_prefix_instruction, ConditionImage, GuidanceInputs, OmniGenProcessor, ProcessorOptions,
    Prompt,
};
use processor_support::*;

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

fn prompt_from_json(json: &serde_json::Value) -> Prompt {
    let args = &json["pipeline_call_args"];
    let images = args["input_images"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| ConditionImage::from_path(fixture_a(p.as_str().unwrap())))
                .collect()
        })
        .unwrap_or_default();
    Prompt::from_text(args["prompt"].as_str().unwrap(), images).expect("valid prompt")
}

fn check_case(case: &str, expected_branches: usize) {
    let json = read_json(&fixture_a(&format!("{case}.json")));
    let tensors = Tensors::open(&fixture_a(&format!("{case}.safetensors")));
    let proc = processor();
    let prompt = prompt_from_json(&json);
    let options = options_from_json(&json);
    assert!(options.separate_cfg_infer);

    // Templated prompts as recorded.
    let recorded = &json["prompts_after_prefix"];
    assert_eq!(
        add_prefix_instruction(prompt.as_text()),
        recorded["cond"].as_str().unwrap()
    );

    let batch = proc
        .process(std::slice::from_ref(&prompt), &options)
        .unwrap();
    assert_eq!(batch.branches.len(), expected_branches);
    assert_eq!((batch.height, batch.width), (options.height, options.width));
    let GuidanceInputs::Separate(groups) = &batch.inputs else {
        panic!("separate form expected")
    };
    assert_eq!(groups.len(), expected_branches);
    for (k, (_, input)) in groups.iter().enumerate() {
        let prefix = format!("proc.b{k}");
        let spans = json["proc"][format!("b{k}")].get("input_image_sizes");
        assert_model_input_matches(input, &tensors, &prefix, spans);
        // The step-0 inputs the model actually received are the same ids / positions.
        assert_eq!(
            input.input_ids,
            tensors.i64(&format!("step0.b{k}.input_ids"))
        );
        assert_eq!(
            input.position_ids,
            tensors.i64(&format!("step0.b{k}.position_ids"))
        );
    }
}

#[test]
fn t2i_matches_official_processor() {
    check_case("t2i", 2);
}

#[test]
fn t2i_nokv_matches_official_processor() {
    check_case("t2i_nokv", 2);
}

#[test]
fn edit_matches_official_processor() {
    check_case("edit", 3);
}

#[test]
fn edit_nokv_matches_official_processor() {
    check_case("edit_nokv", 3);
}

#[test]
fn token_strings_match_recorded_tokens() {
    let json = read_json(&fixture_a("t2i.json"));
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
fn builder_and_text_forms_give_identical_batches() {
    let json = read_json(&fixture_a("edit.json"));
    let proc = processor();
    let options = options_from_json(&json);
    let from_text = prompt_from_json(&json);
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
    let json = read_json(&fixture_a("edit.json"));
    let proc = processor();
    let mut options = options_from_json(&json);
    options.use_input_image_size_as_output = true;
    options.height = 7; // ignored in this mode
    let batch = proc.process(&[prompt_from_json(&json)], &options).unwrap();
    assert_eq!((batch.height, batch.width), (48, 64));
    for input in batch.model_inputs() {
        assert_eq!(input.num_output_tokens, vec![12]);
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
