//! The conversion's arguments (the default command) and the calibration arguments it shares with
//! `sweep`, and their resolution into [`ConvertOptions`] and [`Calibration`].

use super::parse::parse_size;
use crate::error::{Error, Result};
use crate::fit::act::ActWeighting;
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::text::{Builtin, TextSource};
use crate::options::{
    check_by_default, Allocation, CalibrateMode, Calibration, ConvertOptions, Output, TextWindow,
    CHECK_CTX, CHECK_TOKENS, DEFAULT_COMPENSATE,
};
use crate::plan::{Compensate, Emit, LayerSharing, Share, Surgery};
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

/// `--act-weighting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActWeightingArg {
    /// Key errors weighted by query statistics, value errors through o_proj.
    Attention,
    /// Output energy only, K and V balanced.
    Energy,
}

/// `--calibrate-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CalibrateModeArg {
    /// Every layer fitted on the original model's inputs.
    OneShot,
    /// Layer by layer, each fitted on the inputs the compressed layers below it produce.
    Sequential,
}

/// `--compensate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompensateArg {
    /// Nothing refitted besides the fitted projections.
    None,
    /// Each layer's o_proj refitted on its compressed attention heads.
    #[value(name = "o_proj")]
    OProj,
}

/// `--budget-allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllocationArg {
    /// By the groups' normalised spectra alone.
    Spectra,
    /// By the spectra scaled by each group's measured cost in the forward pass.
    Sensitivity,
}

/// The calibration options of `--fit act`, shared by conversions and `sweep`.
#[derive(Debug, Clone, Args)]
pub struct CalibrationArgs {
    /// Calibration text (UTF-8) for --fit act: the original model runs over it and the covariance
    /// of each layer's attention input is accumulated. Default: the built-in calibration text
    /// (English prose, technical documentation, code and dialogue, about 39,000 SmolLM2 tokens;
    /// data/builtin/README.md).
    #[arg(long, value_name = "FILE")]
    pub calibrate: Option<PathBuf>,

    /// Calibration tokens (from --calib-offset on) [default: 8192].
    #[arg(long, value_name = "N")]
    pub calib_tokens: Option<usize>,

    /// First calibration token (tokens of the whole text, no special tokens) [default: 0].
    #[arg(long, value_name = "K")]
    pub calib_offset: Option<usize>,

    /// Window length for the calibration forward pass [default: 512].
    #[arg(long, value_name = "N")]
    pub calib_ctx: Option<usize>,

    /// How --fit act weighs output errors: attention (key errors by the queries that read them,
    /// value errors through o_proj) or energy (all outputs alike) [default: attention].
    #[arg(long, value_enum)]
    pub act_weighting: Option<ActWeightingArg>,

    /// Which inputs --fit act fits each layer on: one-shot (the original model's) or sequential
    /// (layer by layer, the inputs the already-compressed layers below produce, with the original
    /// model's outputs as the target: it compensates what the layers below lost; one more forward
    /// pass of the calibration text) [default: one-shot]. `sweep` takes a comma-separated list.
    #[arg(long, value_enum, value_name = "MODE", value_delimiter = ',')]
    pub calibrate_mode: Vec<CalibrateModeArg>,

    /// What --fit act refits besides the fitted projections: o_proj (after a layer's K/V are
    /// replaced, its o_proj is refitted by regularised least squares so the attention block's
    /// output on the calibration tokens matches the original model's; the output carries the
    /// rewritten o_proj) or none (the K/V fits alone) [default: o_proj]. `sweep` takes a
    /// comma-separated list.
    #[arg(long, value_enum, value_name = "WHAT", value_delimiter = ',')]
    pub compensate: Vec<CompensateArg>,

    /// How budget:F spends its budget across layers: spectra (by each group's normalised spectrum)
    /// or sensitivity (the spectra scaled by what each group's compression costs the calibration
    /// loss, measured by replacing it alone over the first 1,024 calibration tokens; one probe
    /// per group) [default: spectra]. `sweep` takes a comma-separated list.
    #[arg(long, value_enum, value_name = "HOW", value_delimiter = ',')]
    pub budget_allocation: Vec<AllocationArg>,
}

impl CalibrationArgs {
    /// The `--calibrate-mode` values, in order (empty: not given); duplicates refused.
    pub fn modes(&self) -> Result<Vec<CalibrateMode>> {
        let modes: Vec<CalibrateMode> = self
            .calibrate_mode
            .iter()
            .map(|m| match m {
                CalibrateModeArg::OneShot => CalibrateMode::OneShot,
                CalibrateModeArg::Sequential => CalibrateMode::Sequential,
            })
            .collect();
        for (i, m) in modes.iter().enumerate() {
            if modes[..i].contains(m) {
                return Err(Error::usage(
                    "--calibrate-mode",
                    format!("{} is listed twice", m.name()),
                ));
            }
        }
        Ok(modes)
    }

    /// The `--compensate` values, in order (`[DEFAULT_COMPENSATE]` when not given); duplicates
    /// refused.
    pub fn compensations(&self) -> Result<Vec<Option<Compensate>>> {
        let list: Vec<Option<Compensate>> = self
            .compensate
            .iter()
            .map(|c| match c {
                CompensateArg::None => None,
                CompensateArg::OProj => Some(Compensate::OProj),
            })
            .collect();
        for (i, c) in list.iter().enumerate() {
            if list[..i].contains(c) {
                return Err(Error::usage(
                    "--compensate",
                    format!("{} is listed twice", c.map_or("none", Compensate::name)),
                ));
            }
        }
        Ok(if list.is_empty() {
            vec![DEFAULT_COMPENSATE]
        } else {
            list
        })
    }

    /// The one `--compensate` value of a conversion.
    pub fn compensation(&self) -> Result<Option<Compensate>> {
        match self.compensations()?.as_slice() {
            [one] => Ok(*one),
            _ => Err(Error::usage(
                "--compensate",
                "a conversion takes one value (sweep takes a list): give o_proj or none",
            )),
        }
    }

    /// The `--budget-allocation` values, in order (`[Spectra]` when not given); duplicates refused.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        let list: Vec<Allocation> = self
            .budget_allocation
            .iter()
            .map(|a| match a {
                AllocationArg::Spectra => Allocation::Spectra,
                AllocationArg::Sensitivity => Allocation::Sensitivity,
            })
            .collect();
        for (i, a) in list.iter().enumerate() {
            if list[..i].contains(a) {
                return Err(Error::usage(
                    "--budget-allocation",
                    format!("{} is listed twice", a.name()),
                ));
            }
        }
        Ok(if list.is_empty() {
            vec![Allocation::Spectra]
        } else {
            list
        })
    }

    /// The validated settings: present exactly when a fit `act` is requested (`wants_act`), on
    /// `--calibrate` or the built-in text; a calibration option without one is refused.
    /// `many`: several `--calibrate-mode` values are allowed (`sweep`, which reads them with
    /// [`CalibrationArgs::modes`]).
    pub fn resolve(&self, wants_act: bool, many: bool) -> Result<Option<Calibration>> {
        if !wants_act {
            let given = [
                ("--calibrate", self.calibrate.is_some()),
                ("--calib-tokens", self.calib_tokens.is_some()),
                ("--calib-offset", self.calib_offset.is_some()),
                ("--calib-ctx", self.calib_ctx.is_some()),
                ("--act-weighting", self.act_weighting.is_some()),
                ("--calibrate-mode", !self.calibrate_mode.is_empty()),
                ("--compensate", !self.compensate.is_empty()),
                ("--budget-allocation", !self.budget_allocation.is_empty()),
            ];
            return match given.iter().find(|(_, g)| *g) {
                Some((option, _)) => Err(Error::usage(
                    *option,
                    "only --fit act uses calibration: add act to --fit or drop the option",
                )),
                None => Ok(None),
            };
        }
        let text = match &self.calibrate {
            Some(path) => TextSource::File(path.clone()),
            None => TextSource::Builtin(Builtin::Calibration),
        };
        Ok(Some(Calibration {
            text,
            tokens: NonZeroUsize::new(self.calib_tokens.unwrap_or(8192))
                .ok_or_else(|| Error::usage("--calib-tokens", "must be at least 1 (e.g. 8192)"))?,
            offset: self.calib_offset.unwrap_or(0),
            ctx: NonZeroUsize::new(self.calib_ctx.unwrap_or(512))
                .ok_or_else(|| Error::usage("--calib-ctx", "must be at least 1 (e.g. 512)"))?,
            weighting: match self.act_weighting.unwrap_or(ActWeightingArg::Attention) {
                ActWeightingArg::Attention => ActWeighting::Attention,
                ActWeightingArg::Energy => ActWeighting::Energy,
            },
            mode: match self.modes()?.as_slice() {
                [] => CalibrateMode::OneShot,
                [mode] => *mode,
                [..] if many => CalibrateMode::OneShot,
                [..] => return Err(Error::usage(
                    "--calibrate-mode",
                    "a conversion takes one mode (sweep takes a list): give one-shot or sequential",
                )),
            },
            allocation: match self.allocations()?.as_slice() {
                [one] => *one,
                [..] if many => Allocation::Spectra,
                [..] => return Err(Error::usage(
                    "--budget-allocation",
                    "a conversion takes one value (sweep takes a list): give spectra or sensitivity",
                )),
            },
        }))
    }
}

/// Sequential calibration fits a layer on the inputs the compressed layers below it produce; a
/// shared basis compresses several layers with one down-projection fitted at once, before those
/// inputs exist.
pub fn refuse_sequential_basis(
    calibration: Option<&Calibration>,
    share: Option<Share>,
) -> Result<()> {
    match (calibration.map(|c| c.mode), share) {
        (Some(CalibrateMode::Sequential), Some(Share::Basis)) => Err(Error::usage(
            "--calibrate-mode",
            "sequential calibration does not fit --share basis (its down-projection is fitted for all the group's layers before their compressed inputs exist): use --share latent or --calibrate-mode one-shot",
        )),
        _ => Ok(()),
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
    /// tokens are scored); implies --check.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["no_check", "dry_run"])]
    pub check_text: Option<PathBuf>,

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
                Some(path) => TextSource::File(path.clone()),
                None => TextSource::Builtin(Builtin::Check),
            },
            tokens: CHECK_TOKENS,
            ctx: CHECK_CTX,
            offset: 0,
        })
    }

    /// Validates the arguments.
    pub fn resolve(self) -> Result<ConvertOptions> {
        let check = self.resolve_check(self.fit.fit());
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
        let calibration = self.calibration.resolve(fit == Fit::Act, false)?;
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
