//! `omnigen batch`: many generations from one manifest over one loaded model — a catalog (the
//! same edit over a folder of photos), advertising variations, a settings trial as a grid —
//! resumable, with a report (see docs/batch.md).
//!
//! The whole manifest is checked before the model loads; each image is one
//! [`OmniGenPipeline::generate_with_hooks`] call's output, the call `omnigen generate` makes,
//! written atomically and then recorded in `results.jsonl`. A re-run skips what is recorded
//! done and tries again what failed.

mod manifest;
mod report;
mod results;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use omnigen::pipeline::memory::{RequestPlan, RequestPlanner};
use omnigen::pipeline::{GenerationOptions, SchedulerKind};
use omnigen::prelude::*;
use serde_json::Value;

use crate::generate::{parse_scheduler, FormatArg, InputLatentsArg, KvCacheArg, PrecisionArgs};
use manifest::{Defaults, Job, SweepValue};
use results::{Record, RecordedError, Results, Status, Times};

/// The flags of `omnigen batch`. The generation flags are defaults for every manifest line;
/// a line's own field wins.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// The manifest: JSON Lines, or CSV with a header row when its name ends in `.csv`; one job
    /// per line (fields: docs/batch.md). Image paths are relative to its folder.
    pub manifest: PathBuf,
    /// Model directory (official or diffusers layout) or hub id, e.g. Shitao/OmniGen-v1.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (created if missing): a folder of images per job, results.jsonl,
    /// report.html. Re-running into the same folder resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Check the whole manifest (fields, images, sizes, memory), print the number of images
    /// and the estimated time, and stop before the model loads.
    #[arg(long)]
    pub dry_run: bool,
    /// Default output height in pixels (multiple of 16) [official default: 1024].
    #[arg(long)]
    pub height: Option<usize>,
    /// Default output width in pixels (multiple of 16) [official default: 1024].
    #[arg(long)]
    pub width: Option<usize>,
    /// Default denoising steps [official default: 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Default text guidance scale [official default: 3.0].
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// Default image guidance scale [official default: 1.6].
    #[arg(long)]
    pub img_guidance_scale: Option<f32>,
    /// Default scheduler: euler (official), heun, dpmpp-2m, unipc or euler-shifted.
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Default time shift of the scheduler [default: 1].
    #[arg(long)]
    pub time_shift: Option<f32>,
    /// Default part of the run with guidance, START,END [default: 0,1].
    #[arg(long)]
    pub cfg_range: Option<String>,
    /// Default seed [default: one drawn per image, recorded in results.jsonl].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Default number of images per job (and per grid cell) [default: 1].
    #[arg(long)]
    pub n: Option<usize>,
    /// Default negative prompt [default: the official one].
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// All guidance branches in one left-padded batch (a line's `joint_cfg` wins).
    #[arg(long)]
    pub joint_cfg: bool,
    /// Default key-value cache [default: official].
    #[arg(long, value_enum)]
    pub kv_cache: Option<KvCacheArg>,
    /// Default input-image latents [default: sample].
    #[arg(long, value_enum)]
    pub input_latents: Option<InputLatentsArg>,
    /// Output size taken from the (single) input image, for every line that does not say.
    #[arg(long)]
    pub use_input_image_size_as_output: bool,
    /// Default longest side input images are downscaled to [default: 1024].
    #[arg(long)]
    pub max_input_image_size: Option<usize>,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// PEFT LoRA adapter folder merged into the transformer at load time (repeatable).
    #[arg(long = "lora")]
    pub loras: Vec<PathBuf>,
    /// Scale of the LoRA adapters (multiplies alpha / r).
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Refuse jobs whose estimated memory beyond the loaded model exceeds this many MiB
    /// (default: the memory available to the process).
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
    /// Default output format [default: png].
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// JPEG quality, 1-100 [default: 90]; only with --format jpeg.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
    /// Leave the generation parameters out of the images (the "made by a trained model" XMP
    /// mark stays); results.jsonl keeps them.
    #[arg(long)]
    pub no_metadata: bool,
}

impl BatchArgs {
    /// What the flags give every line.
    fn defaults(&self) -> anyhow::Result<Defaults> {
        let cfg_range = match &self.cfg_range {
            Some(text) => Some(text.parse().context("--cfg-range")?),
            None => None,
        };
        let options = GenerationOptions {
            negative_prompt: self.negative_prompt.clone(),
            height: self.height,
            width: self.width,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            img_guidance_scale: self.img_guidance_scale,
            separate_cfg_infer: self.joint_cfg.then_some(false),
            kv_cache: self.kv_cache.map(Into::into),
            input_latents: self.input_latents.map(Into::into),
            use_input_image_size_as_output: self.use_input_image_size_as_output.then_some(true),
            max_input_image_size: self.max_input_image_size,
            n: self.n,
            seed: self.seed,
            scheduler: self.scheduler,
            time_shift: self.time_shift,
            cfg_range,
            ..Default::default()
        };
        let format = match (self.format, self.jpeg_quality) {
            (Some(FormatArg::Jpeg), q) => ImageFormat::Jpeg {
                quality: q.unwrap_or(ImageFormat::DEFAULT_JPEG_QUALITY),
            },
            (_, Some(_)) => {
                return Err(Error::invalid_argument(
                    "jpeg_quality",
                    "applies to JPEG output only (--format jpeg)",
                )
                .into())
            }
            (Some(FormatArg::Webp), None) => ImageFormat::WebP,
            (Some(FormatArg::Png) | None, None) => ImageFormat::Png,
        };
        if !self.lora_scale.is_finite() {
            return Err(Error::invalid_argument(
                "lora_scale",
                format!("{} is not a finite number", self.lora_scale),
            )
            .into());
        }
        Ok(Defaults { options, format })
    }
}

/// One grid cell checked: its request and what it will cost.
struct Cell {
    values: Vec<SweepValue>,
    request: GenerationRequest,
    /// The request's serde form, recorded with its images and compared on a re-run.
    parameters: Value,
    plan: Option<RequestPlan>,
}

/// Runs `omnigen batch`; errors lead with the flag at fault where there is one.
pub fn run(args: BatchArgs) -> anyhow::Result<()> {
    batch(args).map_err(crate::flags::name_flag)
}

/// The file extension of `format`.
fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg { .. } => "jpg",
        ImageFormat::WebP => "webp",
    }
}

/// The output path of image `index` of `cell`, relative to the output folder.
pub(crate) fn output_of(job: &Job, cell: &[SweepValue], index: usize) -> String {
    format!(
        "{}/{}.{}",
        job.id,
        job.stem(cell, index),
        extension(job.format)
    )
}

/// The results key of image `index` of `cell`.
pub(crate) fn key_of(job: &Job, cell: &[SweepValue], index: usize) -> String {
    format!("{}/{}", job.id, job.stem(cell, index))
}

/// Checks every job's cells (requests, images, memory), adding what is wrong to its problems;
/// the cells of the jobs without problems come back.
fn check_jobs(
    jobs: &mut [Job],
    planner: Option<&RequestPlanner>,
    available: Option<u64>,
) -> Vec<Vec<Cell>> {
    let mut all = Vec::new();
    for job in jobs.iter_mut() {
        let mut cells = Vec::new();
        if job.problems.is_empty() {
            let mut problems: Vec<String> = Vec::new();
            let mut note = |p: String| {
                if !problems.contains(&p) {
                    problems.push(p);
                }
            };
            let mut images_ok = true;
            for path in &job.images {
                if let Err(e) = ConditionImage::from_path(path).load_rgb8() {
                    note(format!("images: {e}"));
                    images_ok = false;
                }
            }
            for values in job.cells() {
                let at = if values.is_empty() {
                    String::new()
                } else {
                    let labels: Vec<_> = values.iter().map(SweepValue::label).collect();
                    format!(" (at {})", labels.join(", "))
                };
                let request = match job.request(&values) {
                    Ok(r) => r,
                    Err(e) => {
                        note(format!("{e}{at}"));
                        continue;
                    }
                };
                // Through the text form, so the numbers are the ones results.jsonl holds
                // (f32 fields printed shortest) and a re-run compares like with like.
                let parameters = match serde_json::to_string(&request)
                    .and_then(|text| serde_json::from_str::<Value>(&text))
                {
                    Ok(p) => p,
                    Err(e) => {
                        note(format!("parameters: {e}"));
                        continue;
                    }
                };
                let plan = match planner.filter(|_| images_ok) {
                    Some(planner) => match planner.plan::<DefaultBackend>(&request, available) {
                        Ok(plan) => Some(plan),
                        Err(e) => {
                            note(format!("{e}{at}"));
                            continue;
                        }
                    },
                    None => None,
                };
                cells.push(Cell {
                    values,
                    request,
                    parameters,
                    plan,
                });
            }
            job.problems = problems;
        }
        if !job.problems.is_empty() {
            cells.clear();
        }
        all.push(cells);
    }
    all
}

/// The work of one cell in transformer token-evaluations: what its time grows with.
fn work_of(cell: &Cell) -> Option<f64> {
    let plan = cell.plan.as_ref()?;
    let tokens: usize = plan.tokens_per_branch.iter().sum();
    Some(
        tokens as f64
            * cell.request.num_inference_steps as f64
            * cell.request.num_images_per_prompt as f64,
    )
}

/// Seconds per token-evaluation measured by earlier runs into this folder (their median).
fn measured_rate(results: &Results) -> Option<f64> {
    let mut rates: Vec<f64> = results
        .latest
        .values()
        .filter(|r| r.status == Status::Done)
        .filter_map(|r| {
            let steps = r.parameters.as_ref()?["num_inference_steps"].as_f64()?;
            let tokens: usize = r.tokens_per_branch.iter().sum();
            let work = steps * tokens as f64;
            let seconds = r.seconds?;
            (work > 0.0).then(|| seconds / work)
        })
        .collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    Some(rates[rates.len() / 2])
}

fn batch(args: BatchArgs) -> anyhow::Result<()> {
    omnigen::models::tune_host_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let defaults = args.defaults()?;
    let mut jobs = manifest::read(&args.manifest, &defaults)
        .with_context(|| format!("manifest {}", args.manifest.display()))?;
    let model_text = args.model.display().to_string();
    // A dry run never downloads: a hub id not on disk is checked without its tokenizer.
    let model_dir = if args.model.is_dir() {
        Some(args.model.clone())
    } else if args.dry_run {
        None
    } else {
        Some(omnigen::pipeline::hub::resolve_model(&model_text, true)?)
    };
    let planner = model_dir
        .as_deref()
        .map(|dir| RequestPlanner::from_dir(dir, args.precision.dtype.resolved()))
        .transpose()?;
    let available = args
        .memory_limit
        .map(|mib| mib.saturating_mul(1 << 20))
        .or_else(|| {
            <DefaultBackend as omnigen::models::KernelBackend>::HOST_MEMORY
                .then(omnigen::pipeline::memory::available_memory)
                .flatten()
        });
    let cells = check_jobs(&mut jobs, planner.as_ref(), available);

    let bad: Vec<&Job> = jobs.iter().filter(|j| !j.problems.is_empty()).collect();
    for job in &bad {
        for problem in &job.problems {
            eprintln!("line {}: {problem}", job.line);
        }
    }
    let images: usize = cells
        .iter()
        .flatten()
        .map(|c| c.request.num_images_per_prompt)
        .sum();
    let good = jobs.len() - bad.len();
    if args.out.exists() && !args.out.is_dir() {
        anyhow::bail!(
            "--out {} exists and is not a folder: give a folder for the images, results.jsonl \
             and report.html",
            args.out.display()
        );
    }
    let previous = Results::read(&args.out)?;

    if args.dry_run {
        let work: Option<f64> = cells.iter().flatten().map(work_of).sum();
        println!(
            "{images} images in {good} jobs; {} of {} lines with problems",
            bad.len(),
            jobs.len()
        );
        if let Some(first) = cells.iter().flatten().next() {
            let plan = first.plan.as_ref();
            println!(
                "first job: {} tokens per branch, memory estimate {} MiB",
                plan.map_or("?".into(), |p| format!("{:?}", p.tokens_per_branch)),
                plan.map_or("?".into(), |p| (p.estimate.peak() >> 20).to_string())
            );
        }
        match (work, measured_rate(&previous)) {
            (Some(work), Some(rate)) => println!(
                "estimated time: {} (at the rate measured by the {} images in {})",
                human_seconds(work * rate),
                previous
                    .latest
                    .values()
                    .filter(|r| r.status == Status::Done)
                    .count(),
                args.out.join(results::FILE).display()
            ),
            (Some(work), None) => println!(
                "estimated time: not known before an image has run on this machine ({:.3e} \
                 token-steps of work; a dry run after the first images estimates from them)",
                work
            ),
            (None, _) => println!("estimated time: not known (the model folder is not local)"),
        }
        if !bad.is_empty() {
            anyhow::bail!("{} manifest lines have problems (listed above)", bad.len());
        }
        return Ok(());
    }

    std::fs::create_dir_all(&args.out).map_err(|e| Error::io("create the folder", &args.out, e))?;
    let mut writer = results::Writer::open(&args.out)?;
    for job in &bad {
        writer.append(&Record {
            key: format!("#line{}", job.line),
            id: job.id.clone(),
            line: job.line,
            status: Status::Failed,
            output: None,
            sweep: Default::default(),
            parameters: None,
            seed: None,
            size: None,
            tokens_per_branch: Vec::new(),
            times: None,
            seconds: None,
            peak_memory_bytes: None,
            memory_estimate_bytes: None,
            error: Some(RecordedError {
                kind: "manifest".into(),
                message: job.problems.join("; "),
            }),
        })?;
    }

    // What is left to do, cell by cell.
    let pending: Vec<(usize, usize)> = cells
        .iter()
        .enumerate()
        .flat_map(|(j, cs)| (0..cs.len()).map(move |c| (j, c)))
        .filter(|&(j, c)| {
            let (job, cell) = (&jobs[j], &cells[j][c]);
            (0..cell.request.num_images_per_prompt).any(|k| {
                !previous.is_done(&args.out, &key_of(job, &cell.values, k), &cell.parameters)
            })
        })
        .collect();
    let skipped = images
        - pending
            .iter()
            .map(|&(j, c)| cells[j][c].request.num_images_per_prompt)
            .sum::<usize>();

    let mut generated = 0usize;
    let mut failed = 0usize;
    let mut interrupted = false;
    if !pending.is_empty() {
        let mut builder = args
            .precision
            .apply(OmniGenPipeline::<DefaultBackend>::builder(&args.model))
            .memory_limit(args.memory_limit.map(|mib| mib.saturating_mul(1 << 20)))
            .download_progress(true);
        for lora in &args.loras {
            builder = builder.lora(lora, args.lora_scale);
        }
        let load_start = Instant::now();
        let pipeline = builder.build()?;
        eprintln!("loaded {model_text} in {:.2?}", load_start.elapsed());

        // The bar counts denoising steps of the pending images, so its ETA weighs a
        // 50-step image over a 4-step one.
        let steps_of = |&(j, c): &(usize, usize)| cells[j][c].request.num_inference_steps as u64;
        let bar = ProgressBar::new(pending.iter().map(steps_of).sum());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {msg} · {pos}/{len} steps {elapsed_precise} eta {eta}",
            )
            .context("progress bar template")?,
        );
        // Ctrl-C or SIGTERM stops the current image before its next step; what was written
        // and recorded stays, and a re-run resumes from it.
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        if let Err(e) = ctrlc::set_handler(move || on_signal.cancel()) {
            eprintln!("warning: cannot catch Ctrl-C ({e}); an interrupted run ends at once");
        }
        let mut done_steps = 0u64;
        // Printed once, after the first call, for logs that show no progress bar.
        let mut estimated = false;
        for (i, &(j, c)) in pending.iter().enumerate() {
            if cancel.is_cancelled() {
                interrupted = true;
                break;
            }
            let (job, cell) = (&jobs[j], &cells[j][c]);
            let steps = steps_of(&(j, c));
            bar.set_message(format!(
                "job {} ({}/{} jobs) · call {}/{}",
                job.id,
                j + 1,
                jobs.len(),
                i + 1,
                pending.len()
            ));
            let mut on_progress = |p: Progress| {
                let within = steps * p.step as u64 / p.total.max(1) as u64;
                bar.set_position(done_steps + within);
            };
            let hooks = Hooks {
                on_progress: Some(&mut on_progress),
                cancel: Some(cancel.clone()),
                ..Hooks::default()
            };
            omnigen::pipeline::memory::reset_peak_resident_memory();
            let outcome = pipeline.generate_with_hooks(&cell.request, hooks);
            done_steps += steps;
            bar.set_position(done_steps);
            let n = cell.request.num_images_per_prompt;
            let sweep: serde_json::Map<String, Value> = cell
                .values
                .iter()
                .map(|v| (v.param().name().to_string(), v.json()))
                .collect();
            let base = |k: usize, status| Record {
                key: key_of(job, &cell.values, k),
                id: job.id.clone(),
                line: job.line,
                status,
                output: None,
                sweep: sweep.clone(),
                parameters: Some(cell.parameters.clone()),
                seed: None,
                size: None,
                tokens_per_branch: Vec::new(),
                times: None,
                seconds: None,
                peak_memory_bytes: None,
                memory_estimate_bytes: None,
                error: None,
            };
            let failure = |k: usize, e: &Error| Record {
                error: Some(RecordedError {
                    kind: results::kind_of(e).into(),
                    message: e.to_string(),
                }),
                ..base(k, Status::Failed)
            };
            let generation = match outcome {
                Ok(g) => g,
                Err(Error::Cancelled { .. }) => {
                    interrupted = true;
                    break;
                }
                Err(e) => {
                    bar.suspend(|| eprintln!("line {}: {}: {e}", job.line, job.id));
                    for k in 0..n {
                        writer.append(&failure(k, &e))?;
                    }
                    failed += n;
                    continue;
                }
            };
            let folder = args.out.join(&job.id);
            std::fs::create_dir_all(&folder)
                .map_err(|e| Error::io("create the folder", &folder, e))?;
            let s = &generation.stats;
            let mut times = Times {
                process: s.process.as_secs_f64(),
                encode: s.encode.as_secs_f64(),
                denoise: s.denoise.as_secs_f64(),
                decode: s.decode.as_secs_f64(),
                save: 0.0,
            };
            let saving = Instant::now();
            let mut saved = Vec::new();
            for (k, image) in generation.images.iter().enumerate() {
                let output = output_of(job, &cell.values, k);
                let written = if args.no_metadata {
                    Ok(OutputMetadata::default())
                } else {
                    omnigen::io::output_metadata(&cell.request, &pipeline, &generation, k)
                }
                .and_then(|m| save_image(&args.out.join(&output), image, job.format, &m));
                saved.push((k, output, image.dimensions(), written));
            }
            times.save = saving.elapsed().as_secs_f64();
            let total = times.process + times.encode + times.denoise + times.decode + times.save;
            if !estimated {
                estimated = true;
                let rest: Option<f64> = pending[i + 1..]
                    .iter()
                    .map(|&(j, c)| work_of(&cells[j][c]))
                    .sum();
                if let (Some(rest), Some(work)) = (rest, work_of(cell).filter(|&w| w > 0.0)) {
                    bar.suspend(|| {
                        eprintln!(
                            "first call: {}; estimated time for the other {} calls: {}",
                            human_seconds(total),
                            pending.len() - i - 1,
                            human_seconds(rest * total / work)
                        )
                    });
                }
            }
            for (k, output, (w, h), written) in saved {
                let record = match written {
                    Ok(()) => {
                        generated += 1;
                        Record {
                            output: Some(output),
                            seed: Some(s.seed),
                            size: Some([w, h]),
                            tokens_per_branch: s.tokens_per_branch.clone(),
                            times: Some(times.clone()),
                            seconds: Some(total / n.max(1) as f64),
                            peak_memory_bytes: s.peak_memory_bytes,
                            memory_estimate_bytes: s.memory_estimate,
                            ..base(k, Status::Done)
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        bar.suspend(|| eprintln!("line {}: {}: {e}", job.line, job.id));
                        failure(k, &e)
                    }
                };
                writer.append(&record)?;
            }
        }
        bar.finish_and_clear();
    }

    let results = Results::read(&args.out)?;
    report::write(&args.out, &jobs, &results).context("writing the report")?;
    eprintln!(
        "batch: {generated} images generated, {skipped} already done, {failed} failed, {} lines \
         with problems; report {}",
        bad.len(),
        args.out.join(report::FILE).display()
    );
    if interrupted {
        anyhow::bail!(
            "interrupted: {generated} images were generated and recorded; run the same command \
             again to resume"
        );
    }
    if failed > 0 || !bad.is_empty() {
        anyhow::bail!(
            "{failed} images failed and {} manifest lines have problems; see {}",
            bad.len(),
            args.out.join(results::FILE).display()
        );
    }
    Ok(())
}

/// `s` seconds as `1 h 02 min`, `3 min 05 s` or `4.2 s`.
pub(crate) fn human_seconds(s: f64) -> String {
    let whole = s.round() as u64;
    if whole >= 3600 {
        format!("{} h {:02} min", whole / 3600, whole % 3600 / 60)
    } else if whole >= 60 {
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        format!("{s:.1} s")
    }
}
