//! `omnigen inspect DIR`: what a model folder holds, read from its configs and safetensors
//! headers only (no tensor is loaded, so it is instant even for the 15.5 GB checkpoint).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use omnigen::core::{
    CheckpointLayout, ModelFolder, RopeScaling, TransformerConfig, TransformerWeights, VaeConfig,
    WeightFiles, WeightSource,
};

/// The arguments of `omnigen inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model folder, official (`config.json`, `model.safetensors`, `tokenizer.json`, `vae/`) or
    /// diffusers (`transformer/`, `tokenizer/`, `vae/`) layout.
    pub dir: PathBuf,
}

/// Runs `omnigen inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let report = Report::read(&args.dir)?;
    print!("{}", report.render());
    Ok(())
}

/// What the safetensors headers of one checkpoint part say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightCensus {
    /// The files the tensors are in (several for a sharded checkpoint).
    pub files: Vec<PathBuf>,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of stored values (parameters and buffers).
    pub values: u64,
    /// Bytes the values take as stored.
    pub stored_bytes: u64,
    /// Tensor count per stored dtype (`F32`, `BF16`, ...).
    pub dtypes: BTreeMap<String, usize>,
}

impl WeightCensus {
    /// Counts the tensors of `src` from its headers.
    pub fn of(src: &WeightSource) -> Self {
        let keys = src.keys();
        let mut files: Vec<PathBuf> = keys.iter().map(|k| src.path_of(k).to_path_buf()).collect();
        files.sort();
        files.dedup();
        let mut census = Self {
            files,
            tensors: keys.len(),
            values: 0,
            stored_bytes: 0,
            dtypes: BTreeMap::new(),
        };
        for key in keys {
            let n: u64 = src
                .shape(key)
                .map_or(0, |s| s.iter().map(|&d| d as u64).product());
            census.values += n;
            let dtype = src.stored_dtype(key);
            census.stored_bytes += dtype.map_or(0, |d| n * d.bitsize() as u64 / 8);
            *census
                .dtypes
                .entry(dtype.map_or("?".to_string(), |d| d.to_string()))
                .or_default() += 1;
        }
        census
    }
}

/// Everything `omnigen inspect` prints.
#[derive(Debug)]
pub struct Report {
    /// Where the parts are.
    pub folder: ModelFolder,
    /// The transformer's weights files.
    pub weight_files: WeightFiles,
    /// The tokenizer, when the folder has one.
    pub tokenizer: Option<PathBuf>,
    /// diffusers' `model_index.json`, when present.
    pub model_index: Option<PathBuf>,
    /// The transformer checkpoint's key naming.
    pub key_layout: CheckpointLayout,
    /// The transformer's configuration.
    pub transformer: TransformerConfig,
    /// The transformer's tensors.
    pub transformer_weights: WeightCensus,
    /// The VAE's configuration and tensors, when the folder has a VAE.
    pub vae: Option<(VaeConfig, WeightCensus)>,
}

impl Report {
    /// Reads the configs and safetensors headers of the model folder `dir`.
    pub fn read(dir: &Path) -> omnigen::Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let transformer = TransformerConfig::from_file(folder.transformer_config()?)?;
        let weight_files = folder.transformer_weights()?;
        let weights = TransformerWeights::new(WeightSource::open_files(&weight_files)?)?;
        // A folder without a VAE or tokenizer is still worth a report; what it lacks is said.
        let vae = match (folder.vae_config(), folder.vae_weights()) {
            (Ok(config), Ok(files)) => Some((
                VaeConfig::from_file(config)?,
                WeightCensus::of(&WeightSource::open_files(&files)?),
            )),
            _ => None,
        };
        let model_index = Some(dir.join("model_index.json")).filter(|p| p.is_file());
        Ok(Self {
            weight_files,
            tokenizer: folder.tokenizer().ok(),
            model_index,
            key_layout: weights.layout(),
            transformer_weights: WeightCensus::of(weights.source()),
            transformer,
            vae,
            folder,
        })
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.render_into(&mut out);
        out
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(self.folder.root())
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn render_into(&self, out: &mut String) -> std::fmt::Result {
        let f = &self.folder;
        let t = &self.transformer;
        let tw = &self.transformer_weights;
        let kind = f.layout();
        let keys = match self.key_layout {
            CheckpointLayout::Official => "official",
            CheckpointLayout::Diffusers => "diffusers",
        };
        writeln!(out, "model folder  {}", f.root().display())?;
        writeln!(out, "layout        {kind} (transformer keys: {keys} names)")?;
        writeln!(out)?;
        writeln!(out, "files")?;
        if let Some(index) = &self.model_index {
            writeln!(out, "  index       {}", self.rel(index))?;
        }
        writeln!(
            out,
            "  config      {}",
            self.rel(&f.transformer_dir().join("config.json"))
        )?;
        let files: Vec<String> = tw.files.iter().map(|p| self.rel(p)).collect();
        if let Some(index) = &self.weight_files.index {
            writeln!(
                out,
                "  weights     {} ({} shards: {})",
                self.rel(index),
                files.len(),
                files.join(", ")
            )?;
        } else {
            writeln!(out, "  weights     {}", files.join(", "))?;
        }
        match &self.tokenizer {
            Some(p) => writeln!(out, "  tokenizer   {}", self.rel(p))?,
            None => writeln!(out, "  tokenizer   missing (generate needs tokenizer.json)")?,
        }
        match &self.vae {
            Some((_, census)) => {
                let files: Vec<String> = census.files.iter().map(|p| self.rel(p)).collect();
                writeln!(
                    out,
                    "  vae         {}, {}",
                    f.vae_config().map_or_else(|_| "?".into(), |p| self.rel(&p)),
                    files.join(", ")
                )?;
            }
            _ => writeln!(
                out,
                "  vae         missing (generate needs vae/config.json and vae/diffusion_pytorch_model.safetensors)"
            )?,
        }
        writeln!(out)?;

        writeln!(out, "transformer config")?;
        writeln!(
            out,
            "  hidden_size {}, intermediate_size {}, layers {}, heads {} (key/value heads {}, head dim {})",
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.head_dim()
        )?;
        writeln!(
            out,
            "  vocab_size {}, rms_norm_eps {:e}, rope_theta {}",
            t.vocab_size, t.rms_norm_eps, t.rope_theta
        )?;
        let rope = match &t.rope_scaling {
            Some(RopeScaling::LongRope { .. }) => "LongRoPE",
            None => "none",
        };
        writeln!(
            out,
            "  positions {} (pre-trained {}), rope scaling {rope}",
            t.max_position_embeddings, t.original_max_position_embeddings
        )?;
        writeln!(
            out,
            "  patch_size {}, in_channels {}, pos_embed_max_size {}, time_step_dim {}",
            t.patch_size, t.in_channels, t.pos_embed_max_size, t.time_step_dim
        )?;
        if let Some((v, _)) = &self.vae {
            writeln!(out, "vae config")?;
            writeln!(
                out,
                "  block_out_channels {:?}, layers_per_block {}, latent_channels {}, norm groups {}",
                v.block_out_channels, v.layers_per_block, v.latent_channels, v.norm_num_groups
            )?;
            let shift = v.shift_factor.map_or("none".to_string(), |s| s.to_string());
            writeln!(
                out,
                "  scaling_factor {}, shift_factor {shift}, downsampling x{}",
                v.scaling_factor,
                v.downsample_factor()
            )?;
        }
        writeln!(out)?;

        writeln!(out, "parameters (safetensors headers)")?;
        writeln!(
            out,
            "  transformer {:>15} in {} tensors (config: {} learned + {} pos_embed buffer)",
            grouped(tw.values),
            tw.tensors,
            grouped(t.num_parameters()),
            grouped(t.pos_embed_len())
        )?;
        if tw.values != t.num_stored_values() {
            writeln!(
                out,
                "  warning: the config implies {} stored values",
                grouped(t.num_stored_values())
            )?;
        }
        let vae_values = self.vae.as_ref().map_or(0, |(_, c)| c.values);
        if let Some((_, c)) = &self.vae {
            writeln!(
                out,
                "  vae         {:>15} in {} tensors",
                grouped(c.values),
                c.tensors
            )?;
        }
        writeln!(out, "  total       {:>15}", grouped(tw.values + vae_values))?;
        writeln!(out)?;

        writeln!(out, "stored dtypes")?;
        let census = |c: &WeightCensus| {
            c.dtypes
                .iter()
                .map(|(d, n)| format!("{d} x {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            out,
            "  transformer {} ({} on disk)",
            census(tw),
            bytes(tw.stored_bytes)
        )?;
        if let Some((_, c)) = &self.vae {
            writeln!(
                out,
                "  vae         {} ({} on disk)",
                census(c),
                bytes(c.stored_bytes)
            )?;
        }
        writeln!(out)?;

        writeln!(
            out,
            "estimated weight memory (activations, kv cache and tokenizer come on top)"
        )?;
        writeln!(
            out,
            "  {:<6} {:>12} {:>12} {:>12}",
            "dtype", "transformer", "vae", "both"
        )?;
        for (name, width) in [("f32", 4u64), ("bf16", 2), ("f16", 2)] {
            writeln!(
                out,
                "  {:<6} {:>12} {:>12} {:>12}",
                name,
                bytes(tw.values * width),
                bytes(vae_values * width),
                bytes((tw.values + vae_values) * width)
            )?;
        }
        self.render_modes(out)?;
        if self.vae.is_some() {
            // The pipeline loads the VAE in f32 unless --vae-dtype bf16.
            writeln!(
                out,
                "  generate --dtype keeps the vae in f32: {} with f32, {} with bf16 or f16 ({} with --vae-dtype bf16 too)",
                bytes(tw.values * 4 + vae_values * 4),
                bytes(tw.values * 2 + vae_values * 4),
                bytes(tw.values * 2 + vae_values * 2)
            )?;
        }
        Ok(())
    }
}

impl Report {
    /// The transformer's loaded weight bytes per loading mode (the memory guard's model): on
    /// the CPU backends bf16 / f16 weights compute in f32, so only the linear weights are
    /// narrow; `omnigen quantize` folders hold the decoder layers' linears in one byte.
    fn render_modes(&self, out: &mut String) -> std::fmt::Result {
        use burn::tensor::DType;
        use omnigen::core::QuantScheme;
        use omnigen::pipeline::memory::{transformer_weight_bytes, WeightMode};
        let values = self.transformer_weights.values;
        writeln!(out, "  transformer by loading mode:")?;
        let dense = |weight_dtype, compute_dtype| WeightMode {
            quantized: None,
            code_dtype: DType::I8,
            weight_dtype,
            compute_dtype,
            offload_layers: false,
        };
        // One byte per code (CPU backends, CUDA); wgpu holds each in four.
        let quant = |weight_dtype, compute_dtype| WeightMode {
            quantized: Some(QuantScheme::Int8),
            code_dtype: DType::I8,
            weight_dtype,
            compute_dtype,
            offload_layers: false,
        };
        let offloaded = |mode: WeightMode| WeightMode {
            offload_layers: true,
            ..mode
        };
        for (name, mode) in [
            ("f32", dense(DType::F32, DType::F32)),
            (
                "bf16/f16, CPU (f32 compute)",
                dense(DType::BF16, DType::F32),
            ),
            ("bf16/f16, GPU", dense(DType::BF16, DType::BF16)),
            ("int8/fp8, CPU --dtype bf16", quant(DType::BF16, DType::F32)),
            (
                "int8/fp8, GPU --dtype bf16",
                quant(DType::BF16, DType::BF16),
            ),
            (
                "bf16/f16, GPU --offload model",
                offloaded(dense(DType::BF16, DType::BF16)),
            ),
            (
                "int8/fp8, GPU --offload model",
                offloaded(quant(DType::BF16, DType::BF16)),
            ),
        ] {
            let b = transformer_weight_bytes(&self.transformer, values, mode);
            writeln!(out, "    {name:<30} {:>12}", bytes(b))?;
        }
        writeln!(
            out,
            "    (--offload model: the device holds two decoder layers, host memory all of them)"
        )?;
        Ok(())
    }
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count in the largest binary unit that keeps it at or above 1.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omnigen::core::{Error, FolderLayout};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/A")
    }

    #[test]
    fn numbers_are_grouped_and_sized() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(3_875_318_800), "3,875,318,800");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(15_501_275_200), "14.44 GiB");
    }

    #[test]
    fn official_folder() {
        let dir = fixtures().join("model");
        let report = Report::read(&dir).unwrap();
        assert_eq!(report.folder.layout(), FolderLayout::Official);
        assert_eq!(report.folder.transformer_dir(), dir);
        assert_eq!(report.tokenizer, Some(dir.join("tokenizer.json")));
        assert_eq!(report.key_layout, CheckpointLayout::Official);
        let tw = &report.transformer_weights;
        assert_eq!(tw.files, [dir.join("model.safetensors")]);
        // the checkpoint stores the learned parameters plus the position table, nothing else
        assert_eq!(tw.values, report.transformer.num_stored_values());
        assert_eq!(tw.stored_bytes, tw.values * 4);
        assert_eq!(tw.dtypes, BTreeMap::from([("F32".to_string(), tw.tensors)]));
        let (vae, census) = report.vae.as_ref().unwrap();
        assert_eq!(vae.block_out_channels, [16, 32, 32, 32]);
        assert!(census.values > 0 && census.dtypes.contains_key("F32"));

        let text = report.render();
        for want in [
            "layout        official (transformer keys: official names)",
            "config      config.json",
            "weights     model.safetensors",
            "tokenizer   tokenizer.json",
            "vae         vae/config.json, vae/diffusion_pytorch_model.safetensors",
            "hidden_size 48, intermediate_size 128, layers 2, heads 3",
            "rope scaling LongRoPE",
            "F32 x 31",
            "estimated weight memory",
            "bf16/f16, GPU --offload model",
            "the device holds two decoder layers",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("warning"), "{text}");
        let f32_row = text
            .lines()
            .find(|l| l.trim_start().starts_with("f32 "))
            .unwrap();
        assert!(f32_row.contains(&bytes(tw.values * 4)), "{f32_row}");
        let bf16_row = text
            .lines()
            .find(|l| l.trim_start().starts_with("bf16 "))
            .unwrap();
        assert!(bf16_row.contains(&bytes(tw.values * 2)), "{bf16_row}");
    }

    #[test]
    fn diffusers_folder_counts_the_same_parameters() {
        let dir = fixtures().join("model_diffusers");
        let report = Report::read(&dir).unwrap();
        assert_eq!(report.folder.layout(), FolderLayout::Diffusers);
        assert_eq!(report.folder.transformer_dir(), dir.join("transformer"));
        assert_eq!(
            report.tokenizer,
            Some(dir.join("tokenizer").join("tokenizer.json"))
        );
        assert!(report.vae.is_some());
        assert_eq!(report.model_index, Some(dir.join("model_index.json")));
        let official = Report::read(&fixtures().join("model")).unwrap();
        assert_eq!(report.key_layout, CheckpointLayout::Diffusers);
        assert_eq!(report.transformer, official.transformer);
        let tw = &report.transformer_weights;
        assert_eq!(tw.values, official.transformer_weights.values);
        assert_eq!(tw.stored_bytes, tw.values * 2);
        assert_eq!(tw.dtypes.keys().collect::<Vec<_>>(), ["BF16"]);
        let text = report.render();
        assert!(text.contains("layout        diffusers"), "{text}");
        assert!(text.contains("weights     transformer/diffusion_pytorch_model.safetensors"));
        assert!(text.contains("tokenizer   tokenizer/tokenizer.json"));
        assert!(text.contains("index       model_index.json"), "{text}");
        // the committed fixture links the official VAE
        assert!(
            text.contains("BF16 x 35") && text.contains("F32 x 180"),
            "{text}"
        );
    }

    #[test]
    fn a_transformer_folder_given_directly_is_diffusers() {
        let dir = fixtures().join("model_diffusers/transformer");
        let report = Report::read(&dir).unwrap();
        assert_eq!(report.folder.layout(), FolderLayout::DiffusersTransformer);
        assert_eq!(report.folder.transformer_dir(), dir);
        assert_eq!(report.tokenizer, None);
        assert!(report.vae.is_none());
        let text = report.render();
        assert!(text.contains("tokenizer   missing"), "{text}");
        assert!(text.contains("vae         missing"), "{text}");
        assert!(!text.contains("keeps the vae in f32"), "{text}");
    }

    #[test]
    fn sharded_weights_are_listed_shard_by_shard() {
        let src = fixtures().join("model");
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        // two shards of the tiny checkpoint: a few tensors each side of the split
        let whole = WeightSource::open(src.join("model.safetensors")).unwrap();
        let keys = whole.keys();
        let (a, b) = keys.split_at(keys.len() / 2);
        let mut map = Vec::new();
        for (shard, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            write_shard(&whole, part, &dir.path().join(shard));
            for k in part {
                map.push(format!("\"{k}\": \"{shard}\""));
            }
        }
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            format!("{{\"weight_map\": {{{}}}}}", map.join(", ")),
        )
        .unwrap();
        let report = Report::read(dir.path()).unwrap();
        assert_eq!(report.transformer_weights.files.len(), 2);
        assert_eq!(
            report.transformer_weights.values,
            WeightCensus::of(&whole).values
        );
        let text = report.render();
        assert!(
            text.contains("weights     model.safetensors.index.json (2 shards: model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)"),
            "{text}"
        );
        assert!(text.contains("vae         missing"), "{text}");
    }

    fn write_shard(src: &WeightSource, keys: &[&str], path: &Path) {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = keys
            .iter()
            .map(|k| {
                let shape = src.shape(k).unwrap();
                let values = src.read_f32(k, &shape).unwrap();
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (k.to_string(), shape, bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(k, s, b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap();
                (k.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn folders_that_hold_no_model_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = Report::read(dir.path()).unwrap_err();
        assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("config.json"), "{msg}");
        let err = Report::read(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("no such directory"), "{err}");
        // weights without a config: the config file is named
        std::fs::copy(
            fixtures().join("model/model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let err = Report::read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
