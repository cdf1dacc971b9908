//! `surgery-dev`: developer tools, not part of the product (`cargo build --release -p surgery-dev`).
//!
//! - `surgery-dev synth --shape NAME --out DIR [--seed N] [--force]`: a synthetic checkpoint of a
//!   named model shape (smollm2-135m, tinyllama-1.1b, llama3-8b), for benchmarks and tests;
//! - `surgery-dev bench-decompose CONVERSION-OPTIONS`: the decomposition floor of a conversion,
//!   printed as `{"decompose_seconds": S, "matrices": N}`; writes nothing;
//! - `surgery-dev bench-calibrate CONVERSION-OPTIONS`: the calibration pass alone, printed as
//!   `{"calibration_seconds": S, "cross_moments": N}`; writes nothing;
//! - `surgery-dev logits MODEL --ids 1,2,3 --out FILE`: the forward pass's logits for the ids (one
//!   window), as a safetensors file holding `logits` `[T, vocab]` F32 (for the interop tests).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use surgery_convert::cli::ConvertArgs;
use surgery_convert::commands::{calibration_passes, set_threads};
use surgery_convert::dev::{bench, logits, synth};
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
    /// Time the calibration stage of a conversion alone (its passes, refits, budgets and the
    /// cross moments a --share latent needs); takes the conversion's options; writes nothing.
    BenchCalibrate(Box<ConvertArgs>),
    /// Time one forward pass of the original model over a conversion's calibration tokens (its
    /// windows): the layers (what calibration runs), then the output head apart; takes the
    /// conversion's options (--fit act); writes nothing.
    BenchForward(Box<ConvertArgs>),
    /// Write the forward pass's logits for token ids (one window from position 0) to a
    /// safetensors file holding `logits` [T, vocab] F32.
    Logits(LogitsArgs),
}

/// Arguments of `logits`.
#[derive(Debug, Args)]
struct LogitsArgs {
    /// The checkpoint directory (dense or factored).
    model: PathBuf,

    /// Comma-separated token ids.
    #[arg(long, value_name = "LIST", value_delimiter = ',', required = true)]
    ids: Vec<u32>,

    /// The file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
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

    /// Keep only the first N layers of the shape (a truncated model: per-layer costs of a large
    /// shape measured on a small disk; everything else, the shards included, as the shape has it).
    #[arg(long, value_name = "N")]
    layers: Option<std::num::NonZeroUsize>,

    /// Replace an existing empty directory or surgery-convert output (as the product's --force;
    /// an earlier synthetic checkpoint is neither: remove it first).
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
            let mut shape = *args.shape;
            if let Some(n) = args.layers {
                shape.layers = n.get().min(shape.layers);
            }
            let out = synth::write(&shape, args.seed, &args.out, args.force)?;
            println!("{}", out.display());
        }
        DevCommand::BenchDecompose(args) => {
            set_threads(args.threads)?;
            let (seconds, matrices) =
                bench::decompose_floor(&(*args).resolve()?, calibration_passes)?;
            println!("{{\"decompose_seconds\": {seconds}, \"matrices\": {matrices}}}");
        }
        DevCommand::BenchCalibrate(args) => {
            set_threads(args.threads)?;
            let times = bench::PassTimes::default();
            let (seconds, cross) =
                bench::calibration_cost(&(*args).resolve()?, calibration_passes, &times)?;
            let passes: Vec<String> = times
                .passes()
                .iter()
                .map(|(name, s)| format!("\"{name}\": {s}"))
                .collect();
            println!(
                "{{\"calibration_seconds\": {seconds}, \"cross_moments\": {cross}, \"passes\": {{{}}}}}",
                passes.join(", ")
            );
        }
        DevCommand::BenchForward(args) => {
            set_threads(args.threads)?;
            let (layers, head, positions) = bench::forward_cost(&(*args).resolve()?)?;
            println!(
                "{{\"forward_seconds\": {layers}, \"head_seconds\": {head}, \"positions\": {positions}}}"
            );
        }
        DevCommand::Logits(args) => logits::write_logits(&args.model, &args.ids, &args.out)?,
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
