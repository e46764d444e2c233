//! An adapter folder read into memory: files, tensors grouped by module, checks against the
//! config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use omnigen_core::{Error, Result, WeightSource};

use super::config::{is_one_of, LoraConfig};
use super::merge::{merge_delta, LoraMergePrecision};
use super::{ModuleTable, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, PEFT_PREFIX};

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
    /// `scale` multiplies PEFT's `alpha / r` (1.0 = the official merge); `modules` is the model's
    /// table of leaf modules (the transformer's: [`crate::transformer::MODULES`]). Errors: a missing file
    /// ([`Error::Io`], not found), only `adapter_model.bin` present ([`Error::InvalidArgument`]
    /// `lora`: only safetensors is supported), an unsupported config or a tensor whose rank
    /// disagrees with it ([`Error::Config`], naming the tensor), a module that is not one of
    /// the model's `Linear` layers or has only one of `lora_A`/`lora_B` ([`Error::CorruptWeights`]).
    /// A mismatch with the base model's shapes is found at merge time ([`Error::ShapeMismatch`]
    /// naming the adapter tensor).
    pub fn open(dir: impl AsRef<Path>, scale: f32, modules: &ModuleTable) -> Result<Self> {
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
        config.check_targets(modules, &config_path)?;
        if config.fan_in_fan_out {
            tracing::warn!(
                "{}: fan_in_fan_out is true, but every mergeable module is a Linear, for which PEFT \
                 resets it to false; merging with the standard [out, in] layout",
                config_path.display()
            );
        }
        let source = WeightSource::open(&weights_path)?;
        let modules = read_modules(&source, &config, modules, &weights_path, f64::from(scale))?;
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
        merge_delta(
            w,
            (&m.a, &m.b),
            (d_out, m.rank, d_in),
            m.scaling as f32,
            precision,
        );
        Ok(true)
    }
}

/// Groups the adapter file's tensors by module and validates them against the config.
fn read_modules(
    source: &WeightSource,
    config: &LoraConfig,
    table: &ModuleTable,
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
        if !is_one_of(table.linear, &module) {
            return Err(invalid(format!(
                "adapter tensor `{key}` targets `{module}`, which is not a Linear layer of the {}",
                table.model
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
