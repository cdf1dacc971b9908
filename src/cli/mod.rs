//! The command line, and only the command line: clap's raw arguments ([`Cli`]), resolved once
//! into the validated [`crate::options`] types ([`Cli::resolve`]). Only `main` uses this module;
//! nothing in the library below imports it.

mod calibration;
mod convert;
mod parse;
mod subcommands;

pub use calibration::{ActWeightingArg, BosArg, CalibrationArgs, TextSizeArgs};
pub use convert::{parse_fit_item, ConvertArgs, EmitArg, FitArg};
pub use parse::{parse_size, parse_spec_item};
pub use subcommands::{EvalArgs, ExpandArgs, InspectArgs, SweepArgs, TextWindowArgs};

use crate::error::Result;
use crate::options::{ConvertOptions, EvalOptions, ExpandOptions, InspectOptions, SweepOptions};
use clap::{Parser, Subcommand};
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// Rewrite a Llama checkpoint's attention projections as low-rank PCA reconstructions.
///
/// Example: surgery-convert --in TinyLlama --out tinyllama-kv30 --shared-kv 0.3
///
/// SPEC is a variance threshold in (0, 1] (keep the fewest components whose cumulative explained
/// variance reaches it), rank:N (keep N components), or budget:F (keep the fraction F of the total
/// over all layers, e.g. of the K+V cache, ranks allocated across layers by their spectra).
#[derive(Debug, Parser)]
#[command(
    name = "surgery-convert",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A subcommand; without one, converts.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Conversion options.
    #[command(flatten)]
    pub convert: ConvertArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check an output directory: SHA256SUMS, every safetensors header, and the shard index.
    Verify {
        /// The directory to check.
        dir: PathBuf,
    },
    /// Multiply a factored checkpoint (--emit factored) back into a standard dense one: original
    /// tensor names, dtypes, shards and config, loadable by any Llama runtime.
    Expand(ExpandArgs),
    /// Perplexity of a checkpoint (standard or factored) on a text file (default: the built-in
    /// held-out sample a conversion's quality check scores), computed by this tool's own Llama
    /// forward pass; prints a JSON report on stdout.
    ///
    /// The whole file is tokenized with the model's tokenizer.json (no special tokens); --tokens
    /// tokens from --offset on are split into windows of --ctx tokens (the remainder dropped), each
    /// evaluated on its own from position 0 without BOS, scoring every next-token prediction.
    Eval(EvalArgs),
    /// Perplexity over a grid of conversions (SPEC lists x fits), computed in memory; writes
    /// sweep.json, sweep.md and sweep.svg into --out.
    ///
    /// For every combination of the --shared-kv and --q SPEC lists and the --fit list, the model is
    /// evaluated as eval does, layer by layer, with each layer's projections replaced by their
    /// fitted reconstructions; the unmodified model is scored once as the base. No checkpoint is
    /// written; sweep.svg plots perplexity against K/V cache values per token.
    ///
    /// Example: surgery-convert sweep --in MODEL --text wiki.txt --shared-kv 0.9,0.5,budget:0.25
    /// --fit pca,svd --out sweep-dir
    Sweep(Box<SweepArgs>),
    /// Components K, V and the stacked K/V of each layer need for 50%, 90% and 99% of their
    /// variance (weight-only pca fit), separately and with one shared basis.
    ///
    /// Prints a table on stderr (or JSON on stdout with --json); --svg draws the cumulative
    /// explained-variance curves, one panel per layer.
    Inspect(InspectArgs),
}

/// What to run, resolved.
#[derive(Debug)]
pub enum Task {
    /// A conversion.
    Convert(ConvertOptions),
    /// `verify DIR`.
    Verify(PathBuf),
    /// `expand`.
    Expand(ExpandOptions),
    /// `eval`.
    Eval(EvalOptions),
    /// `sweep`.
    Sweep(SweepOptions),
    /// `inspect`.
    Inspect(InspectOptions),
}

/// The resolved command line: the task, and the size of the worker pool (`--threads`).
#[derive(Debug)]
pub struct Invocation {
    /// What to run.
    pub task: Task,
    /// `--threads`, where the command has it and it was given.
    pub threads: Option<NonZeroUsize>,
}

impl Cli {
    /// Validates the arguments of the command given.
    pub fn resolve(self) -> Result<Invocation> {
        let (task, threads) = match self.command {
            Some(Command::Verify { dir }) => (Task::Verify(dir), None),
            Some(Command::Expand(args)) => (Task::Expand(args.resolve()), None),
            Some(Command::Eval(args)) => {
                let threads = args.threads;
                (Task::Eval(args.resolve()?), threads)
            }
            Some(Command::Sweep(args)) => {
                let threads = args.threads;
                (Task::Sweep(args.resolve()?), threads)
            }
            Some(Command::Inspect(args)) => {
                let threads = args.threads;
                (Task::Inspect(args.resolve()?), threads)
            }
            None => {
                let threads = self.convert.threads;
                (Task::Convert(self.convert.resolve()?), threads)
            }
        };
        Ok(Invocation { task, threads })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::spec::Spec;

    #[test]
    fn separate_expands_and_nothing_is_refused() {
        let cli = Cli::try_parse_from([
            "surgery-convert",
            "--in",
            "a",
            "--out",
            "b",
            "--separate",
            "0.9",
        ])
        .unwrap();
        let o = cli.convert.resolve().unwrap();
        assert_eq!(o.surgery.q, Some(Spec::Threshold(0.9)));
        assert_eq!(o.surgery.v, Some(Spec::Threshold(0.9)));
        let cli = Cli::try_parse_from(["surgery-convert", "--in", "a", "--out", "b"]).unwrap();
        let err = cli.convert.resolve().unwrap_err();
        assert!(
            matches!(&err, crate::error::Error::Usage { option, .. } if option == "--shared-kv"),
            "{err:?}"
        );
        assert!(err.to_string().contains("no surgery requested"));
        assert!(Cli::try_parse_from([
            "surgery-convert",
            "--in",
            "a",
            "--out",
            "b",
            "--shared-kv",
            "0.3",
            "--k",
            "0.5"
        ])
        .is_err());
    }
}
