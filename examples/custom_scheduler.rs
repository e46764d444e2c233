//! A user-defined scheduler plugged into the pipeline: Heun's second-order method on the
//! official time grid, evaluated as a predictor–corrector over pairs of model calls.
//!
//! `cargo run --release --example custom_scheduler -- tests/fixtures/A/model heun.png`
//!
//! The pipeline only asks a [`Scheduler`] two things — at which times to evaluate the model and
//! how a velocity moves the latents — so a scheduler lives entirely outside the library.

use burn::tensor::{backend::Backend, Tensor};
use omnigen::prelude::*;

/// Heun on `n` intervals: for each interval the model is evaluated at its start (predictor) and
/// at its end (corrector), so `2n` evaluations; the last interval ends at t = 1 and is Euler.
struct Heun<B: Backend> {
    grid: Vec<f32>,
    start: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> Scheduler<B> for Heun<B> {
    fn timesteps(&mut self, num_steps: usize) -> omnigen::Result<Vec<f32>> {
        let intervals = num_steps.div_ceil(2).max(1);
        self.grid = (0..=intervals)
            .map(|i| i as f32 / intervals as f32)
            .collect();
        // predictor at t_i, corrector at t_{i+1}; drop the corrector at t = 1
        let times: Vec<f32> = (0..intervals)
            .flat_map(|i| [self.grid[i], self.grid[i + 1]])
            .filter(|&t| t < 1.0)
            .collect();
        Ok(times)
    }

    fn step(
        &mut self,
        index: usize,
        latents: Tensor<B, 4>,
        velocity: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let interval = (index / 2).min(self.grid.len() - 2);
        let dt = self.grid[interval + 1] - self.grid[interval];
        match self.start.take() {
            // corrector: average the two slopes, restart from the interval's beginning
            Some((z0, v0)) => z0 + (v0 + velocity) * (dt / 2.0),
            // predictor: remember where we started, move with Euler
            None if index + 1 < 2 * (self.grid.len() - 1) - 1 => {
                self.start = Some((latents.clone(), velocity.clone()));
                latents + velocity * dt
            }
            // the final interval (t -> 1) has no corrector
            None => latents + velocity * dt,
        }
    }
}

fn main() -> omnigen::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/A/model".into());
    let output = args.next().unwrap_or_else(|| "heun.png".into());
    let pipeline = OmniGenPipeline::<DefaultBackend>::from_dir(&model, &default_device())?;
    let request = GenerationRequest::new("a red cat sitting on a blue mat")
        .size(64, 64)
        .steps(7)
        .seed(3);
    let mut heun = Heun {
        grid: vec![],
        start: None,
    };
    let generation = pipeline.generate_with(&request, &mut heun, Hooks::default())?;
    save_png(output.as_ref(), &generation.images[0], &vec![])?;
    println!("wrote {output} with Heun");
    Ok(())
}
