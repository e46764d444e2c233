//! `omnigen`: the command-line face of omnigen-rs.
//!
//! ```text
//! omnigen generate --model tests/fixtures/A/model \
//!     --prompt "a red cat sitting on a blue mat" --height 64 --width 64 --steps 4 \
//!     --seed 0 --output cat.png
//! omnigen generate --model DIR \
//!     --prompt "<img><|image_1|></img> make the cat green" --image cat.png \
//!     --use-input-image-size-as-output --output green.png
//! omnigen inspect DIR
//! omnigen quantize --model DIR --to int8 --output DIR_INT8
//! omnigen serve --model DIR --port 8080
//! omnigen batch manifest.jsonl --model DIR --out results/
//! ```
//! Every error ends the program with a message whose first line starts with `error: ` and exit
//! status 1; the PNG (and the latents file) are written atomically, so a failure never leaves a
//! partial file.
#![deny(missing_docs)]

mod batch;
mod flags;
mod generate;
mod inspect;
mod latents;
mod quantize;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// OmniGen unified image generation: text-to-image, editing, subject-driven generation and
/// visual conditions with one model.
#[derive(Parser, Debug)]
#[command(name = "omnigen", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate an image from a prompt of text and input images.
    Generate(Box<generate::GenerateArgs>),
    /// Show a model folder's layout, configuration, parameter count, dtypes and weight memory.
    Inspect(inspect::InspectArgs),
    /// Serve the OpenAI images API, a jobs API and a web page over one loaded model.
    Serve(Box<serve::ServeArgs>),
    /// Run a manifest of jobs (JSON Lines or CSV) over one loaded model: sweeps as grids,
    /// resumable, with results.jsonl and an HTML report.
    Batch(Box<batch::BatchArgs>),
    /// Write a copy of a model folder with the transformer's linear weights quantized (int8
    /// or fp8 e4m3, per output channel).
    Quantize(quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` come through here too: they print to stdout and succeed.
            let failed = e.use_stderr();
            let _ = e.print();
            return if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Serve(args) => serve::run(*args),
        Command::Batch(args) => batch::run(*args),
        Command::Quantize(args) => quantize::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message already
/// ends with (the library's errors print their source themselves).
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::other("is a directory, not a regular file");
        let e = anyhow::Error::new(omnigen::Error::io("read", "/tmp", io)).context("--latents");
        assert_eq!(
            message(&e),
            "--latents: cannot read /tmp: is a directory, not a regular file"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(message(&e), "outer: inner");
    }
}
