//! `omnigen quantize --model DIR --to int8|fp8 --output DIR2`: a loadable copy of a model
//! folder with the transformer's decoder-layer linear weights quantized per output channel.

use std::path::PathBuf;

use clap::Args;
use omnigen::core::QuantScheme;

/// The arguments of `omnigen quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model folder to read (official or diffusers layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Quantization: `int8` (symmetric, per output channel) or `fp8` (e4m3, per-channel scale).
    #[arg(long, value_parser = parse_scheme)]
    pub to: QuantScheme,
    /// Folder to write; must not exist (it is written beside, then renamed into place).
    #[arg(long)]
    pub output: PathBuf,
}

fn parse_scheme(s: &str) -> Result<QuantScheme, String> {
    QuantScheme::parse(s).ok_or_else(|| format!("`{s}` is not int8 or fp8"))
}

/// Runs `omnigen quantize`.
pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let report = omnigen::core::quantize_folder(&args.model, &args.output, args.to)?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "wrote {} ({}): {} tensors quantized, {} copied; transformer weights {:.1} MiB -> {:.1} MiB",
        report.output.display(),
        args.to,
        report.quantized,
        report.copied,
        mib(report.bytes_in),
        mib(report.bytes_out)
    );
    Ok(())
}
