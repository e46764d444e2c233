//! `omnigen quantize --model DIR --to int8|fp8 --output DIR2`: a loadable copy of a model
//! folder with the transformer's decoder-layer linear weights quantized per output channel.

use std::path::PathBuf;

use clap::Args;
use omnigen::core::{QuantScheme, QuantizeOptions};

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
    /// Largest weights file: bytes, or with a unit (`500MB`, `2GB`, `4GiB`). Weights that do
    /// not fit in one are written as shards with an index, as Hugging Face does.
    #[arg(long, value_parser = parse_size, default_value = "5GB")]
    pub max_shard_size: u64,
}

/// A byte count: digits, optionally followed by a unit `B`, `KB`, `MB`, `GB` (powers of 1000)
/// or `KiB`, `MiB`, `GiB` (powers of 1024), case-insensitive; at least 1 byte.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 2GB or 500MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "`{other}` in `{s}` is not a unit (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    match number.checked_mul(scale) {
        Some(0) => Err(format!("`{s}`: a shard holds at least 1 byte")),
        Some(n) => Ok(n),
        None => Err(format!("`{s}` is too large")),
    }
}

fn parse_scheme(s: &str) -> Result<QuantScheme, String> {
    QuantScheme::parse(s).ok_or_else(|| format!("`{s}` is not int8 or fp8"))
}

/// Runs `omnigen quantize`.
pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let options = QuantizeOptions::new(args.to).max_shard_bytes(args.max_shard_size);
    let report = omnigen::core::quantize_folder(&args.model, &args.output, &options)?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "wrote {} ({}): {} tensors quantized, {} copied; transformer weights {:.1} MiB -> {:.1} MiB in {}",
        report.output.display(),
        args.to,
        report.quantized,
        report.copied,
        mib(report.bytes_in),
        mib(report.bytes_out),
        match report.shards {
            1 => "one file".to_string(),
            n => format!("{n} shards"),
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500 mb"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1kib"), Ok(1024));
        for bad in [
            "",
            "GB",
            "1.5GB",
            "0",
            "-1",
            "3TB",
            "99999999999999999999GB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
