//! Shared helpers of the transformer tests: fixture cases, model loading, comparisons (the
//! reading and comparing itself is `omnigen-test-support`'s).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor};
use omnigen_models::transformer::{KeyRanges, OmniGenTransformer, TransformerCondition};
use omnigen_models::{default_device, DefaultBackend};
use omnigen_test_support::{
    assert_close_tensors, fixture, parse_spans, read_json, tensor_max_abs_diff, test_dtype,
    SafetensorsFile,
};

pub type B = DefaultBackend;

/// The committed fixture set A.
pub fn fixtures_a() -> PathBuf {
    fixture("A")
}

/// One recorded transformer call: the condition and the per-step inputs.
pub struct Call {
    pub cond: TransformerCondition<B>,
    pub x: Tensor<B, 4>,
    pub timestep: Tensor<B, 1>,
}

impl Call {
    /// The uncached forward of this call.
    pub fn forward(&self, model: &OmniGenTransformer<B>) -> omnigen_core::Result<Tensor<B, 4>> {
        model.forward(&self.cond, self.x.clone(), self.timestep.clone())
    }

    /// The KV-cache prefill of this call.
    pub fn prefill(
        &self,
        model: &OmniGenTransformer<B>,
        mode: omnigen_models::transformer::KvCacheMode,
    ) -> omnigen_core::Result<(Tensor<B, 4>, omnigen_models::transformer::KvCache<B>)> {
        model.prefill(&self.cond, self.x.clone(), self.timestep.clone(), mode)
    }
}

/// A fixture file: `NAME.safetensors` + `NAME.json`.
pub struct Fixture {
    file: SafetensorsFile,
    pub json: serde_json::Value,
}

impl Fixture {
    /// The inputs of a `transformer_only*` dump (one cond row with one input image).
    pub fn tf_input(&self) -> Call {
        Call {
            cond: TransformerCondition {
                input_ids: Some(self.i("tf.input_ids")),
                input_img_latents: vec![self.f("tf.input_img_latents.0")],
                image_spans: Fixture::spans(&self.json["input_image_sizes"], 1),
                attention_mask: self.mask("tf.attention_mask"),
                position_ids: self.i("tf.position_ids"),
            },
            x: self.f("tf.x"),
            timestep: self.f("tf.timestep"),
        }
    }

    pub fn open(dir: &Path, name: &str) -> Self {
        Self {
            file: SafetensorsFile::open(dir.join(format!("{name}.safetensors"))),
            json: read_json(dir.join(format!("{name}.json"))),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.has(name)
    }

    /// A float tensor; U8 tensors (the added cases' 0/1 masks) are converted.
    pub fn f<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        self.file.tensor(name, &default_device())
    }

    /// A recorded dense 0/1 mask `[B, S, S]` as the transformer takes it.
    pub fn mask(&self, name: &str) -> KeyRanges {
        let dense: Tensor<B, 3> = self.f(name);
        let dims = dense.dims();
        let values = dense.into_data().into_vec::<f32>().expect("an f32 mask");
        KeyRanges::from_dense(&values, dims).expect("an OmniGen mask")
    }

    pub fn i<const D: usize>(&self, name: &str) -> Tensor<B, D, Int> {
        self.file.int_tensor(name, &default_device())
    }

    /// `proc.bK.input_image_sizes` (or the top-level `input_image_sizes`) as spans per row.
    pub fn spans(value: &serde_json::Value, rows: usize) -> Vec<Vec<(usize, usize)>> {
        let empty = value.as_object().is_some_and(|o| o.is_empty());
        if empty {
            return Vec::new();
        }
        parse_spans(value, rows)
    }

    /// The recorded uncached inputs of one branch (`bK` or `batch`) at step `step` of a pipeline case.
    pub fn branch_input(&self, br: &str, step: usize) -> Call {
        let p = format!("proc.{br}");
        let ids: Tensor<B, 2, Int> = self.i(&format!("{p}.input_ids"));
        let rows = ids.dims()[0];
        let n_img = self.json[&p]["num_pixel_values"].as_u64().unwrap_or(0) as usize;
        Call {
            cond: TransformerCondition {
                input_ids: Some(ids),
                input_img_latents: (0..n_img)
                    .map(|j| self.f(&format!("step0.{br}.input_img_latents.{j}")))
                    .collect(),
                image_spans: Self::spans(&self.json[&p]["input_image_sizes"], rows),
                attention_mask: self.mask(&format!("{p}.attention_mask")),
                position_ids: self.i(&format!("{p}.position_ids")),
            },
            x: self.f(&format!("step{step}.{br}.x")),
            timestep: self.f(&format!("step{step}.{br}.timestep")),
        }
    }

    /// Number of CFG branches recorded separately (`b0`, `b1`, ...).
    pub fn branches(&self) -> Vec<String> {
        if self.has("proc.batch.input_ids") {
            return vec!["batch".into()];
        }
        (0..)
            .map(|k| format!("b{k}"))
            .take_while(|b| self.has(&format!("proc.{b}.input_ids")))
            .collect()
    }

    pub fn uses_kv_cache(&self) -> bool {
        self.json["pipeline_call_args"]["use_kv_cache"]
            .as_bool()
            .expect("use_kv_cache")
    }

    pub fn steps(&self) -> usize {
        self.json["pipeline_call_args"]["num_inference_steps"]
            .as_u64()
            .unwrap() as usize
    }
}

/// The fixture set B (LongRoPE threshold 72).
pub fn fixtures_b() -> PathBuf {
    fixture("B")
}

/// Replays every transformer call of pipeline case `name`: uncached forwards for `*_nokv`
/// cases, the official KV cache (prefill + cached steps) otherwise. Returns the worst diff.
pub fn replay_case(model: &OmniGenTransformer<B>, dir: &Path, name: &str) -> f32 {
    use omnigen_models::transformer::KvCacheMode;
    let fx = Fixture::open(dir, name);
    let mut worst = 0f32;
    for br in fx.branches() {
        let expected = |step: usize| fx.f::<4>(&format!("step{step}.{br}.out"));
        if fx.uses_kv_cache() {
            let (out0, cache) = fx
                .branch_input(&br, 0)
                .prefill(model, KvCacheMode::Official)
                .expect("prefill");
            worst = worst.max(check(
                &format!("{name} step0.{br} (prefill)"),
                out0,
                expected(0),
                TOL,
            ));
            for step in 1..fx.steps() {
                let x = fx.f(&format!("step{step}.{br}.x"));
                let t = fx.f(&format!("step{step}.{br}.timestep"));
                let out = model.forward_cached(&cache, x, t).expect("cached step");
                worst = worst.max(check(
                    &format!("{name} step{step}.{br} (cached)"),
                    out,
                    expected(step),
                    TOL,
                ));
            }
        } else {
            for step in 0..fx.steps() {
                let out = fx.branch_input(&br, step).forward(model).expect("forward");
                worst = worst.max(check(
                    &format!("{name} step{step}.{br}"),
                    out,
                    expected(step),
                    TOL,
                ));
            }
        }
    }
    println!("{name}: worst {worst:.3e}");
    worst
}

pub fn load_model(dir: &Path) -> OmniGenTransformer<B> {
    OmniGenTransformer::from_dir(dir, &default_device(), test_dtype()).expect("model loads")
}

pub fn max_abs<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    tensor_max_abs_diff(a, b)
}

/// Asserts `max|a - b| <= tol` and prints the figure.
pub fn check<const D: usize>(what: &str, a: Tensor<B, D>, b: Tensor<B, D>, tol: f32) -> f32 {
    assert_close_tensors(what, a, b, tol)
}

pub const TOL: f32 = 1e-4;
