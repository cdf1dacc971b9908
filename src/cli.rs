//! The command line: clap's raw arguments, and their resolution into validated options that the
//! rest of the program uses without re-checking.

use crate::decompose::Fit;
use crate::error::{Error, Result};
use crate::execute::ActWeighting;
use crate::plan::{Emit, Surgery};
use crate::spec::Spec;
use clap::{Args, Parser, Subcommand, ValueEnum};
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
    /// Perplexity of a checkpoint (standard or factored) on a text file, computed by this tool's
    /// own Llama forward pass; prints a JSON report on stdout.
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
    Sweep(SweepArgs),
    /// Components K, V and the stacked K/V of each layer need for 50%, 90% and 99% of their
    /// variance (weight-only pca fit), separately and with one shared basis.
    ///
    /// Prints a table on stderr (or JSON on stdout with --json); --svg draws the cumulative
    /// explained-variance curves, one panel per layer.
    Inspect(InspectArgs),
    /// Write a synthetic checkpoint of a named model shape (for benchmarks): exact tensor names,
    /// shapes, BF16 dtype, shards and config.json, deterministic values from --seed, attention
    /// projections with decaying spectra. Shapes: smollm2-135m, tinyllama-1.1b, llama3-8b.
    #[command(hide = true)]
    Synth(SynthArgs),
}

/// Arguments of the hidden `synth` command.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// The model shape: smollm2-135m, tinyllama-1.1b or llama3-8b.
    #[arg(long, value_name = "NAME", value_parser = parse_shape)]
    pub shape: &'static crate::synth::ModelShape,

    /// Output directory (created atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Seed of the pseudo-random values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
}

fn parse_shape(s: &str) -> std::result::Result<&'static crate::synth::ModelShape, String> {
    crate::synth::shape(s).ok_or_else(|| {
        let names: Vec<&str> = crate::synth::SHAPES.iter().map(|s| s.name).collect();
        format!("unknown shape `{s}`; known: {}", names.join(", "))
    })
}

/// Arguments of `sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Input checkpoint: a local directory, or a Hugging Face repo id resolved from the local cache.
    #[arg(long = "in", value_name = "MODEL")]
    pub input: String,

    /// Hub revision (branch, tag or commit) when --in is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// UTF-8 text file to score (tokenized whole, without special tokens, as for eval).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,

    /// Tokens to evaluate, from --offset on (rounded down to whole --ctx windows).
    #[arg(long, value_name = "N", default_value = "4096")]
    pub tokens: NonZeroUsize,

    /// Window length in tokens; windows do not overlap and do not see each other.
    #[arg(long, value_name = "N", default_value = "512")]
    pub ctx: NonZeroUsize,

    /// Tokens of the text to skip before the first window.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub offset: usize,

    /// Comma-separated SPECs for the shared K/V fit, one configuration each (e.g. 0.9,0.5,budget:0.25).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_spec_item)]
    pub shared_kv: Vec<Spec>,

    /// Comma-separated SPECs for q_proj's own fit, combined with every --shared-kv SPEC.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_spec_item)]
    pub q: Vec<Spec>,

    /// Comma-separated fits, each combined with every SPEC: pca, seed, svd, act (act needs
    /// --calibrate).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fit_item, default_value = "pca")]
    pub fit: Vec<FitArg>,

    /// Calibration for the act fits (the pass runs once per sweep).
    #[command(flatten)]
    pub calibration: CalibrationArgs,

    /// Output directory for sweep.json, sweep.md and sweep.svg (created atomically; must not exist
    /// unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Replace an existing --out directory (only once the new one is complete).
    #[arg(long)]
    pub force: bool,

    /// Print nothing on success.
    #[arg(long, short)]
    pub quiet: bool,

    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The checkpoint: a local directory, or a repo id resolved from the Hugging Face cache.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Draw the cumulative explained-variance curves (one panel per layer) into this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// Print the counts as JSON on stdout instead of the table on stderr.
    #[arg(long)]
    pub json: bool,

    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// One entry of a comma-separated SPEC list.
pub fn parse_spec_item(s: &str) -> std::result::Result<Spec, String> {
    if s.trim().is_empty() {
        return Err(
            "an empty entry: give comma-separated SPECs, e.g. 0.9,0.5,budget:0.25".to_string(),
        );
    }
    s.parse()
}

/// One entry of a comma-separated fit list.
pub fn parse_fit_item(s: &str) -> std::result::Result<FitArg, String> {
    match s.trim() {
        "pca" => Ok(FitArg::Pca),
        "seed" => Ok(FitArg::Seed),
        "svd" => Ok(FitArg::Svd),
        "act" => Ok(FitArg::Act),
        "" => Err("an empty entry: give comma-separated fits, e.g. pca,svd".to_string()),
        other => Err(format!("unknown fit `{other}`: use pca, seed, svd or act")),
    }
}

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The checkpoint: a local directory, or a repo id resolved from the Hugging Face cache.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// UTF-8 text file to score.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,

    /// Tokens to evaluate, from --offset on (rounded down to whole --ctx windows).
    #[arg(long, value_name = "N", default_value = "4096")]
    pub tokens: NonZeroUsize,

    /// Window length in tokens; windows do not overlap and do not see each other.
    #[arg(long, value_name = "N", default_value = "512")]
    pub ctx: NonZeroUsize,

    /// Tokens of the text to skip before the first window.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub offset: usize,

    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// Arguments of `expand`.
#[derive(Debug, Args)]
pub struct ExpandArgs {
    /// The factored checkpoint: a local directory, or a repo id resolved from the Hugging Face cache.
    #[arg(value_name = "FACTORED")]
    pub input: String,

    /// Output directory (created atomically; must not exist unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Hub revision (branch, tag or commit) when FACTORED is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Print the plan; write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Replace an existing --out directory (only once the new one is complete).
    #[arg(long)]
    pub force: bool,

    /// Print nothing on success.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The output form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmitArg {
    /// Reconstructed matrices under the original names: a standard checkpoint any runtime loads.
    Dense,
    /// Latent down-projections and up-projections (kv_a_proj, k_b_proj, v_b_proj, ...): fewer
    /// parameters and a smaller KV cache; loads in transformers with trust_remote_code=True (see
    /// docs/factored-format.md), or run `expand` for other runtimes.
    Factored,
}

/// The reconstruction to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FitArg {
    /// Centred PCA with the mean row restored.
    Pca,
    /// The original experiment's reconstruction (centred PCA, mean dropped).
    Seed,
    /// Uncentred truncated SVD (Frobenius-optimal).
    Svd,
    /// Activation-aware: fit the projections' outputs on calibration text (needs --calibrate).
    Act,
}

impl FitArg {
    /// The fit this names.
    pub fn fit(self) -> Fit {
        match self {
            FitArg::Pca => Fit::Pca,
            FitArg::Seed => Fit::Seed,
            FitArg::Svd => Fit::Svd,
            FitArg::Act => Fit::Act,
        }
    }
}

/// The calibration options of `--fit act`, shared by conversions and `sweep`.
#[derive(Debug, Args)]
pub struct CalibrationArgs {
    /// Calibration text (UTF-8) for --fit act: the original model runs over it and the covariance
    /// of each layer's attention input is accumulated.
    #[arg(long, value_name = "FILE")]
    pub calibrate: Option<PathBuf>,

    /// Calibration tokens (from --calib-offset on).
    #[arg(long, value_name = "N", default_value_t = 8192, requires = "calibrate")]
    pub calib_tokens: usize,

    /// First calibration token (tokens of the whole file, no special tokens).
    #[arg(long, value_name = "K", default_value_t = 0, requires = "calibrate")]
    pub calib_offset: usize,

    /// Window length for the calibration forward pass.
    #[arg(long, value_name = "N", default_value_t = 512, requires = "calibrate")]
    pub calib_ctx: usize,

    /// How --fit act weighs output errors: attention (key errors by the queries that read them,
    /// value errors through o_proj) or energy (all outputs alike).
    #[arg(long, value_enum, default_value_t = ActWeightingArg::Attention, requires = "calibrate")]
    pub act_weighting: ActWeightingArg,
}

impl CalibrationArgs {
    /// The validated settings: present exactly when a fit `act` is requested (`wants_act`), which
    /// needs `--calibrate`; `--calibrate` without one is refused.
    pub fn resolve(&self, wants_act: bool) -> Result<Option<Calibration>> {
        match (wants_act, &self.calibrate) {
            (true, Some(text)) => Ok(Some(Calibration {
                text: text.clone(),
                tokens: NonZeroUsize::new(self.calib_tokens).ok_or_else(|| {
                    Error::usage("--calib-tokens", "must be at least 1 (e.g. 8192)")
                })?,
                offset: self.calib_offset,
                ctx: NonZeroUsize::new(self.calib_ctx)
                    .ok_or_else(|| Error::usage("--calib-ctx", "must be at least 1 (e.g. 512)"))?,
                weighting: match self.act_weighting {
                    ActWeightingArg::Attention => ActWeighting::Attention,
                    ActWeightingArg::Energy => ActWeighting::Energy,
                },
            })),
            (true, None) => Err(Error::usage(
                "--fit act",
                "needs calibration text: add --calibrate FILE (or drop act from --fit)",
            )),
            (false, Some(_)) => Err(Error::usage(
                "--calibrate",
                "only --fit act uses calibration text: add act to --fit or drop --calibrate",
            )),
            (false, None) => Ok(None),
        }
    }
}

impl Calibration {
    /// The options that reproduce these settings.
    pub fn command_args(&self) -> Vec<String> {
        let mut parts = vec![
            "--calibrate".into(),
            self.text.display().to_string(),
            "--calib-tokens".into(),
            self.tokens.to_string(),
            "--calib-offset".into(),
            self.offset.to_string(),
            "--calib-ctx".into(),
            self.ctx.to_string(),
        ];
        if self.weighting == ActWeighting::Energy {
            parts.extend(["--act-weighting".into(), "energy".into()]);
        }
        parts
    }
}

/// `--act-weighting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActWeightingArg {
    /// Key errors weighted by query statistics, value errors through o_proj.
    Attention,
    /// Output energy only, K and V balanced.
    Energy,
}

/// Arguments of a conversion.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input checkpoint: a local directory, or a Hugging Face repo id (org/name) resolved from the
    /// local Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 never downloads).
    #[arg(long = "in", value_name = "MODEL", required = true)]
    pub input: Option<String>,

    /// Output directory (created atomically; must not exist unless --force).
    #[arg(long, value_name = "DIR", required = true)]
    pub out: Option<PathBuf>,

    /// Hub revision (branch, tag or commit) when --in is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Fit k_proj and v_proj stacked, with one shared PCA per layer.
    #[arg(long, value_name = "SPEC", conflicts_with_all = ["k", "v", "separate"])]
    pub shared_kv: Option<Spec>,

    /// Fit q_proj with its own PCA.
    #[arg(long, value_name = "SPEC", conflicts_with = "separate")]
    pub q: Option<Spec>,

    /// Fit k_proj with its own PCA.
    #[arg(long, value_name = "SPEC", conflicts_with = "separate")]
    pub k: Option<Spec>,

    /// Fit v_proj with its own PCA.
    #[arg(long, value_name = "SPEC", conflicts_with = "separate")]
    pub v: Option<Spec>,

    /// Shorthand for --q SPEC --k SPEC --v SPEC.
    #[arg(long, value_name = "SPEC")]
    pub separate: Option<Spec>,

    /// Reconstruction: pca (mean restored), seed (the original script: mean dropped), svd (uncentred),
    /// act (fit the outputs on calibration text; needs --calibrate).
    #[arg(long, value_enum, default_value_t = FitArg::Pca)]
    pub fit: FitArg,

    /// Calibration for --fit act.
    #[command(flatten)]
    pub calibration: CalibrationArgs,

    /// Output form: dense (standard checkpoint) or factored (latent + up-projections).
    #[arg(long, value_enum, default_value_t = EmitArg::Dense)]
    pub emit: EmitArg,

    /// Re-shard the output into files of at most SIZE (e.g. 2GB, 500MB, 1GiB, or bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_shard_size: Option<u64>,

    /// Compute ranks and print the plan and report; write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Replace an existing --out directory (only once the new one is complete).
    #[arg(long)]
    pub force: bool,

    /// Print nothing on success.
    #[arg(long, short)]
    pub quiet: bool,

    /// Print the report as JSON on stdout instead of the summary table.
    #[arg(long)]
    pub json: bool,

    /// Worker threads (default: all cores). Output bytes do not depend on it.
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,

    /// Benchmark floor (scripts/bench): load every matrix to fit into memory, then time the fits
    /// alone and print `{"decompose_seconds": S, "matrices": N}`; write nothing.
    #[arg(long, hide = true, conflicts_with = "dry_run")]
    pub bench_decompose: bool,
}

/// Parses a size like `2GB` (10^9), `2GiB` (2^30), `500MB`, `64KiB` or plain bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let number: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 2GB, 500MB, 1GiB or a number of bytes)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let bytes = (number * scale).floor();
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}`: the size must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// How much to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The summary table on stderr.
    Summary,
    /// Nothing.
    Quiet,
    /// The JSON report on stdout.
    Json,
}

/// Calibration settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calibration {
    /// The text file.
    pub text: PathBuf,
    /// Tokens used.
    pub tokens: NonZeroUsize,
    /// First token.
    pub offset: usize,
    /// Window length.
    pub ctx: NonZeroUsize,
    /// How output errors are weighted.
    pub weighting: ActWeighting,
}

/// Validated conversion options.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// `--in` as given.
    pub input: String,
    /// `--revision`.
    pub revision: String,
    /// `--out` as given.
    pub out: PathBuf,
    /// What to rewrite.
    pub surgery: Surgery,
    /// `--emit`.
    pub emit: Emit,
    /// `--calibrate` and its settings (always present with fit `act`, absent otherwise).
    pub calibration: Option<Calibration>,
    /// `--max-shard-size` in bytes.
    pub max_shard_size: Option<u64>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--force`.
    pub force: bool,
    /// What to print.
    pub output: Output,
    /// `--threads`.
    pub threads: Option<NonZeroUsize>,
    /// The hidden `--bench-decompose`.
    pub bench_decompose: bool,
}

impl ConvertOptions {
    /// The command that reproduces this output (without `--out` and options that do not change it).
    pub fn reproduce_command(&self) -> String {
        let mut parts = vec![
            "surgery-convert".to_string(),
            "--in".into(),
            self.input.clone(),
        ];
        if self.revision != "main" {
            parts.extend(["--revision".into(), self.revision.clone()]);
        }
        let s = &self.surgery;
        for (flag, spec) in [
            ("--shared-kv", s.shared_kv),
            ("--q", s.q),
            ("--k", s.k),
            ("--v", s.v),
        ] {
            if let Some(spec) = spec {
                parts.extend([flag.to_string(), spec.to_string()]);
            }
        }
        parts.extend(["--fit".into(), s.fit.name().into()]);
        if let Some(c) = &self.calibration {
            parts.extend(c.command_args());
        }
        if self.emit == Emit::Factored {
            parts.extend(["--emit".into(), "factored".into()]);
        }
        if let Some(size) = self.max_shard_size {
            parts.extend(["--max-shard-size".into(), size.to_string()]);
        }
        parts.join(" ")
    }
}

impl ConvertArgs {
    /// Validates the arguments.
    pub fn resolve(self) -> Result<ConvertOptions> {
        let input = self.input.ok_or_else(|| {
            Error::usage("--in", "missing: give a checkpoint directory or org/name")
        })?;
        let out = self
            .out
            .ok_or_else(|| Error::usage("--out", "missing: give the directory to create"))?;
        let (q, k, v) = match self.separate {
            Some(spec) => (Some(spec), Some(spec), Some(spec)),
            None => (self.q, self.k, self.v),
        };
        if q.is_none() && k.is_none() && v.is_none() && self.shared_kv.is_none() {
            return Err(Error::usage(
                "--shared-kv",
                "no surgery requested: give at least one of --shared-kv, --separate, --q, --k or --v (e.g. --shared-kv 0.3)",
            ));
        }
        let fit = match self.fit {
            FitArg::Pca => Fit::Pca,
            FitArg::Seed => Fit::Seed,
            FitArg::Svd => Fit::Svd,
            FitArg::Act => Fit::Act,
        };
        let calibration = self.calibration.resolve(fit == Fit::Act)?;
        let output = if self.json {
            Output::Json
        } else if self.quiet {
            Output::Quiet
        } else {
            Output::Summary
        };
        Ok(ConvertOptions {
            input,
            revision: self.revision,
            out,
            surgery: Surgery {
                q,
                k,
                v,
                shared_kv: self.shared_kv,
                fit,
            },
            calibration,
            emit: match self.emit {
                EmitArg::Dense => Emit::Dense,
                EmitArg::Factored => Emit::Factored,
            },
            max_shard_size: self.max_shard_size,
            dry_run: self.dry_run,
            force: self.force,
            output,
            threads: self.threads,
            bench_decompose: self.bench_decompose,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("64kib"), Ok(65536));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert!(parse_size("0").is_err());
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("abc").is_err());
    }

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
        assert!(cli
            .convert
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("no surgery requested"));
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
