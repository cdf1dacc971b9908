//! The conversion's arguments (the default command) and the calibration arguments it shares with
//! `sweep`, and their resolution into [`ConvertOptions`] and [`Calibration`].

use super::parse::parse_size;
use crate::error::{Error, Result};
use crate::fit::act::ActWeighting;
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::options::{Calibration, ConvertOptions, Output};
use crate::plan::{Emit, Surgery};
use clap::{Args, ValueEnum};
use std::num::NonZeroUsize;
use std::path::PathBuf;

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

/// `--act-weighting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActWeightingArg {
    /// Key errors weighted by query statistics, value errors through o_proj.
    Attention,
    /// Output energy only, K and V balanced.
    Energy,
}

/// The calibration options of `--fit act`, shared by conversions and `sweep`.
#[derive(Debug, Clone, Args)]
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

/// Arguments of a conversion.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input checkpoint: a local directory, or a Hugging Face repo id (org/name) resolved from the
    /// local Hugging Face cache (HF_HOME / HF_HUB_CACHE), downloaded into it when missing
    /// (HF_ENDPOINT, HF_TOKEN, HF_HUB_DOWNLOAD_TIMEOUT; HF_HUB_OFFLINE=1 never downloads).
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
        let fit = self.fit.fit();
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
        })
    }
}
