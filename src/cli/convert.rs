//! The conversion's arguments (the default command) and their resolution into [`ConvertOptions`];
//! the calibration arguments it shares with `sweep` are [`super::calibration`].

use super::calibration::{refuse_sequential_basis, BosArg, CalibrationArgs, TextSizeArgs};
use super::parse::parse_size;
use crate::error::{Error, Result};
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::text::{Builtin, TextSource};
use crate::model::bos::BosPolicy;
use crate::options::{
    check_by_default, Allocation, Calibration, ConvertOptions, Output, TextWindow, CHECK_CTX,
    CHECK_TOKENS,
};
use crate::plan::{Emit, LayerSharing, Share, Surgery};
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
    /// Activation-aware: fit the projections' outputs on calibration text (--calibrate, or the
    /// built-in text).
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

/// One entry of a comma-separated fit list.
pub fn parse_fit_item(s: &str) -> Result<FitArg, String> {
    match s.trim() {
        "pca" => Ok(FitArg::Pca),
        "seed" => Ok(FitArg::Seed),
        "svd" => Ok(FitArg::Svd),
        "act" => Ok(FitArg::Act),
        "" => Err("an empty entry: give comma-separated fits, e.g. pca,svd".to_string()),
        other => Err(format!("unknown fit `{other}`: use pca, seed, svd or act")),
    }
}

/// `--share`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShareArg {
    /// One cached latent per token for each group, computed from its first layer's input (saves
    /// cache; needs --fit act and --emit factored).
    Latent,
    /// One down-projection for each group; every layer keeps its own latent (saves parameters).
    Basis,
}

impl ShareArg {
    /// The share this names.
    pub fn share(self) -> Share {
        match self {
            ShareArg::Latent => Share::Latent,
            ShareArg::Basis => Share::Basis,
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

    /// Output directory (created atomically; must not exist unless --force; if it appears during
    /// the run, it is left alone and the run fails, keeping its output as DIR.surgery-kept-PID).
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

    /// Share the --shared-kv fit across groups of G adjacent layers (the last group may be
    /// shorter); 1 fits every layer on its own.
    #[arg(long, value_name = "G")]
    pub share_layers: Option<NonZeroUsize>,

    /// What a group of --share-layers shares: latent (one cached latent per group, computed from
    /// its first layer's input) or basis (one down-projection, a latent per layer) [default: latent].
    #[arg(long, value_enum)]
    pub share: Option<ShareArg>,

    /// Reconstruction: pca (mean restored), seed (the original script: mean dropped), svd (uncentred),
    /// act (fit the outputs on calibration text: --calibrate FILE, or the built-in text).
    #[arg(long, value_enum, default_value_t = FitArg::Pca)]
    pub fit: FitArg,

    /// Calibration for --fit act.
    #[command(flatten)]
    pub calibration: CalibrationArgs,

    /// Output form: dense (standard checkpoint) or factored (latent + up-projections).
    #[arg(long, value_enum, default_value_t = EmitArg::Dense)]
    pub emit: EmitArg,

    /// After writing, score the input and the output on a held-out sample (1,024 tokens of the
    /// built-in sample, or of --check-text) and print both perplexities; also recorded in
    /// surgery.json. Default: on with --fit act, off for the weight-only fits, where it would take
    /// several times as long as the conversion (docs/usage.md, "The quality check").
    #[arg(long, overrides_with = "no_check", conflicts_with = "dry_run")]
    pub check: bool,

    /// Skip the quality check.
    #[arg(long, overrides_with = "check")]
    pub no_check: bool,

    /// Held-out UTF-8 text for the quality check instead of the built-in sample (its first 1,024
    /// tokens are scored; a regular file of at most --max-text-size); implies --check.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["no_check", "dry_run"])]
    pub check_text: Option<PathBuf>,

    /// The limit on text files.
    #[command(flatten)]
    pub text_size: TextSizeArgs,

    /// Whether the windows of calibration and of the quality check start with a BOS token: auto
    /// (as the model is used: when its tokenizer's post-processor adds one, e.g. Llama 2/3,
    /// Mistral, Gemma), always (the tokenizer's bos_token), never [default: auto].
    #[arg(long, value_enum, value_name = "WHEN")]
    pub bos: Option<BosArg>,

    /// Re-shard the output into files of at most SIZE (e.g. 2GB, 500MB, 1GiB, or bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_shard_size: Option<u64>,

    /// Compute ranks and print the plan and report; write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Replace an existing --out, only once the new output is complete, and only if it is an
    /// earlier output of surgery-convert (every file listed in its SHA256SUMS, or a sweep's three
    /// files) or an empty directory, and still the one that was there when the run started;
    /// anything else is refused (remove it yourself).
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
    /// The quality check asked for, or the default for `fit` (never in a dry run).
    fn resolve_check(&self, fit: Fit) -> Option<TextWindow> {
        let on = if self.check || self.check_text.is_some() {
            true
        } else if self.no_check {
            false
        } else {
            check_by_default(fit)
        };
        (on && !self.dry_run).then(|| TextWindow {
            text: match &self.check_text {
                Some(path) => TextSource::File(self.text_size.file(path)),
                None => TextSource::Builtin(Builtin::Check),
            },
            tokens: CHECK_TOKENS,
            ctx: CHECK_CTX,
            offset: 0,
            bos: self.bos_policy(),
        })
    }

    /// `--bos`, resolved.
    fn bos_policy(&self) -> BosPolicy {
        self.bos.unwrap_or_default().policy()
    }

    /// Validates the arguments.
    pub fn resolve(self) -> Result<ConvertOptions> {
        let check = self.resolve_check(self.fit.fit());
        let bos = self.bos_policy();
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
        let emit = match self.emit {
            EmitArg::Dense => Emit::Dense,
            EmitArg::Factored => Emit::Factored,
        };
        let sharing = resolve_sharing(
            self.share_layers,
            self.share,
            self.shared_kv.is_some(),
            fit,
            emit,
        )?;
        let calibration = self
            .calibration
            .resolve(fit == Fit::Act, false, bos, &self.text_size)?;
        refuse_unused_size(&self.text_size, calibration.as_ref(), check.as_ref())?;
        if self.bos.is_some() && calibration.is_none() && check.is_none() {
            return Err(Error::usage(
                "--bos",
                "only calibration (--fit act) and the quality check (--check) read text: add one or drop the option",
            ));
        }
        refuse_sequential_basis(calibration.as_ref(), sharing.map(|s| s.share))?;
        let compensate = match fit {
            Fit::Act => self.calibration.compensation()?,
            _ => None,
        };
        let budgeted = [self.shared_kv, q, k, v]
            .iter()
            .any(|s| matches!(s, Some(Spec::Budget(_))));
        if calibration
            .as_ref()
            .is_some_and(|c| c.allocation == Allocation::Sensitivity)
            && !budgeted
        {
            return Err(Error::usage(
                "--budget-allocation",
                "only budget:F SPECs are allocated: give e.g. --shared-kv budget:0.25, or drop the option",
            ));
        }
        if let (Some(calibration), Some(window)) = (&calibration, &check) {
            if calibration.overlaps(window) {
                return Err(Error::usage(
                    "--check-text",
                    format!(
                        "{} is the calibration text and its first {} tokens were calibrated on: give held-out text",
                        window.text, window.tokens
                    ),
                ));
            }
        }
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
                sharing,
                compensate,
            },
            calibration,
            emit,
            check,
            max_shard_size: self.max_shard_size,
            dry_run: self.dry_run,
            force: self.force,
            output,
        })
    }
}

/// Refuses `--max-text-size` where neither the calibration nor the check reads a file.
fn refuse_unused_size(
    size: &TextSizeArgs,
    calibration: Option<&Calibration>,
    check: Option<&TextWindow>,
) -> Result<()> {
    let texts = [calibration.map(|c| &c.text), check.map(|w| &w.text)];
    size.refuse_unused(texts.iter().flatten().any(|t| t.file().is_some()))
}

/// `--share-layers` and `--share`, validated against the rest of the surgery: `None` for groups of
/// one layer (today's per-layer fits).
pub fn resolve_sharing(
    layers: Option<NonZeroUsize>,
    share: Option<ShareArg>,
    shared_kv: bool,
    fit: Fit,
    emit: Emit,
) -> Result<Option<LayerSharing>> {
    let Some(layers) = layers else {
        return match share {
            Some(_) => Err(Error::usage(
                "--share",
                "only with --share-layers G: give the number of adjacent layers per group (e.g. --share-layers 2)",
            )),
            None => Ok(None),
        };
    };
    if layers.get() == 1 {
        return Ok(None);
    }
    if !shared_kv {
        return Err(Error::usage(
            "--share-layers",
            "layers share the --shared-kv fit: add --shared-kv SPEC (e.g. --shared-kv budget:0.25)",
        ));
    }
    let share = share.map_or(Share::Latent, ShareArg::share);
    if share == Share::Latent && fit != Fit::Act {
        return Err(Error::usage(
            "--share",
            "latent computes a group's keys and values from its first layer's input, which only a calibrated fit can learn: add --fit act, or use --share basis",
        ));
    }
    if share == Share::Latent && emit == Emit::Dense {
        return Err(Error::usage(
            "--share",
            "latent cannot be written as a standard checkpoint (its layers read another layer's latent): add --emit factored, or use --share basis",
        ));
    }
    Ok(Some(LayerSharing { layers, share }))
}
