//! PEFT's `adapter_config.json`: parsing, target names, per-module rank and alpha.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use omnigen_core::{Error, Result};
use serde_json::Value;

use super::ModuleTable;

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
pub(super) fn suffix_matches(pattern: &str, target: &str) -> bool {
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
pub(super) fn is_one_of(patterns: &[&str], module: &str) -> bool {
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

    /// Refuses a target name list naming anything but `modules`' Linear layers (a regex target
    /// is not evaluated); `path` names the config in the error.
    pub fn check_targets(&self, modules: &ModuleTable, path: &Path) -> Result<()> {
        if let TargetModules::Names(names) = &self.target_modules {
            for name in names {
                check_target(name, modules).map_err(|reason| Error::Config {
                    path: path.into(),
                    reason,
                })?;
            }
        }
        Ok(())
    }

    /// Whether `module` is targeted (always true for a regex target list, which is not evaluated).
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::Names(names) => names.iter().any(|n| module_has_suffix(module, n)),
            TargetModules::Regex(_) => true,
        }
    }
}

/// Refuses a target name that matches no `Linear` of the model, or matches a module of another
/// kind.
pub(super) fn check_target(name: &str, modules: &ModuleTable) -> std::result::Result<(), String> {
    let supported = || {
        modules
            .linear
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(other) = modules.other.iter().find(|p| suffix_matches(p, name)) {
        return Err(format!(
            "target module `{name}` names `{other}`, which is not a Linear layer; LoRA can only be \
             merged into the {}'s Linear layers ({})",
            modules.model,
            supported()
        ));
    }
    if !modules.linear.iter().any(|p| suffix_matches(p, name)) {
        return Err(format!(
            "target module `{name}` matches no Linear layer of the {}; supported targets: {}",
            modules.model,
            supported()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::{LINEAR_MODULES, MODULES};

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
            assert!(check_target(ok, &MODULES).is_ok(), "{ok}");
        }
        for bad in [
            "proj",
            "x_embedder.proj",
            "embed_tokens",
            "norm",
            "q_proj",
            "to_q",
        ] {
            assert!(check_target(bad, &MODULES).is_err(), "{bad}");
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
}
