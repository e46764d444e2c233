//! PEFT LoRA adapters merged into the transformer's weights at load time.
//!
//! The official pipeline's `merge_lora(path)` is `PeftModel.from_pretrained(model, path)
//! .merge_and_unload()`: every targeted `Linear` gets `W <- W + scaling * B @ A` with
//! `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). Here the same merge
//! happens while the weights are read: [`LoraMergedReader`] wraps any [`WeightReader`] and
//! returns merged tensors for the targeted keys, so the model is built through its ordinary
//! loading path and no adapter code runs in the forward.
//!
//! An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's
//! `save_pretrained`). Tensor keys are `base_model.model.<module>.lora_A.weight` `[r, in]` and
//! `...lora_B.weight` `[out, r]`, where `<module>` is an official module path such as
//! `llm.layers.3.self_attn.qkv_proj` (see [`LINEAR_MODULES`] for the layers that can be merged).
//!
//! Two merge precisions are offered ([`LoraMergePrecision`]): the official one, which merges in
//! bf16 because the official pipeline holds the model in bf16 when it merges, and a plain f32
//! merge.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::{bf16, DType, TensorData};
use omnigen_core::{Error, Result, WeightSource};
use serde_json::Value;

use crate::loader::WeightReader;

/// File name of the adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter weights (the only weight format supported).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's pickle weight file, refused with a clear error.
const ADAPTER_WEIGHTS_BIN: &str = "adapter_model.bin";
/// PEFT's prefix on saved keys (`PeftModel` -> `LoraModel` -> the wrapped OmniGen module).
const PEFT_PREFIX: &str = "base_model.model.";

/// Every `Linear` of the transformer, by official module path (`{i}` = a layer index): the
/// modules a LoRA adapter can be merged into.
pub const LINEAR_MODULES: &[&str] = &[
    "llm.layers.{i}.self_attn.qkv_proj",
    "llm.layers.{i}.self_attn.o_proj",
    "llm.layers.{i}.mlp.gate_up_proj",
    "llm.layers.{i}.mlp.down_proj",
    "time_token.mlp.0",
    "time_token.mlp.2",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "final_layer.adaLN_modulation.1",
    "final_layer.linear",
];

/// Leaf modules that are not `Linear` (convolutions, the embedding table, norms): a target that
/// names one of them is refused.
const OTHER_MODULES: &[&str] = &[
    "x_embedder.proj",
    "input_x_embedder.proj",
    "llm.embed_tokens",
    "llm.layers.{i}.input_layernorm",
    "llm.layers.{i}.post_attention_layernorm",
    "llm.norm",
];

/// How the adapter delta is added to the base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMergePrecision {
    /// As the official pipeline (PEFT 0.9 `merge_and_unload` on a bf16 model, CPU path): `A`, `B`
    /// and `W` rounded to bf16, `delta = bf16(f32(B @ A) * scaling)`, `W' = bf16(W + delta)`.
    /// The merged weights are bf16-exact. Bit-exact with the official merge on fixture A.
    #[default]
    Official,
    /// `W' = W + scaling * (B @ A)` in f32 with the tensors as read (no bf16 rounding of the
    /// delta or of the result).
    F32,
}

/// How `target_modules` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// A list of module names, each matching a module path equal to it or ending in `.name`.
    Names(Vec<String>),
    /// A regular expression on the full module path (PEFT's string form). Not evaluated: the
    /// modules present in the adapter file are checked instead.
    Regex(String),
}

/// The fields of PEFT's `adapter_config.json` that the merge uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Default rank `r`.
    pub r: usize,
    /// Default `lora_alpha`.
    pub lora_alpha: f64,
    /// Targeted modules.
    pub target_modules: TargetModules,
    /// Rank-stabilised scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// PEFT's `fan_in_fan_out`. PEFT resets it to false for `torch.nn.Linear` targets (with a
    /// warning), and every mergeable module here is a `Linear`, so it does not change the merge.
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides (plain module-name suffixes only).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (plain module-name suffixes only).
    pub alpha_pattern: BTreeMap<String, f64>,
}

/// Whether `target` names `pattern` the way PEFT matches a target (the whole path, or a suffix
/// starting after a `.`). `{i}` in the pattern matches any layer index.
fn suffix_matches(pattern: &str, target: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = target.split('.').collect();
    if t.len() > p.len() {
        return false;
    }
    p[p.len() - t.len()..].iter().zip(&t).all(|(p, t)| {
        if *p == "{i}" {
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())
        } else {
            p == t
        }
    })
}

/// Whether the full module path `module` is one of `patterns`.
fn is_one_of(patterns: &[&str], module: &str) -> bool {
    patterns
        .iter()
        .any(|p| suffix_matches(p, module) && p.split('.').count() == module.split('.').count())
}

/// Whether `module` ends with `.key` or equals it (`re.match(rf".*\.{key}$")` for plain keys).
fn module_has_suffix(module: &str, key: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

const REGEX_META: &[char] = &[
    '*', '+', '?', '(', ')', '[', ']', '{', '}', '|', '^', '$', '\\',
];

impl LoraConfig {
    /// Reads and validates `adapter_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::from_json(&value, path)
    }

    /// Parses a config already read as JSON; `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.into(),
            reason,
        };
        if let Some(peft_type) = value.get("peft_type").and_then(Value::as_str) {
            if peft_type != "LORA" {
                return Err(bad(format!(
                    "peft_type is `{peft_type}`; only LORA adapters can be merged"
                )));
            }
        }
        let r = value
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("missing or invalid `r` (a positive integer)".into()))?
            as usize;
        let lora_alpha = value
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("missing or invalid `lora_alpha` (a number)".into()))?;
        let flag = |name: &str| value.get(name).and_then(Value::as_bool).unwrap_or(false);
        if flag("use_dora") {
            return Err(bad(
                "use_dora is true: DoRA adapters (magnitude vectors) are not supported".into(),
            ));
        }
        if let Some(bias) = value.get("bias").and_then(Value::as_str) {
            if bias != "none" {
                return Err(bad(format!(
                    "bias is `{bias}`: adapters with trained biases are not supported (only `none`)"
                )));
            }
        }
        if value
            .get("modules_to_save")
            .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(bad(
                "modules_to_save is set: adapters carrying fully trained modules are not supported"
                    .into(),
            ));
        }
        let target_modules = match value.get("target_modules") {
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => {
                let names = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("`target_modules` must hold strings".into()))?;
                for name in &names {
                    check_target(name).map_err(bad)?;
                }
                TargetModules::Names(names)
            }
            _ => {
                return Err(bad(
                    "missing `target_modules` (a list of module names or a regex string)".into(),
                ))
            }
        };
        let pattern = |name: &str| -> Result<BTreeMap<String, f64>> {
            let mut out = BTreeMap::new();
            if let Some(obj) = value.get(name).and_then(Value::as_object) {
                for (k, v) in obj {
                    if k.contains(REGEX_META) {
                        return Err(bad(format!(
                            "{name} key `{k}` is a regular expression; only plain module names are supported"
                        )));
                    }
                    let v = v
                        .as_f64()
                        .ok_or_else(|| bad(format!("{name}[`{k}`] must be a number")))?;
                    out.insert(k.clone(), v);
                }
            }
            Ok(out)
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, v)| {
                if v >= 1.0 && v.fract() == 0.0 {
                    Ok((k, v as usize))
                } else {
                    Err(bad(format!(
                        "rank_pattern[`{k}`] = {v} is not a positive integer"
                    )))
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            r,
            lora_alpha,
            target_modules,
            use_rslora: flag("use_rslora"),
            fan_in_fan_out: flag("fan_in_fan_out"),
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// The pattern key PEFT picks for `module`: the first of rank_pattern's then alpha_pattern's
    /// keys that is a suffix of it.
    fn pattern_key(&self, module: &str) -> Option<&str> {
        self.rank_pattern
            .keys()
            .chain(self.alpha_pattern.keys())
            .map(String::as_str)
            .find(|k| module_has_suffix(module, k))
    }

    /// The rank of `module` (`rank_pattern` override or `r`).
    pub fn rank_of(&self, module: &str) -> usize {
        self.pattern_key(module)
            .and_then(|k| self.rank_pattern.get(k).copied())
            .unwrap_or(self.r)
    }

    /// The alpha of `module` (`alpha_pattern` override or `lora_alpha`).
    pub fn alpha_of(&self, module: &str) -> f64 {
        self.pattern_key(module)
            .and_then(|k| self.alpha_pattern.get(k).copied())
            .unwrap_or(self.lora_alpha)
    }

    /// PEFT's scaling of `module`: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
    pub fn scaling_of(&self, module: &str) -> f64 {
        let r = self.rank_of(module) as f64;
        let denom = if self.use_rslora { r.sqrt() } else { r };
        self.alpha_of(module) / denom
    }

    /// Whether `module` is targeted (always true for a regex target list, which is not evaluated).
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::Names(names) => names.iter().any(|n| module_has_suffix(module, n)),
            TargetModules::Regex(_) => true,
        }
    }
}

/// Refuses a target name that matches no `Linear` of the transformer, or matches a module of
/// another kind.
fn check_target(name: &str) -> std::result::Result<(), String> {
    let supported = || {
        LINEAR_MODULES
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(other) = OTHER_MODULES.iter().find(|p| suffix_matches(p, name)) {
        return Err(format!(
            "target module `{name}` names `{other}`, which is not a Linear layer; LoRA can only be \
             merged into the transformer's Linear layers ({})",
            supported()
        ));
    }
    if !LINEAR_MODULES.iter().any(|p| suffix_matches(p, name)) {
        return Err(format!(
            "target module `{name}` matches no Linear layer of the OmniGen transformer; supported \
             targets: {}",
            supported()
        ));
    }
    Ok(())
}

/// One adapted `Linear`: `A` `[r, in]`, `B` `[out, r]` as f32, and its effective scaling.
#[derive(Debug, Clone)]
struct LoraModule {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    d_in: usize,
    d_out: usize,
    a_key: String,
    b_key: String,
    /// PEFT's scaling times the user scale.
    scaling: f64,
}

/// A PEFT LoRA adapter read into memory, with a user scale.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    dir: PathBuf,
    weights_path: PathBuf,
    config: LoraConfig,
    scale: f32,
    modules: BTreeMap<String, LoraModule>,
}

impl LoraAdapter {
    /// Reads the adapter folder `dir` (`adapter_config.json` + `adapter_model.safetensors`).
    ///
    /// `scale` multiplies PEFT's `alpha / r` (1.0 = the official merge). Errors: a missing file
    /// ([`Error::Io`], not found), only `adapter_model.bin` present ([`Error::InvalidArgument`]
    /// `lora`: only safetensors is supported), an unsupported config or a tensor whose rank
    /// disagrees with it ([`Error::Config`], naming the tensor), a module that is not a
    /// transformer `Linear` or has only one of `lora_A`/`lora_B` ([`Error::CorruptWeights`]).
    /// A mismatch with the base model's shapes is found at merge time ([`Error::ShapeMismatch`]
    /// naming the adapter tensor).
    pub fn open(dir: impl AsRef<Path>, scale: f32) -> Result<Self> {
        let dir = dir.as_ref();
        if !scale.is_finite() {
            return Err(Error::invalid_argument(
                "lora",
                format!("scale {scale} of adapter {} is not finite", dir.display()),
            ));
        }
        let not_found = |path: PathBuf, what: &str| {
            Error::io(
                "find",
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()),
            )
        };
        if !dir.is_dir() {
            return Err(not_found(dir.into(), "no such LoRA adapter folder"));
        }
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(not_found(
                config_path,
                "a PEFT adapter folder needs adapter_config.json",
            ));
        }
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.is_file() {
            if dir.join(ADAPTER_WEIGHTS_BIN).is_file() {
                return Err(Error::invalid_argument(
                    "lora",
                    format!(
                        "{} holds adapter_model.bin (a PyTorch pickle); only adapter_model.safetensors is \
                         supported: convert it, e.g. `safetensors.torch.save_file(torch.load(\"adapter_model.bin\"), \
                         \"adapter_model.safetensors\")`",
                        dir.display()
                    ),
                ));
            }
            return Err(not_found(
                weights_path,
                "a PEFT adapter folder needs adapter_model.safetensors",
            ));
        }
        let config = LoraConfig::from_file(&config_path)?;
        if config.fan_in_fan_out {
            tracing::warn!(
                "{}: fan_in_fan_out is true, but every mergeable module is a Linear, for which PEFT \
                 resets it to false; merging with the standard [out, in] layout",
                config_path.display()
            );
        }
        let source = WeightSource::open(&weights_path)?;
        let modules = read_modules(&source, &config, &weights_path, f64::from(scale))?;
        Ok(Self {
            dir: dir.into(),
            weights_path,
            config,
            scale,
            modules,
        })
    }

    /// The adapter folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `adapter_config.json`.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The user scale given to [`open`](Self::open).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The adapted module paths (e.g. `llm.layers.0.self_attn.qkv_proj`), sorted.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The effective scaling of `module` (PEFT's `alpha / r` times the user scale).
    pub fn scaling_of(&self, module: &str) -> Option<f64> {
        self.modules.get(module).map(|m| m.scaling)
    }

    /// Merges this adapter's delta for `module` into `w` (`[out, in]` row-major f32 values,
    /// `shape` as the model expects). Returns false when the adapter does not touch `module`.
    pub fn merge_into(
        &self,
        module: &str,
        w: &mut [f32],
        shape: &[usize],
        precision: LoraMergePrecision,
    ) -> Result<bool> {
        let Some(m) = self.modules.get(module) else {
            return Ok(false);
        };
        let (d_out, d_in) = match shape {
            [o, i] => (*o, *i),
            _ => {
                return Err(Error::invalid_argument(
                    "lora",
                    format!(
                    "`{module}.weight` has shape {shape:?}; LoRA merges need a 2-D Linear weight"
                ),
                ))
            }
        };
        if m.d_in != d_in {
            return Err(Error::ShapeMismatch {
                name: m.a_key.clone(),
                path: self.weights_path.clone(),
                expected: vec![m.rank, d_in],
                found: vec![m.rank, m.d_in],
            });
        }
        if m.d_out != d_out {
            return Err(Error::ShapeMismatch {
                name: m.b_key.clone(),
                path: self.weights_path.clone(),
                expected: vec![d_out, m.rank],
                found: vec![m.d_out, m.rank],
            });
        }
        debug_assert_eq!(w.len(), d_out * d_in);
        let scaling = m.scaling as f32;
        match precision {
            LoraMergePrecision::Official => {
                let a: Vec<f32> = m.a.iter().map(|&x| round_bf16(x)).collect();
                let b: Vec<f32> = m.b.iter().map(|&x| round_bf16(x)).collect();
                let delta = matmul(&b, &a, d_out, m.rank, d_in);
                for (w, d) in w.iter_mut().zip(delta) {
                    *w = round_bf16(round_bf16(*w) + round_bf16(d * scaling));
                }
            }
            LoraMergePrecision::F32 => {
                let delta = matmul(&m.b, &m.a, d_out, m.rank, d_in);
                for (w, d) in w.iter_mut().zip(delta) {
                    *w += scaling * d;
                }
            }
        }
        Ok(true)
    }
}

/// Groups the adapter file's tensors by module and validates them against the config.
fn read_modules(
    source: &WeightSource,
    config: &LoraConfig,
    path: &Path,
    user_scale: f64,
) -> Result<BTreeMap<String, LoraModule>> {
    let invalid = |reason: String| Error::CorruptWeights {
        path: path.into(),
        reason,
    };
    // module -> (A key, B key)
    let mut pairs: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for key in source.keys() {
        let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
        let parsed = [(".lora_A.", true), (".lora_B.", false)]
            .iter()
            .find_map(|(tag, is_a)| {
                let (module, tail) = rest.split_once(tag)?;
                // `weight`, or `<adapter name>.weight` when saved without PEFT's name stripping.
                let ok = tail == "weight"
                    || tail
                        .strip_suffix(".weight")
                        .is_some_and(|n| !n.is_empty() && !n.contains('.'));
                ok.then(|| (module.to_string(), *is_a))
            });
        let Some((module, is_a)) = parsed else {
            return Err(invalid(format!(
                "unsupported adapter tensor `{key}`: only `<module>.lora_A.weight` / `<module>.lora_B.weight` \
                 of Linear layers can be merged"
            )));
        };
        if !is_one_of(LINEAR_MODULES, &module) {
            return Err(invalid(format!(
                "adapter tensor `{key}` targets `{module}`, which is not a Linear layer of the OmniGen \
                 transformer"
            )));
        }
        let slot = pairs.entry(module).or_default();
        let place = if is_a { &mut slot.0 } else { &mut slot.1 };
        if place.replace(key.to_string()).is_some() {
            return Err(invalid(format!(
                "two tensors for the same LoRA matrix (second: `{key}`); adapters with several names are not supported"
            )));
        }
    }
    if pairs.is_empty() {
        return Err(invalid("no lora_A/lora_B tensors".into()));
    }
    let mut modules = BTreeMap::new();
    for (module, (a_key, b_key)) in pairs {
        let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
            return Err(invalid(format!(
                "module `{module}` has only one of lora_A / lora_B"
            )));
        };
        if !config.targets(&module) {
            return Err(invalid(format!(
                "module `{module}` has LoRA tensors but is not in target_modules of {ADAPTER_CONFIG}"
            )));
        }
        let rank = config.rank_of(&module);
        let a_shape = source.shape(&a_key).unwrap_or_default();
        let b_shape = source.shape(&b_key).unwrap_or_default();
        let (d_in, d_out) = match (a_shape.as_slice(), b_shape.as_slice()) {
            ([_, i], [o, _]) => (*i, *o),
            _ => {
                return Err(invalid(format!(
                    "`{a_key}` {a_shape:?} and `{b_key}` {b_shape:?} must both be 2-D"
                )))
            }
        };
        for (key, found) in [(&a_key, a_shape[0]), (&b_key, b_shape[1])] {
            if found != rank {
                return Err(Error::Config {
                    path: path.with_file_name(ADAPTER_CONFIG),
                    reason: format!(
                        "`{key}` in {} has shape {:?}, i.e. rank {found}, but the config gives rank {rank} \
                         for `{module}` (`r`{})",
                        path.display(),
                        if key == &a_key { &a_shape } else { &b_shape },
                        if config.rank_pattern.is_empty() { "" } else { " / `rank_pattern`" },
                    ),
                });
            }
        }
        let a = source.read_f32(&a_key, &[rank, d_in])?;
        let b = source.read_f32(&b_key, &[d_out, rank])?;
        modules.insert(
            module.clone(),
            LoraModule {
                a,
                b,
                rank,
                d_in,
                d_out,
                scaling: config.scaling_of(&module) * user_scale,
                a_key,
                b_key,
            },
        );
    }
    Ok(modules)
}

/// `x` rounded to the nearest bf16 (ties to even, as `torch.Tensor.to(torch.bfloat16)`).
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `[m, k] @ [k, n]` in f32, summing over `k` in order.
fn matmul(lhs: &[f32], rhs: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for (row, out_row) in out.chunks_exact_mut(n).enumerate() {
        for kk in 0..k {
            let l = lhs[row * k + kk];
            let r = &rhs[kk * n..(kk + 1) * n];
            for (o, &r) in out_row.iter_mut().zip(r) {
                *o += l * r;
            }
        }
    }
    out
}

/// Reads `key` as f32 values.
pub(crate) fn read_f32(reader: &dyn WeightReader, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let data = reader.read(key, shape, DType::F32)?;
    data.into_vec::<f32>()
        .map_err(|e| Error::invalid_argument("weights", format!("tensor `{key}`: {e:?}")))
}

/// A [`WeightReader`] that returns `base`'s tensors with LoRA adapters merged into the targeted
/// `<module>.weight` keys, in adapter order; other keys pass through unchanged.
///
/// After the model is built, [`finish`](Self::finish) checks that every adapted module was read,
/// so an adapter made for another model (more layers, other modules) does not go unnoticed.
pub struct LoraMergedReader<'a> {
    base: &'a dyn WeightReader,
    adapters: Vec<LoraAdapter>,
    precision: LoraMergePrecision,
    merged: RefCell<BTreeSet<(usize, String)>>,
}

impl<'a> LoraMergedReader<'a> {
    /// Wraps `base` with `adapters` merged in `precision`.
    pub fn new(
        base: &'a dyn WeightReader,
        adapters: Vec<LoraAdapter>,
        precision: LoraMergePrecision,
    ) -> Self {
        Self {
            base,
            adapters,
            precision,
            merged: RefCell::new(BTreeSet::new()),
        }
    }

    /// The adapters, in merge order.
    pub fn adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }

    /// Errors if some adapted module was never read (the model has no such layer).
    pub fn finish(&self) -> Result<()> {
        let merged = self.merged.borrow();
        for (i, adapter) in self.adapters.iter().enumerate() {
            for module in adapter.modules() {
                if !merged.contains(&(i, module.to_string())) {
                    return Err(Error::invalid_argument(
                        "lora",
                        format!(
                            "adapter {} adapts `{module}`, which this model does not have (made for another model?)",
                            adapter.dir().display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl WeightReader for LoraMergedReader<'_> {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        let Some(module) = key.strip_suffix(".weight") else {
            return self.base.read(key, shape, dtype);
        };
        if !self.adapters.iter().any(|a| a.modules.contains_key(module)) {
            return self.base.read(key, shape, dtype);
        }
        let mut w = read_f32(self.base, key, shape)?;
        for (i, adapter) in self.adapters.iter().enumerate() {
            if adapter.merge_into(module, &mut w, shape, self.precision)? {
                self.merged.borrow_mut().insert((i, module.to_string()));
            }
        }
        Ok(TensorData::new(w, shape.to_vec()).convert_dtype(dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_to_linear_layers_only() {
        for ok in [
            "qkv_proj",
            "o_proj",
            "self_attn.qkv_proj",
            "layers.3.self_attn.o_proj",
            "gate_up_proj",
            "down_proj",
            "linear",
            "adaLN_modulation.1",
            "mlp.0",
        ] {
            assert!(check_target(ok).is_ok(), "{ok}");
        }
        for bad in [
            "proj",
            "x_embedder.proj",
            "embed_tokens",
            "norm",
            "q_proj",
            "to_q",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
        assert!(is_one_of(
            LINEAR_MODULES,
            "llm.layers.12.self_attn.qkv_proj"
        ));
        assert!(!is_one_of(LINEAR_MODULES, "layers.12.self_attn.qkv_proj"));
        assert!(!is_one_of(
            LINEAR_MODULES,
            "llm.layers.x.self_attn.qkv_proj"
        ));
    }

    #[test]
    fn patterns_override_rank_and_alpha() {
        let v: Value = serde_json::json!({
            "r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "o_proj"],
            "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"layers.1.self_attn.qkv_proj": 2}
        });
        let c = LoraConfig::from_json(&v, Path::new("x")).unwrap();
        assert_eq!(c.rank_of("llm.layers.0.self_attn.o_proj"), 2);
        assert_eq!(c.scaling_of("llm.layers.0.self_attn.o_proj"), 4.0);
        assert_eq!(c.scaling_of("llm.layers.0.self_attn.qkv_proj"), 2.0);
        assert_eq!(c.scaling_of("llm.layers.1.self_attn.qkv_proj"), 0.5);
        let rs: Value = serde_json::json!({"r": 4, "lora_alpha": 4, "target_modules": ["o_proj"], "use_rslora": true});
        let c = LoraConfig::from_json(&rs, Path::new("x")).unwrap();
        assert_eq!(c.scaling_of("llm.layers.0.self_attn.o_proj"), 2.0);
    }

    #[test]
    fn round_bf16_ties_to_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: rounds up to even.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
    }
}
