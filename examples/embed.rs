//! The library inside another program, in about thirty lines: load once, generate twice
//! (text-to-image, then an edit of the first result), keep everything in memory.
//!
//! `cargo run --release --example embed -- tests/fixtures/A/model out_dir`

use omnigen::prelude::*;

fn main() -> omnigen::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/A/model".into());
    let out_dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| ".".into()));

    let pipeline = OmniGenPipeline::<DefaultBackend>::from_dir(&model, &default_device())?;

    // Text to image.
    let request = GenerationRequest::new("a red cat sitting on a blue mat")
        .size(64, 64)
        .steps(4)
        .seed(7);
    let cat = pipeline.generate(&request)?.images.remove(0);

    // Edit the image we just made: an in-memory image is a prompt part like any other.
    let prompt = Prompt::new().image(cat.clone()).text(" make the cat green");
    let edit = GenerationRequest::new(prompt)
        .use_input_image_size_as_output(true)
        .steps(4)
        .seed(8);
    let green = pipeline.generate(&edit)?.images.remove(0);

    save_png(&out_dir.join("embed_cat.png"), &cat, &vec![])?;
    save_png(&out_dir.join("embed_green.png"), &green, &vec![])?;
    println!(
        "wrote embed_cat.png and embed_green.png to {}",
        out_dir.display()
    );
    Ok(())
}
