//! `surgery-dev`: developer tools, not part of the product (`cargo build --release -p surgery-dev`).
//!
//! - `surgery-dev synth --shape NAME --out DIR [--seed N] [--force]`: a synthetic checkpoint of a
//!   named model shape (smollm2-135m, tinyllama-1.1b, llama3-8b), for benchmarks and tests;
//! - `surgery-dev bench-decompose CONVERSION-OPTIONS`: the decomposition floor of a conversion,
//!   printed as `{"decompose_seconds": S, "matrices": N}`; writes nothing.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use surgery_convert::cli::ConvertArgs;
use surgery_convert::commands::set_threads;
use surgery_convert::dev::{bench, synth};
use surgery_convert::error::Result;

/// Developer tools of surgery-convert.
#[derive(Debug, Parser)]
#[command(name = "surgery-dev")]
struct Dev {
    #[command(subcommand)]
    command: DevCommand,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Write a synthetic checkpoint of a named model shape: exact tensor names, shapes, BF16
    /// dtype, shards and config.json, deterministic values from --seed, attention projections
    /// with decaying spectra.
    Synth(SynthArgs),
    /// Time the fits of a conversion alone, every matrix decoded into memory first (the
    /// benchmark's decomposition floor); takes the conversion's options; writes nothing.
    BenchDecompose(Box<ConvertArgs>),
}

/// Arguments of `synth`.
#[derive(Debug, Args)]
struct SynthArgs {
    /// The model shape: smollm2-135m, tinyllama-1.1b or llama3-8b.
    #[arg(long, value_name = "NAME", value_parser = parse_shape)]
    shape: &'static synth::ModelShape,

    /// Output directory (created atomically).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Seed of the pseudo-random values.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

fn parse_shape(s: &str) -> std::result::Result<&'static synth::ModelShape, String> {
    synth::shape(s).ok_or_else(|| {
        let names: Vec<&str> = synth::SHAPES.iter().map(|s| s.name).collect();
        format!("unknown shape `{s}`; known: {}", names.join(", "))
    })
}

fn run(dev: Dev) -> Result<()> {
    match dev.command {
        DevCommand::Synth(args) => {
            let out = synth::write(args.shape, args.seed, &args.out, args.force)?;
            println!("{}", out.display());
        }
        DevCommand::BenchDecompose(args) => {
            set_threads(args.threads)?;
            let (seconds, matrices) = bench::decompose_floor(&(*args).resolve()?)?;
            println!("{{\"decompose_seconds\": {seconds}, \"matrices\": {matrices}}}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let dev = Dev::parse();
    match run(dev) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("surgery-dev: error: {}", e.to_line());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
