//! Memory guard: the request's tokens and memory are estimated before any work starts, and a
//! request that cannot fit is refused with the option that would make it fit.

use std::path::Path;

use burn::tensor::DType;
use omnigen_core::{Error, ModelFolder, Result, TransformerConfig, VaeConfig};
use omnigen_models::KernelBackend;

use crate::processor::{GuidanceInputs, OmniGenProcessor, ProcessedBatch};
use crate::request::{GenerationRequest, KvCache};
use omnigen_models::transformer::KvPlacement;

/// Bytes a generation needs beyond the loaded weights, by cause.
///
/// The model is the live set of each phase of the run, whose largest is the peak; its
/// coefficients were fitted to and are checked against measured peaks (see
/// `docs/robustness.md` and the sweep in the CLI tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    /// Largest transformer call's live activations (one layer at a time, attention scores
    /// included when the backend materialises them).
    pub activations: u64,
    /// Attention masks alive at that call: their key ranges where the host attention kernel
    /// runs, otherwise the dense `[B, S, S]` additive biases (quadratic in the tokens, the
    /// largest term of a long request).
    pub masks: u64,
    /// Keys and values of the condition tokens in device memory, all branches and layers (two
    /// layers of them with the cache offloaded, [`KvPlacement::Host`]).
    pub kv_cache: u64,
    /// Keys and values kept in host memory instead ([`KvPlacement::Host`]), all branches and
    /// layers: not part of [`peak`](Self::peak), which is the device's.
    pub kv_cache_host: u64,
    /// Input-image tokens' share of the transformer phase.
    pub input_image_share: u64,
    /// VAE decode feature maps at full resolution (or per tile).
    pub vae: u64,
    /// The largest input image's VAE encode (before the loop, never tiled).
    pub vae_encode: u64,
    /// What every run holds whatever its size: thread stacks, allocator arenas, tokenizer state.
    pub fixed: u64,
}

impl MemoryEstimate {
    /// Peak bytes: the transformer phase and the VAE phases do not overlap.
    pub fn peak(&self) -> u64 {
        self.fixed + self.transformer_phase().max(self.vae).max(self.vae_encode)
    }

    /// Live bytes of the denoising phase.
    pub fn transformer_phase(&self) -> u64 {
        self.activations + self.masks + self.kv_cache
    }
}

/// Bytes every run holds beyond the loaded model, whatever its size.
const FIXED_BYTES: u64 = 4 << 20;

/// [`estimate`] for a transformer on backend `B` whose activations, caches and masks are in
/// `compute_dtype` (the transformer's `dtype()`): the byte width and the attention forms
/// (score tiles, dense mask) follow from the backend's kernels. `kv_cache`: where the cache
/// is kept, `None` without one.
pub fn estimate_on<B: KernelBackend>(
    batch: &ProcessedBatch,
    cfg: &TransformerConfig,
    vae: &VaeConfig,
    vae_tile: Option<usize>,
    compute_dtype: DType,
    kv_cache: Option<KvPlacement>,
) -> MemoryEstimate {
    let bytes = if compute_dtype == DType::F32 { 4 } else { 2 };
    estimate(
        batch,
        cfg,
        vae,
        vae_tile,
        bytes,
        kv_cache,
        omnigen_models::ops::attention_score_tile::<B>(compute_dtype),
        omnigen_models::ops::attention_mask_is_dense::<B>(compute_dtype),
    )
}

/// Estimates the memory of a processed request.
///
/// `kv_cache`: where the kv cache is kept, `None` without one; `score_tile`: the most
/// attention scores one query tile holds (from
/// [`attention_score_tile`](omnigen_models::ops::attention_score_tile)), `None` where the
/// attention holds no score tensor; `dense_mask`: whether the mask becomes a dense bias.
#[allow(clippy::too_many_arguments)]
pub fn estimate(
    batch: &ProcessedBatch,
    cfg: &TransformerConfig,
    vae: &VaeConfig,
    vae_tile: Option<usize>,
    weight_bytes: u64,
    kv_cache: Option<KvPlacement>,
    score_tile: Option<u64>,
    dense_mask: bool,
) -> MemoryEstimate {
    let f32b = 4u64;
    let (d, i, heads) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.num_attention_heads as u64,
    );
    let layers = cfg.num_hidden_layers as u64;
    let m = |a: u64, b: u64| a.saturating_mul(b);
    // One call with `rows` rows of `s` tokens, `cond` of them condition tokens, `n` output
    // tokens: (activations, masks while it runs, kv cache it leaves, mask tail it leaves).
    let call = |rows: u64, s: u64, cond: u64, n: u64| -> (u64, u64, u64, u64) {
        // residual + normed input + fused qkv + attention output + fused gate/up + its product
        let mut act = m(m(rows, s), 6 * d + 3 * i) * f32b;
        if let Some(tile) = score_tile {
            // one query tile of scores: in the weights' dtype, then the f32 softmax and its
            // input, then the probabilities back in the weights' dtype
            let held = omnigen_models::ops::attention_scores_held(
                tile,
                rows as usize,
                heads as usize,
                s as usize,
                s as usize,
            );
            act = act.saturating_add(m(held, 2 * weight_bytes + 2 * f32b));
        }
        // The attention mask of `q` query rows: key ranges (two u32 per query) for the host
        // kernel; otherwise a dense bias in the weights' dtype, built through boolean
        // temporaries (about one f32 mask in all) while the call starts.
        let mask = |q: u64, building: bool| -> u64 {
            match (dense_mask, building) {
                (false, _) => m(rows, q) * 8,
                (true, true) => m(rows, m(q, s)) * (weight_bytes + f32b),
                (true, false) => m(rows, m(q, s)) * weight_bytes,
            }
        };
        if kv_cache.is_some() {
            // the cache keeps the mask rows of the time and image tokens for the later steps
            let kv = m(2 * layers, m(rows, m(cond, d))) * weight_bytes;
            (act, mask(s, true), kv, mask(n + 1, false))
        } else {
            (act, mask(s, true), 0, 0)
        }
    };
    let mut est = MemoryEstimate {
        fixed: FIXED_BYTES,
        ..Default::default()
    };
    // Branches run one after another; each leaves its cache (or, uncached, its mask) behind.
    let mut left_behind = 0u64;
    let mut largest = 0u64;
    for mi in batch.model_inputs() {
        let rows = mi.batch_size as u64;
        let s = mi.seq_len as u64;
        let cond = mi.text_len as u64;
        let n = mi.output_tokens() as u64;
        let (act, masks, kv_all, tail) = call(rows, s, cond, n);
        let offloaded = kv_cache == Some(KvPlacement::Host);
        let kv = if offloaded {
            streamed_share(kv_all, layers)
        } else {
            kv_all
        };
        est.kv_cache_host = est.kv_cache_host.saturating_add(kv_all - kv);
        let live = left_behind + act + masks + kv;
        if live > largest {
            largest = live;
            est.activations = act;
            est.masks = masks + left_behind;
            est.kv_cache = kv;
            let image_tokens: u64 = mi
                .images
                .iter()
                .map(|im| (im.height * im.width / 256) as u64)
                .sum::<u64>()
                / rows.max(1);
            let (a0, m0, k0, _) = call(
                rows,
                s - image_tokens.min(s),
                cond - image_tokens.min(cond),
                n,
            );
            est.input_image_share = (act + masks + kv).saturating_sub(a0 + m0 + k0);
        }
        // a cached branch keeps its cache (on the device unless offloaded) and mask tail
        let kept = if offloaded { 0 } else { kv };
        left_behind = left_behind.saturating_add(kept + tail);
    }
    let (h, w) = match vae_tile {
        Some(t) => (t.min(batch.height) as u64, t.min(batch.width) as u64),
        None => (batch.height as u64, batch.width as u64),
    };
    let c0 = vae.block_out_channels.first().copied().unwrap_or(128) as u64;
    // Full-resolution feature maps of the first block's width live at once, measured
    // (docs/robustness.md): 5.7 in a decode (the block input, its GroupNorm + SiLU output, the
    // convolution's output, the residual sum, the upsampled map), 7.0–7.3 in an encode (the
    // stride-2 convolution's four phase planes on top).
    let decode = m(6 * c0, m(h, w)) * f32b;
    // input images are encoded whole (no tiling) before the loop
    let encode = batch
        .model_inputs()
        .iter()
        .flat_map(|mi| mi.images.iter())
        .map(|im| m(7 * c0, (im.height * im.width) as u64) * f32b)
        .max()
        .unwrap_or(0);
    est.vae = decode;
    est.vae_encode = encode;
    est
}

/// What a request will cost, known before any weights are loaded: its memory estimate and its
/// sequence lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPlan {
    /// The memory guard's estimate beyond the loaded model.
    pub estimate: MemoryEstimate,
    /// Sequence length of each forward per step, per guidance branch (as
    /// [`GenerationStats::tokens_per_branch`](crate::GenerationStats::tokens_per_branch)).
    pub tokens_per_branch: Vec<usize>,
    /// Output size `(width, height)` in pixels.
    pub size: (usize, usize),
}

/// Plans requests against a model folder's tokenizer and configurations without loading its
/// weights: what a batch checks for every job before the (slow) model load. The estimate is the
/// one the pipeline's memory guard makes (without VAE tiling).
#[derive(Debug)]
pub struct RequestPlanner {
    processor: OmniGenProcessor,
    transformer: TransformerConfig,
    vae: VaeConfig,
    dtype: DType,
}

impl RequestPlanner {
    /// Reads the tokenizer and the configurations of the model folder `dir` (official or
    /// diffusers layout) for transformer weights of `dtype`.
    pub fn from_dir(dir: &Path, dtype: DType) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let processor = OmniGenProcessor::from_tokenizer_file(folder.tokenizer()?)?;
        let transformer = TransformerConfig::from_file(folder.transformer_config()?)?;
        let vae = VaeConfig::from_file(folder.vae_dir()?.join("config.json"))?;
        Ok(Self {
            processor,
            transformer,
            vae,
            dtype,
        })
    }

    /// Validates and processes `request` (its images are read) and estimates its memory on
    /// backend `B`; with `available` given, refuses it as the guard would
    /// ([`Error::OutOfMemory`] with its hint).
    pub fn plan<B: KernelBackend>(
        &self,
        request: &GenerationRequest,
        available: Option<u64>,
    ) -> Result<RequestPlan> {
        request.validate()?;
        let prompts: Vec<_> = request
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), request.num_images_per_prompt))
            .collect();
        let options = crate::pipeline::sampling::processor_options(request);
        let batch = self.processor.process(&prompts, &options)?;
        // f32 on the CPU backends whatever the weights' dtype
        let compute = omnigen_models::ops::compute_dtype::<B>(self.dtype);
        let est = estimate_on::<B>(
            &batch,
            &self.transformer,
            &self.vae,
            None,
            compute,
            kv_placement::<B>(request),
        );
        if let Some(available) = available {
            check(&est, available, &batch, request.max_input_image_size)?;
        }
        Ok(RequestPlan {
            estimate: est,
            tokens_per_branch: batch.model_inputs().iter().map(|m| m.seq_len).collect(),
            size: (batch.width, batch.height),
        })
    }
}

/// Where `request`'s kv cache is kept on backend `B`, `None` without one: in host memory when
/// `offload_kv_cache` is set on a device backend (the CPU backends hold everything there).
pub fn kv_placement<B: KernelBackend>(request: &GenerationRequest) -> Option<KvPlacement> {
    (request.kv_cache != KvCache::Off).then_some(if request.offload_kv_cache && !B::HOST_MEMORY {
        KvPlacement::Host
    } else {
        KvPlacement::Device
    })
}

/// The device's share of `total` bytes spread evenly over `layers` layers streamed from host
/// memory (`omnigen_models::transformer::offload`): the layer running and the one uploaded
/// ahead of it.
fn streamed_share(total: u64, layers: u64) -> u64 {
    total / layers.max(1) * layers.min(2)
}

/// How a loaded transformer holds its weights, for [`transformer_weight_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightMode {
    /// The decoder layers' linear weights quantized (`omnigen quantize`), else dense.
    pub quantized: Option<omnigen_core::QuantScheme>,
    /// Dtype the quantized codes are held in (`ops::code_dtype`): one byte, or `I32` on
    /// devices without byte integers (wgpu). Unused when `quantized` is `None`.
    pub code_dtype: burn::tensor::DType,
    /// Dtype of the dense linear weights and of the token and position tables (`--dtype`).
    pub weight_dtype: burn::tensor::DType,
    /// Dtype of everything else (norms, biases): the compute dtype, f32 on the CPU backends
    /// whatever `--dtype` is.
    pub compute_dtype: burn::tensor::DType,
    /// The decoder layers kept in host memory ([`LoadOptions::offload_layers`]), two of them on
    /// the device at a time.
    ///
    /// [`LoadOptions::offload_layers`]: omnigen_models::transformer::LoadOptions::offload_layers
    pub offload_layers: bool,
}

/// Bytes the transformer's parameters take in the memory it computes in (the device's, on a
/// GPU backend) once loaded in `mode`, from its config and the checkpoint's value count
/// `total_values` (parameters and buffers): the decoder layers' linear weights at one code
/// (`mode.code_dtype`) plus an f32 scale per output feature when quantized, the other linear
/// weights and the token and position tables in the weight dtype, the rest in the compute
/// dtype. With `mode.offload_layers`, two decoder layers of them: the others are in host
/// memory.
pub fn transformer_weight_bytes(
    cfg: &TransformerConfig,
    total_values: u64,
    mode: WeightMode,
) -> u64 {
    let (d, i, f) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.time_step_dim as u64,
    );
    let layers = cfg.num_hidden_layers as u64;
    let patch_out = (cfg.patch_size * cfg.patch_size * cfg.in_channels) as u64;
    // qkv, o, gate|up, down
    let decoder = layers * (3 * d * d + d * d + 2 * i * d + i * d);
    let decoder_rows = layers * (3 * d + d + 2 * i + d);
    // two timestep embedders, the final adaLN and projection
    let other = 2 * (f * d + d * d) + 2 * d * d + d * patch_out;
    // the token and position tables, held in the weight dtype (only their rows are cast)
    let g = cfg.pos_embed_max_size as u64;
    let tables = cfg.vocab_size as u64 * d + g * g * d;
    let rest = total_values.saturating_sub(decoder + other + tables);
    let w = mode.weight_dtype.size() as u64;
    let c = mode.compute_dtype.size() as u64;
    // the two RMSNorm scales of each layer
    let layer_norms = (layers * 2 * d).min(rest);
    let layers_bytes = match mode.quantized {
        Some(_) => decoder * mode.code_dtype.size() as u64 + 4 * decoder_rows,
        None => decoder * w,
    } + layer_norms * c;
    let resident_layers = if mode.offload_layers {
        streamed_share(layers_bytes, layers)
    } else {
        layers_bytes
    };
    resident_layers + (other + tables) * w + (rest - layer_norms) * c
}

/// Memory this process may still allocate, in bytes: the smaller of the system's
/// `MemAvailable` and the headroom of the container's limit (cgroup v2 `memory.max` less
/// `memory.current`, or cgroup v1 `memory.limit_in_bytes` less `memory.usage_in_bytes`), when
/// the system tells either.
pub fn available_memory() -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo_available(&t));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| cgroup_headroom(&t, |p| std::fs::read_to_string(p).ok()));
    match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The headroom of the tightest memory limit among this process's cgroup and its ancestors,
/// given the text of `/proc/self/cgroup` and a reader of files under `/sys/fs/cgroup`; `None`
/// without a limit (`max`, or v1's "unlimited" page-counter maximum).
pub fn cgroup_headroom(self_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let number = |path: &str| -> Option<u64> { read(path)?.trim().parse().ok() };
    let mut best: Option<u64> = None;
    let mut consider = |limit: Option<u64>, usage: Option<u64>| {
        // v1 reports "no limit" as the page counter's maximum (about 2^63)
        if let Some(limit) = limit.filter(|&l| l < 1 << 62) {
            let room = limit.saturating_sub(usage.unwrap_or(0));
            best = Some(best.map_or(room, |b| b.min(room)));
        }
    };
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_end_matches('/');
        // the cgroup and each ancestor up to the root of the hierarchy
        let mut dirs = vec![path.to_string()];
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            dirs.push(p.to_string());
        }
        if controllers.is_empty() {
            for d in &dirs {
                let base = format!("/sys/fs/cgroup{d}");
                consider(
                    number(&format!("{base}/memory.max")),
                    number(&format!("{base}/memory.current")),
                );
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            for d in &dirs {
                let base = format!("/sys/fs/cgroup/memory{d}");
                consider(
                    number(&format!("{base}/memory.limit_in_bytes")),
                    number(&format!("{base}/memory.usage_in_bytes")),
                );
            }
        }
    }
    best
}

/// Peak resident memory of this process (`VmHWM` of `/proc/self/status`), when the system tells.
pub fn peak_resident_memory() -> Option<u64> {
    status_field("VmHWM:")
}

/// Resident memory of this process now (`VmRSS`), when the system tells.
pub fn resident_memory() -> Option<u64> {
    status_field("VmRSS:")
}

/// Starts a new peak: the next [`peak_resident_memory`] reports the peak since this call
/// (Linux: `5` written to `/proc/self/clear_refs`); a no-op where the system cannot. Process-wide:
/// meant for a program that measures one generation at a time.
pub fn reset_peak_resident_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses `est` when it exceeds `available`, naming the option that would help most.
pub fn check(
    est: &MemoryEstimate,
    available: u64,
    batch: &ProcessedBatch,
    max_input_image_size: usize,
) -> Result<()> {
    let needed = est.peak();
    if needed <= available {
        return Ok(());
    }
    let joint = matches!(batch.inputs, GuidanceInputs::Joint(_));
    let text_tokens = batch
        .model_inputs()
        .iter()
        .map(|m| m.text_len)
        .max()
        .unwrap_or(0);
    let output_tokens = (batch.height / 16) * (batch.width / 16);
    let hint = if est.vae_encode > est.transformer_phase().max(est.vae) {
        format!(
            "lower max_input_image_size (now {max_input_image_size}): encoding the input images \
             at that size is the largest step"
        )
    } else if est.vae > est.transformer_phase() {
        "decode with a tiled VAE (PipelineBuilder::vae_tiling) or request a smaller output size"
            .to_string()
    } else if est.input_image_share * 2 > needed {
        // before the prompt's length: an input image's tokens count in the condition
        format!(
            "lower max_input_image_size (now {max_input_image_size}) so input images take fewer tokens"
        )
    } else if text_tokens > output_tokens.max(1024) {
        format!("shorten the prompt (its longest branch has {text_tokens} tokens)")
    } else if joint {
        "set separate_cfg_infer (one forward per guidance branch) or request a smaller output size"
            .to_string()
    } else {
        format!(
            "request a smaller output size than {}x{} (tokens grow with the area)",
            batch.width, batch.height
        )
    };
    Err(Error::OutOfMemory {
        needed_mib: needed >> 20,
        available_mib: available >> 20,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reader(files: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |p| map.get(p).cloned()
    }

    #[test]
    fn cgroup_v2_limit_and_usage_give_the_headroom() {
        let files = reader(&[
            ("/sys/fs/cgroup/app/job/memory.max", "max\n"),
            ("/sys/fs/cgroup/app/job/memory.current", "100\n"),
            ("/sys/fs/cgroup/app/memory.max", "4096\n"),
            ("/sys/fs/cgroup/app/memory.current", "1000\n"),
        ]);
        assert_eq!(cgroup_headroom("0::/app/job\n", &files), Some(3096));
        assert_eq!(cgroup_headroom("0::/\n", reader(&[])), None);
    }

    #[test]
    fn cgroup_v1_memory_controller_is_read_and_unlimited_ignored() {
        let files = reader(&[
            (
                "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                "2147483648",
            ),
            (
                "/sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes",
                "1073741824",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712",
            ),
        ]);
        let text = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n";
        assert_eq!(cgroup_headroom(text, &files), Some(1 << 30));
        // usage above the limit leaves nothing, it does not wrap
        let files = reader(&[
            ("/sys/fs/cgroup/memory/x/memory.limit_in_bytes", "10"),
            ("/sys/fs/cgroup/memory/x/memory.usage_in_bytes", "20"),
        ]);
        assert_eq!(cgroup_headroom("3:memory:/x", &files), Some(0));
    }

    #[test]
    fn meminfo_available_is_parsed_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:    1000 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(1_024_000));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB"), None);
        assert_eq!(
            parse_meminfo_available("MemAvailable: 99999999999999999999 kB"),
            None
        );
    }
}
