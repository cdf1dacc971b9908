//! The options of a conversion, validated, and the window of text the quality check scores
//! ([`TextWindow`], which `eval` and `sweep` take too).

use super::CommandLine;
use crate::fit::act::ActWeighting;
use crate::fit::decompose::Fit;
use crate::input::text::TextSource;
use crate::model::bos::BosPolicy;
use crate::plan::{Compensate, Emit, Surgery};
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// Which tokens of a text are scored: `tokens` from `offset` on, in windows of `ctx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextWindow {
    /// The text: a file, or the built-in held-out sample.
    pub text: TextSource,
    /// Tokens to evaluate (rounded down to whole windows).
    pub tokens: NonZeroUsize,
    /// Window length.
    pub ctx: NonZeroUsize,
    /// Tokens skipped before the first window.
    pub offset: usize,
    /// Whether windows start with the tokenizer's BOS (`--bos`).
    pub bos: BosPolicy,
}

/// Tokens the quality check scores: two windows of [`CHECK_CTX`].
pub const CHECK_TOKENS: NonZeroUsize = NonZeroUsize::MIN.saturating_add(1023);
/// The quality check's window length.
pub const CHECK_CTX: NonZeroUsize = NonZeroUsize::MIN.saturating_add(511);

/// Whether the quality check runs when neither `--check` nor `--no-check` is given: with the
/// calibrated fit, whose conversion already runs the forward pass over 8,192 calibration tokens,
/// so scoring 1,024 tokens with each of two models adds a fraction of it at every model size; not
/// for the weight-only fits, whose conversion is a streaming copy several times faster than the
/// check (measured: docs/usage.md, "The quality check").
pub fn check_by_default(fit: Fit) -> bool {
    fit == Fit::Act
}

/// What `--fit act` refits besides the fitted projections when `--compensate` is not given: the
/// best measured combination (docs/quality.md, "Compensation, calibration mode and allocation").
pub const DEFAULT_COMPENSATE: Option<Compensate> = Some(Compensate::OProj);

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
    /// The text: `--calibrate`, or the built-in calibration text.
    pub text: TextSource,
    /// Tokens used.
    pub tokens: NonZeroUsize,
    /// First token.
    pub offset: usize,
    /// Window length.
    pub ctx: NonZeroUsize,
    /// How output errors are weighted.
    pub weighting: ActWeighting,
    /// Which inputs each layer is fitted on.
    pub mode: CalibrateMode,
    /// How `budget:F` spends its budget.
    pub allocation: Allocation,
    /// Whether calibration windows start with the tokenizer's BOS (`--bos`, which the quality
    /// check shares).
    pub bos: BosPolicy,
    /// What the fits do with the BOS position where the windows start with one.
    pub sink: BosSink,
}

/// What fit `act` does with the BOS position where calibration windows start with one
/// (`--bos-sink`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BosSink {
    /// Its keys and values are kept exactly (one component of each fit).
    #[default]
    Exact,
    /// Fitted like any other calibration token.
    Fitted,
}

impl BosSink {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            BosSink::Exact => "exact",
            BosSink::Fitted => "fitted",
        }
    }
}

/// How `budget:F` spends its budget across groups (`--budget-allocation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Allocation {
    /// By the groups' normalised spectra alone.
    #[default]
    Spectra,
    /// By the spectra scaled by each group's measured cost in the forward pass.
    Sensitivity,
}

impl Allocation {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Spectra => "spectra",
            Allocation::Sensitivity => "sensitivity",
        }
    }
}

/// Which inputs fit `act` fits each layer on (`--calibrate-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CalibrateMode {
    /// The original model's.
    #[default]
    OneShot,
    /// The compressed model's so far, the original model's outputs as the target.
    Sequential,
}

impl CalibrateMode {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            CalibrateMode::OneShot => "one-shot",
            CalibrateMode::Sequential => "sequential",
        }
    }
}

impl Calibration {
    /// Appends the options that reproduce these settings.
    pub fn add_to(&self, command: &mut CommandLine) {
        command
            .optional("--calibrate", self.text.file().map(|p| p.display()))
            .flag("--calib-tokens", self.tokens)
            .flag("--calib-offset", self.offset)
            .flag("--calib-ctx", self.ctx);
        if self.weighting != ActWeighting::default() {
            command.flag("--act-weighting", self.weighting.name());
        }
        if self.sink != BosSink::default() {
            command.flag("--bos-sink", self.sink.name());
        }
        if self.mode == CalibrateMode::Sequential {
            command.flag("--calibrate-mode", self.mode.name());
        }
        if self.allocation == Allocation::Sensitivity {
            command.flag("--budget-allocation", self.allocation.name());
        }
    }

    /// Whether scoring `window` would score tokens calibrated on (same text, overlapping tokens).
    pub fn overlaps(&self, window: &TextWindow) -> bool {
        let end = |start: usize, n: usize| start.saturating_add(n);
        self.text == window.text
            && self.offset < end(window.offset, window.tokens.get())
            && window.offset < end(self.offset, self.tokens.get())
    }
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
    /// The quality check after writing: which text and tokens both models are scored on (`None`:
    /// no check; see `docs/usage.md` for when it runs by default).
    pub check: Option<TextWindow>,
    /// `--max-shard-size` in bytes.
    pub max_shard_size: Option<u64>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--force`.
    pub force: bool,
    /// What to print.
    pub output: Output,
}

impl ConvertOptions {
    /// The command that reproduces this output (without `--out` and options that do not change it).
    pub fn reproduce_command(&self) -> String {
        let mut c = CommandLine::new(["--in", self.input.as_str()]);
        c.revision(&self.revision);
        let s = &self.surgery;
        c.optional("--shared-kv", s.shared_kv)
            .optional("--q", s.q)
            .optional("--k", s.k)
            .optional("--v", s.v)
            .flag("--fit", s.fit.name());
        if let Some(sharing) = s.sharing {
            c.flag("--share-layers", sharing.layers)
                .flag("--share", sharing.share.name());
        }
        if let Some(calibration) = &self.calibration {
            calibration.add_to(&mut c);
        }
        if s.fit == Fit::Act && s.compensate != DEFAULT_COMPENSATE {
            c.flag(
                "--compensate",
                s.compensate.map_or("none", Compensate::name),
            );
        }
        if self.emit == Emit::Factored {
            c.flag("--emit", "factored");
        }
        c.optional("--max-shard-size", self.max_shard_size);
        let bos = self
            .calibration
            .as_ref()
            .map(|c| c.bos)
            .or(self.check.as_ref().map(|w| w.bos));
        if let Some(bos) = bos.filter(|&b| b != BosPolicy::Auto) {
            c.flag("--bos", bos.name());
        }
        match (&self.check, check_by_default(s.fit)) {
            (Some(w), default) => match w.text.file() {
                Some(path) => {
                    c.flag("--check-text", path.display());
                }
                None if !default => {
                    c.switch("--check");
                }
                None => {}
            },
            (None, true) if !self.dry_run => {
                c.switch("--no-check");
            }
            (None, _) => {}
        }
        c.finish()
    }
}
