//! The calibration arguments of `--fit act`, shared by conversions and `sweep` ([`CalibrationArgs`]),
//! the window convention's `--bos`, the limit on text files every command that reads one shares
//! ([`TextSizeArgs`]), and their resolution into [`Calibration`].

use super::parse::{parse_size, refuse_duplicates};
use crate::error::{Error, Result};
use crate::fit::act::ActWeighting;
use crate::input::text::{Builtin, TextFile, TextSource, DEFAULT_MAX_TEXT_SIZE};
use crate::model::bos::BosPolicy;
use crate::options::{Allocation, BosSink, CalibrateMode, Calibration, DEFAULT_COMPENSATE};
use crate::plan::{Compensate, Share};
use clap::{Args, ValueEnum};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

/// `--max-text-size`, shared by the conversion, `eval` and `sweep`.
#[derive(Debug, Clone, Args)]
pub struct TextSizeArgs {
    /// Largest text file --calibrate, --check-text or --text reads (e.g. 1GiB, 500MB, or bytes)
    /// [default: 256MiB]. A larger file (or one that is not a regular file: a FIFO, a device) is
    /// refused before it is read. Only the tokens a pass uses are tokenized, so memory does not
    /// grow with the file; the whole file is read for its SHA-256, which the limit keeps to about
    /// a second.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_text_size: Option<u64>,
}

impl TextSizeArgs {
    /// `path` under the limit.
    pub fn file(&self, path: &Path) -> TextFile {
        TextFile {
            path: path.to_path_buf(),
            max_bytes: self.max_text_size.unwrap_or(DEFAULT_MAX_TEXT_SIZE),
        }
    }

    /// Refuses the option where no text file is read (`reads_file`: one is).
    pub fn refuse_unused(&self, reads_file: bool) -> Result<()> {
        match (self.max_text_size, reads_file) {
            (Some(_), false) => Err(Error::usage(
                "--max-text-size",
                "no text file is read (built-in texts are not limited): give --calibrate, --check-text or --text FILE, or drop the option",
            )),
            _ => Ok(()),
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
    /// Attention without the family's q/k norms and output norm: W_q C W_q^T and o_proj alone.
    Projections,
}

/// `--bos-sink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BosSinkArg {
    /// The BOS position's keys and values are kept exactly.
    Exact,
    /// The BOS position is fitted like any other calibration token.
    Fitted,
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

/// `--bos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum BosArg {
    /// As the model is used: a BOS exactly when the tokenizer's post-processor adds one.
    #[default]
    Auto,
    /// Every window starts with the tokenizer's bos_token.
    Always,
    /// No window starts with a BOS.
    Never,
}

impl BosArg {
    /// The validated policy.
    pub fn policy(self) -> BosPolicy {
        match self {
            BosArg::Auto => BosPolicy::Auto,
            BosArg::Always => BosPolicy::Always,
            BosArg::Never => BosPolicy::Never,
        }
    }
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
    /// Calibration text (UTF-8, a regular file of at most --max-text-size) for --fit act: the
    /// original model runs over it and the covariance of each layer's attention input is
    /// accumulated; only the tokens used are tokenized. Default: the built-in calibration text
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
    /// as the family's scores read them: after its q/k norms; value errors through o_proj and the
    /// norm after it), energy (all outputs alike) or projections (attention from W_q and o_proj
    /// alone, ignoring the family's norms) [default: attention].
    #[arg(long, value_enum)]
    pub act_weighting: Option<ActWeightingArg>,

    /// Where calibration windows start with a BOS (see --bos): exact (its keys and values are
    /// kept exactly in every layer, one component of each fit: every query reads the BOS position,
    /// the attention sink, and it is the same in every window) or fitted (like any other
    /// calibration token) [default: exact].
    #[arg(long, value_enum, value_name = "HOW")]
    pub bos_sink: Option<BosSinkArg>,

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
        refuse_duplicates("--calibrate-mode", &names(&modes, |m| m.name()))?;
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
        refuse_duplicates(
            "--compensate",
            &names(&list, |c| c.map_or("none", Compensate::name)),
        )?;
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
        refuse_duplicates("--budget-allocation", &names(&list, |a| a.name()))?;
        Ok(if list.is_empty() {
            vec![Allocation::Spectra]
        } else {
            list
        })
    }

    /// The validated settings: present exactly when a fit `act` is requested (`wants_act`), on
    /// `--calibrate` or the built-in text; a calibration option without one is refused.
    /// `many`: several `--calibrate-mode` values are allowed (`sweep`, which reads them with
    /// [`CalibrationArgs::modes`]). `bos`: the `--bos` policy the calibration windows follow;
    /// `size`: the limit on the `--calibrate` file.
    pub fn resolve(
        &self,
        wants_act: bool,
        many: bool,
        bos: BosPolicy,
        size: &TextSizeArgs,
    ) -> Result<Option<Calibration>> {
        if !wants_act {
            let given = [
                ("--calibrate", self.calibrate.is_some()),
                ("--calib-tokens", self.calib_tokens.is_some()),
                ("--calib-offset", self.calib_offset.is_some()),
                ("--calib-ctx", self.calib_ctx.is_some()),
                ("--act-weighting", self.act_weighting.is_some()),
                ("--bos-sink", self.bos_sink.is_some()),
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
            Some(path) => TextSource::File(size.file(path)),
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
                ActWeightingArg::Projections => ActWeighting::Projections,
            },
            sink: match self.bos_sink.unwrap_or(BosSinkArg::Exact) {
                BosSinkArg::Exact => BosSink::Exact,
                BosSinkArg::Fitted => BosSink::Fitted,
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
            bos,
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

/// The option values' names, in order.
fn names<T>(list: &[T], name: impl Fn(&T) -> &'static str) -> Vec<&'static str> {
    list.iter().map(name).collect()
}
