//! The options of a conversion, validated.

use super::CommandLine;
use crate::fit::act::ActWeighting;
use crate::plan::{Emit, Surgery};
use std::num::NonZeroUsize;
use std::path::PathBuf;

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

impl Calibration {
    /// Appends the options that reproduce these settings.
    pub fn add_to(&self, command: &mut CommandLine) {
        command
            .flag("--calibrate", self.text.display())
            .flag("--calib-tokens", self.tokens)
            .flag("--calib-offset", self.offset)
            .flag("--calib-ctx", self.ctx);
        if self.weighting == ActWeighting::Energy {
            command.flag("--act-weighting", "energy");
        }
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
        if let Some(calibration) = &self.calibration {
            calibration.add_to(&mut c);
        }
        if self.emit == Emit::Factored {
            c.flag("--emit", "factored");
        }
        c.optional("--max-shard-size", self.max_shard_size);
        c.finish()
    }
}
