//! A preview every k steps through the step callback: the latents of the running generation are
//! decoded with the pipeline's own VAE and written as PNGs, while a multistep scheduler runs.
//!
//! `cargo run --release --example step_preview -- tests/fixtures/A/model out_dir 2`
//!
//! `Hooks::on_step_end` sees (and may replace) the latents after every scheduler step, as
//! diffusers' `callback_on_step_end` does; here it only reads them.

use burn::tensor::Tensor;
use omnigen::prelude::*;

fn main() -> omnigen::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/A/model".into());
    let out_dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let every: usize = match args.next().map(|k| k.parse()) {
        None => 2,
        Some(Ok(k)) if k > 0 => k,
        Some(_) => {
            return Err(Error::invalid_argument(
                "every",
                "the preview interval must be a positive integer",
            ))
        }
    };

    let pipeline = OmniGenPipeline::<DefaultBackend>::from_dir(&model, &default_device())?;
    let request = GenerationRequest::new("a red cat sitting on a blue mat")
        .size(64, 64)
        .steps(6)
        .scheduler(SchedulerKind::DpmPp2m)
        .seed(11);

    let mut previews = Vec::new();
    let mut failure = None;
    let mut preview = |step: usize, t: f32, latents: &mut Tensor<DefaultBackend, 4>| {
        if !(step + 1).is_multiple_of(every) || failure.is_some() {
            return;
        }
        // the callback cannot fail the generation; keep the first error for after it
        let path = out_dir.join(format!("preview_{:02}.png", step + 1));
        let written = pipeline
            .decode_images(latents.clone())
            .and_then(|images| save_png(&path, &images[0], &vec![]));
        match written {
            Ok(()) => previews.push((t, path)),
            Err(e) => failure = Some(e),
        }
    };
    let hooks = Hooks {
        on_step_end: Some(&mut preview),
        ..Hooks::default()
    };
    let generation = pipeline.generate_with_hooks(&request, hooks)?;
    if let Some(e) = failure {
        return Err(e);
    }
    for (t, path) in &previews {
        println!("t = {t:.3}: {}", path.display());
    }
    let last = out_dir.join("preview_final.png");
    save_png(&last, &generation.images[0], &vec![])?;
    println!("final: {}", last.display());
    Ok(())
}
