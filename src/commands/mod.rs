//! One module per subcommand, each running the stages below it from its validated options:
//! [`convert`] (the default command, with its quality check in [`check`]), [`expand`], [`eval`],
//! [`verify`], [`inspect`], [`sweep`].
//! Also what several commands share: the worker pool and progress bars.

mod check;
pub mod convert;
pub mod eval;
pub mod expand;
pub mod inspect;
mod progress;
pub mod sweep;
pub mod verify;

use crate::calibrate::Passes;
use crate::error::{Error, Result};
use crate::fit::spec::Spec;
use crate::forward::windows::Flags;
use crate::input::checkpoint::Checkpoint;
use crate::input::source::{self, ResolvedInput};
use crate::options::CalibrateMode;
use crate::output::staging::{check_out_path, OutTarget};
use crate::plan::GroupPlan;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::path::Path;

/// The options `eval` and `sweep` set their text and windows by, as the forward pass's errors
/// name them.
pub(crate) const EVAL_FLAGS: Flags = Flags {
    text: "--text",
    bos: "--bos",
    ctx: "--ctx",
    tokens: "--tokens",
    offset: "--offset",
};

/// Which calibration passes a conversion of `groups` makes in `mode`: decided here, once, for
/// `convert`, `sweep` and the dev binary's benchmarks alike. One-shot calibration refits `o_proj`
/// from what its one pass keeps; sequential calibration runs the one-shot pass first only where
/// `budget:F` needs its spectra.
pub fn calibration_passes(mode: CalibrateMode, groups: &[GroupPlan]) -> Passes {
    let compensating = groups.iter().any(|g| g.compensate.is_some());
    let budgeted = groups.iter().any(|g| matches!(g.spec, Spec::Budget(_)));
    match mode {
        CalibrateMode::Sequential => Passes::Sequential {
            one_shot_first: budgeted,
        },
        CalibrateMode::OneShot if compensating => Passes::OneShotRefit,
        CalibrateMode::OneShot => Passes::OneShot,
    }
}

/// `--in` resolved (a download shows progress when `progress`) and opened; `--out` checked before
/// the input is opened (when the command writes one: `out` is the path and `--force`).
pub(crate) fn open_input(
    input: &str,
    revision: &str,
    progress: bool,
    out: Option<(&Path, bool)>,
) -> Result<(ResolvedInput, Option<OutTarget>, Checkpoint)> {
    let resolved = source::resolve(input, revision, progress)?;
    let out = match out {
        Some((out, force)) => Some(check_out_path(&resolved.dir, out, force)?),
        None => None,
    };
    let checkpoint = Checkpoint::open(&resolved.dir)?;
    Ok((resolved, out, checkpoint))
}

/// Sizes the global worker pool to `--threads`, when given (call once, before any work).
pub fn set_threads(threads: Option<NonZeroUsize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.get())
            .build_global()
            .map_err(|e| Error::usage("--threads", e.to_string()))?;
    }
    Ok(())
}

/// A progress bar of `len` steps drawn with `template` on stderr, or a hidden one when `show` is
/// false or stderr is not a terminal.
pub(crate) fn progress_bar(show: bool, len: u64, template: &str) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}
