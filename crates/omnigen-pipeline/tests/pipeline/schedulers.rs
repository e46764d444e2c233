//! The schedulers against diffusers 0.33.1, on `tests/fixtures/sched` (`tools/reference/
//! dump_sched.py`: the official transformer driven by each diffusers scheduler, kv cache off,
//! injected noise, every step recorded).
//!
//! Each case is checked three ways:
//! - the scheduler alone, fed the recorded latents and velocity of every evaluation (its own
//!   arithmetic, no transformer in the loop);
//! - the pipeline on the recorded trajectory: the transformer sees the recorded latents of each
//!   evaluation and the scheduler steps them with our velocity; the result must match the
//!   recorded step to 1e-5;
//! - the pipeline running freely (each step from our previous one): 1e-5 after every step, and
//!   the image to 1 level.
//!
//! One allowance, for diffusers' Heun: its corrector forms the slope as
//! `(z − (z − σ·m)) / σ`, so the slope is quantised in steps of `ulp(z) / σ` and the step's result
//! in steps of `ulp(z)·|dt| / (2σ)`; into σ = 0.001 that quantum is 1.2e-5 for |z| < 2, and a
//! velocity differing by 1e-6 (ours differs from PyTorch's by ~3e-6) moves diffusers' own result
//! by one quantum. Heun's corrector steps (and the free run after them) are allowed 1e-5 plus
//! that quantum.
//!
//! CFG-range cases were recorded running only the conditional branch outside the range.

use burn::tensor::{Tensor, TensorData};
use omnigen_models::scheduler::{DpmSolverMultistepScheduler, Scheduler, SchedulerKind};
use omnigen_models::DefaultBackend as B;
use omnigen_pipeline::{
    CancellationToken, CfgRange, GenerationRequest, Hooks, KvCache, OmniGenPipeline, Progress,
    Prompt,
};
use omnigen_test_support::{assert_close, max_abs_diff, max_level_diff, to_vec};
use serde_json::Value;

use crate::parity::{pipeline, Case};

const STEP_TOL: f32 = 1e-5;

/// The tolerance of evaluation `i`'s result: [`STEP_TOL`], plus, from a Heun corrector on, the
/// largest quantum of its result (see the module documentation).
fn tolerance(case: &Case, s: &Settings, i: usize) -> f32 {
    if s.kind != SchedulerKind::Heun {
        return STEP_TOL;
    }
    let sigmas = case.tensors.f32("sched.sigmas");
    let quantum = |j: usize| {
        let z = case.tensors.f32(&format!("step{j}.z_out"));
        let top = z.iter().fold(0f32, |m, v| m.max(v.abs()));
        let ulp = f32::from_bits(top.to_bits() + 1) - top;
        ulp * 0.5 * (sigmas[j] - sigmas[j - 1]).abs() / sigmas[j]
    };
    // correctors are the odd evaluations
    STEP_TOL
        + (1..=i)
            .filter(|j| j % 2 == 1)
            .map(quantum)
            .fold(0.0, f32::max)
}

fn case_names() -> Vec<String> {
    let dir = omnigen_test_support::fixtures_root().join("sched");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".safetensors").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The recorded scheduler settings of a case.
struct Settings {
    kind: SchedulerKind,
    time_shift: f32,
    sigmas: Option<Vec<f32>>,
    cfg_range: Option<CfgRange>,
    evaluations: usize,
}

fn settings(case: &Case) -> Settings {
    let s = &case.json["scheduler"];
    let f = |v: &Value| v.as_f64().unwrap() as f32;
    Settings {
        kind: s["name"].as_str().unwrap().parse().unwrap(),
        time_shift: f(&s["time_shift"]),
        sigmas: s["sigmas"].as_array().map(|a| a.iter().map(f).collect()),
        cfg_range: s["cfg_range"]
            .as_array()
            .map(|a| CfgRange::new(f(&a[0]), f(&a[1])).unwrap()),
        evaluations: case.json["num_evaluations"].as_u64().unwrap() as usize,
    }
}

fn request(case: &Case, s: &Settings, kv: KvCache) -> GenerationRequest {
    let mut req = case.request(kv).scheduler(s.kind).time_shift(s.time_shift);
    if let Some(sigmas) = &s.sigmas {
        req = req.sigmas(sigmas.clone());
    }
    if let Some(range) = s.cfg_range {
        req = req.cfg_range(range);
    }
    req
}

fn tensor(case: &Case, key: &str) -> Tensor<B, 4> {
    let l = case.latents(key);
    Tensor::from_data(TensorData::new(l.values, l.shape), &Default::default())
}

/// The scheduler alone: the recorded times, and every step from the recorded inputs.
fn replay_scheduler(case: &Case, s: &Settings) -> f32 {
    let mut scheduler = s
        .kind
        .build::<B>(s.time_shift, s.sigmas.as_deref())
        .unwrap();
    let steps = case.json["pipeline_call_args"]["num_inference_steps"]
        .as_u64()
        .unwrap() as usize;
    let times = scheduler.timesteps(steps).unwrap();
    assert_eq!(times.len(), s.evaluations, "{}: evaluations", case.name);
    for (i, &t) in times.iter().enumerate() {
        let want = case.tensors.f32(&format!("step{i}.t"))[0];
        assert!(
            (t - want).abs() <= 1e-7,
            "{}: time {i} is {t}, diffusers {want}",
            case.name
        );
    }
    let mut worst = 0f32;
    for i in 0..times.len() {
        let z = tensor(case, &format!("step{i}.z_in"));
        let v = tensor(case, &format!("step{i}.pred"));
        let out = scheduler.step(i, z, v);
        let want = case.latents(&format!("step{i}.z_out"));
        let d = assert_close(
            &format!("{}: scheduler step {i}", case.name),
            &to_vec(out),
            &want.values,
            &want.shape,
            STEP_TOL,
        );
        worst = worst.max(d);
    }
    worst
}

/// Steps the recorded trajectory: the pipeline's velocity, the scheduler's step from the recorded
/// latents (compared with the recorded result), then the recorded result handed back so that
/// the next evaluation sees exactly what the reference's did.
struct OnTrajectory<'a> {
    inner: Box<dyn Scheduler<B> + Send>,
    case: &'a Case,
    settings: &'a Settings,
    worst: f32,
}

impl Scheduler<B> for OnTrajectory<'_> {
    fn timesteps(&mut self, num_steps: usize) -> omnigen_core::Result<Vec<f32>> {
        self.inner.timesteps(num_steps)
    }

    fn step(&mut self, i: usize, latents: Tensor<B, 4>, velocity: Tensor<B, 4>) -> Tensor<B, 4> {
        let ours = self.inner.step(i, latents, velocity);
        let want = self.case.latents(&format!("step{i}.z_out"));
        let d = assert_close(
            &format!("{}: step {i} from the recorded latents", self.case.name),
            &to_vec(ours),
            &want.values,
            &want.shape,
            tolerance(self.case, self.settings, i),
        );
        self.worst = self.worst.max(d);
        tensor(self.case, &format!("step{i}.z_out"))
    }
}

fn replay_on_trajectory(pipe: &OmniGenPipeline<B>, case: &Case, s: &Settings) -> f32 {
    let mut scheduler = OnTrajectory {
        inner: s
            .kind
            .build::<B>(s.time_shift, s.sigmas.as_deref())
            .unwrap(),
        case,
        settings: s,
        worst: 0.0,
    };
    pipe.generate_with(
        &request(case, s, KvCache::Off),
        &mut scheduler,
        Hooks::default(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    scheduler.worst
}

/// The whole pipeline running freely: latents after every step, final image.
fn replay_pipeline(pipe: &OmniGenPipeline<B>, case: &Case, s: &Settings, kv: KvCache) -> (f32, u8) {
    let mut seen: Vec<(usize, f32, Vec<f32>)> = Vec::new();
    let mut on_step_end =
        |i: usize, t: f32, z: &mut Tensor<B, 4>| seen.push((i, t, to_vec(z.clone())));
    let hooks = Hooks {
        on_step_end: Some(&mut on_step_end),
        ..Hooks::default()
    };
    let gen = pipe
        .generate_with_hooks(&request(case, s, kv), hooks)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    assert_eq!(seen.len(), s.evaluations, "{}: step callbacks", case.name);
    let mut worst = 0f32;
    for (i, t, z) in &seen {
        assert_eq!(
            *t,
            case.tensors.f32(&format!("step{i}.t"))[0],
            "{}",
            case.name
        );
        let want = case.latents(&format!("step{i}.z_out"));
        let d = assert_close(
            &format!("{} ({kv:?}): latents after step {i}", case.name),
            z,
            &want.values,
            &want.shape,
            tolerance(case, s, *i),
        );
        worst = worst.max(d);
    }
    let levels = max_level_diff(gen.images[0].as_raw(), &case.bytes("image_uint8"));
    assert!(
        levels <= 1,
        "{}: image differs by {levels} levels",
        case.name
    );
    (worst, levels)
}

#[test]
fn every_scheduler_matches_diffusers_step_by_step() {
    let names = case_names();
    assert!(
        names.len() >= 19,
        "expected the recorded scheduler cases, found {names:?}"
    );
    let (pipe_a, pipe_b) = (pipeline("A"), pipeline("B"));
    for name in names {
        let case = Case::load("sched", &name);
        let s = settings(&case);
        let alone = replay_scheduler(&case, &s);
        let pipe = if case.json["config"] == "A" {
            &pipe_a
        } else {
            &pipe_b
        };
        let step = replay_on_trajectory(pipe, &case, &s);
        let (off, levels) = replay_pipeline(pipe, &case, &s, KvCache::Off);
        let (exact, _) = replay_pipeline(pipe, &case, &s, KvCache::Exact);
        println!(
            "{name:<28} scheduler alone {alone:.2e}  one step {step:.2e}  free run: off {off:.2e}, exact {exact:.2e}, image levels {levels}"
        );
    }
}

fn t2i() -> GenerationRequest {
    GenerationRequest::new(Prompt::from("a red cat sitting on a blue mat"))
        .size(64, 64)
        .steps(6)
        .seed(9)
        .guidance_scale(2.5)
}

fn final_latents(pipe: &OmniGenPipeline<B>, req: &GenerationRequest) -> Vec<f32> {
    to_vec(pipe.generate(req).unwrap().latents)
}

#[test]
fn cfg_range_outside_every_step_is_guidance_scale_one() {
    // No step in the range: only the conditional branch runs, which is what a full run with
    // guidance scales 1 computes (u + 1·(c − u) = c up to rounding), in both guidance forms.
    let pipe = pipeline("B");
    let edit = Prompt::from_text(
        "<img><|image_1|></img> make the cat green and add a hat",
        vec![omnigen_pipeline::ConditionImage::from_path(
            omnigen_test_support::fixture("B/edit_in.png"),
        )],
    )
    .unwrap();
    for prompt in [Prompt::from("a red cat sitting on a blue mat"), edit] {
        for separate in [true, false] {
            let base = GenerationRequest::new(prompt.clone())
                .size(64, 64)
                .steps(4)
                .seed(3)
                .separate_cfg_infer(separate)
                .kv_cache(KvCache::Off);
            let none = base.clone().cfg_range(CfgRange::new(0.5, 0.5).unwrap());
            let scale_one = base.clone().guidance_scale(1.0).img_guidance_scale(1.0);
            let d = max_abs_diff(
                &final_latents(&pipe, &none),
                &final_latents(&pipe, &scale_one),
            );
            println!("cfg range [0.5, 0.5) vs guidance 1, separate {separate}: {d:.2e}");
            assert!(d <= STEP_TOL, "separate {separate}: {d}");
            // and the empty range differs from the guided run
            let guided = final_latents(&pipe, &base);
            assert!(max_abs_diff(&final_latents(&pipe, &none), &guided) > 1e-3);
        }
    }
}

#[test]
fn cfg_range_works_with_every_cache_mode_and_guidance_form() {
    // A branch first run after step 0 fills its cache then; joint batches run their
    // conditional rows alone outside the range. Cached runs equal the uncached one (exact), and
    // the two guidance forms agree (model A has no LongRoPE switch).
    let pipe = pipeline("A");
    for kind in [SchedulerKind::Euler, SchedulerKind::UniPc] {
        for range in ["0.5,1", "0,0.5", "0.25,0.75"] {
            let base = t2i().scheduler(kind).cfg_range(range.parse().unwrap());
            let off = final_latents(&pipe, &base.clone().kv_cache(KvCache::Off));
            for separate in [true, false] {
                let req = base.clone().separate_cfg_infer(separate);
                let exact = final_latents(&pipe, &req.clone().kv_cache(KvCache::Exact));
                let d = max_abs_diff(&exact, &off);
                assert!(
                    d <= STEP_TOL,
                    "{kind} {range} separate {separate}: exact vs off {d}"
                );
                let official = final_latents(&pipe, &req.kv_cache(KvCache::Official));
                assert!(official.iter().all(|v| v.is_finite()));
            }
        }
    }
}

#[test]
fn step_callback_reads_and_replaces_the_latents() {
    let pipe = pipeline("A");
    let other = t2i().seed(10);
    // the other run's latents after step 0
    let mut after_0 = None;
    let mut grab = |i: usize, _t: f32, z: &mut Tensor<B, 4>| {
        if i == 0 {
            after_0 = Some(z.clone());
        }
    };
    let want = pipe
        .generate_with_hooks(
            &other,
            Hooks {
                on_step_end: Some(&mut grab),
                ..Hooks::default()
            },
        )
        .unwrap();
    let after_0 = after_0.unwrap();
    // Euler keeps no history: swapping in those latents after step 0 gives the other run
    let mut calls = Vec::new();
    let mut swap = |i: usize, t: f32, z: &mut Tensor<B, 4>| {
        calls.push((i, t));
        if i == 0 {
            *z = after_0.clone();
        }
    };
    let got = pipe
        .generate_with_hooks(
            &t2i(),
            Hooks {
                on_step_end: Some(&mut swap),
                ..Hooks::default()
            },
        )
        .unwrap();
    assert_eq!(calls.len(), 6);
    assert_eq!(calls[0], (0, 0.0));
    assert_eq!(to_vec(got.latents), to_vec(want.latents));
}

#[test]
fn a_scheduler_is_reusable_after_a_cancelled_run() {
    let pipe = pipeline("A");
    let req = t2i();
    let fresh = to_vec(
        pipe.generate(&req.clone().scheduler(SchedulerKind::DpmPp2m))
            .unwrap()
            .latents,
    );
    let mut scheduler = DpmSolverMultistepScheduler::<B>::new(1.0).unwrap();
    let token = CancellationToken::new();
    let t2 = token.clone();
    let mut cb = move |p: Progress| {
        if p.step == 3 {
            t2.cancel();
        }
    };
    let hooks = Hooks {
        on_progress: Some(&mut cb),
        cancel: Some(token),
        ..Hooks::default()
    };
    assert!(pipe.generate_with(&req, &mut scheduler, hooks).is_err());
    let again = pipe
        .generate_with(&req, &mut scheduler, Hooks::default())
        .unwrap();
    assert_eq!(to_vec(again.latents), fresh);
}

#[test]
fn bad_scheduler_options_are_typed_errors_naming_them() {
    let pipe = pipeline("A");
    let err = |req: GenerationRequest| match pipe.generate(&req) {
        Err(omnigen_core::Error::InvalidArgument { name, reason }) => format!("{name}: {reason}"),
        other => panic!("expected an invalid argument, got {:?}", other.map(|_| ())),
    };
    assert!(err(t2i().sigmas(vec![1.0, 1.2])).starts_with("sigmas: value 1 (1.2) is outside"));
    assert!(err(t2i().sigmas(vec![0.5, 0.7])).contains("strictly decreasing"));
    assert!(err(t2i().sigmas(vec![1.0, 0.5]).steps(3)).contains("2 values given for 3 steps"));
    assert!(
        err(t2i().scheduler(SchedulerKind::Heun).sigmas(vec![1.0, 0.5]))
            .contains("heun scheduler takes no custom sigmas")
    );
    assert!(err(t2i().time_shift(-1.0)).starts_with("time_shift"));
    let bad_range = CfgRange {
        start: 0.7,
        end: 0.3,
    };
    assert_eq!(
        err(t2i().cfg_range(bad_range)),
        "cfg_range: END 0.3 is below START 0.7"
    );
    let outside = CfgRange {
        start: 0.0,
        end: 1.5,
    };
    assert!(err(t2i().cfg_range(outside)).contains("END 1.5 is outside [0, 1]"));
}
