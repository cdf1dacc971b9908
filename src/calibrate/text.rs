//! The calibration text of a run, read and tokenized once: `--calib-tokens` text tokens of
//! `--calibrate` (or the built-in text) from `--calib-offset` on, laid out in windows of
//! `--calib-ctx` by the model's convention ([`crate::forward::windows`]), and their provenance.
//! Every pass of the stage (one-shot, refit, sequential, sensitivity probes) reads these ids.

use crate::error::{Error, Result};
use crate::execute::CalibrationRecord;
use crate::forward::score::read_text;
use crate::forward::stream::TextSpan;
use crate::forward::windows::{check_ctx, lay_out, Flags};
use crate::input::checkpoint::Checkpoint;
use crate::options::{Allocation, BosSink, Calibration};
use std::cell::Cell;

/// The options the calibration text and windows are set by.
const FLAGS: Flags = Flags {
    text: "--calibrate",
    bos: "--bos",
    ctx: "--calib-ctx",
    tokens: "--calib-tokens",
    offset: "--calib-offset",
};

thread_local! {
    /// Calibration texts tokenized on this thread (the stage's tests count them).
    static TOKENIZED: Cell<usize> = const { Cell::new(0) };
}

/// Calibration texts tokenized so far on the calling thread.
pub fn tokenized_on_this_thread() -> usize {
    TOKENIZED.with(Cell::get)
}

/// The calibration positions and their provenance.
#[derive(Debug, Clone)]
pub struct CalibrationText {
    /// Every window's ids, windows back to back (each `ctx` positions but the last).
    pub ids: Vec<u32>,
    /// Where they came from (`surgery.json`'s `calibration`).
    pub record: CalibrationRecord,
    /// Whether windows start with a BOS whose keys and values the fits keep exactly.
    pub pinned_sink: bool,
}

impl CalibrationText {
    /// Reads and tokenizes `calibration`'s text with `checkpoint`'s tokenizer.
    pub fn load(checkpoint: &Checkpoint, calibration: &Calibration) -> Result<CalibrationText> {
        TOKENIZED.with(|n| n.set(n.get() + 1));
        let source = &calibration.text;
        let (offset, wanted) = (calibration.offset, calibration.tokens.get());
        let span = TextSpan {
            offset,
            tokens: wanted,
        };
        let text = read_text(&checkpoint.dir, source, &FLAGS, calibration.bos, span)?;
        let ctx = calibration.ctx.get();
        check_ctx(ctx, text.bos_id(), (FLAGS.ctx, FLAGS.bos))?;
        let end = offset
            .checked_add(wanted)
            .filter(|&e| e <= text.total)
            .ok_or_else(|| {
                Error::usage(
                    "--calib-tokens",
                    format!(
                        "{source} has {} tokens; --calib-offset {offset} + --calib-tokens {wanted} exceeds it",
                        text.total
                    ),
                )
            })?;
        let used = text.slice(offset..end)?;
        let unknown_tokens = text
            .unknown
            .map_or(0, |u| used.iter().filter(|&&t| t == u).count());
        let ids = lay_out(used, ctx, text.bos_id());
        let tokens = used.len();
        let pinned_sink = text.bos.is_some() && calibration.sink == BosSink::Exact;
        let record = CalibrationRecord {
            file: source.to_string(),
            sha256: text.sha256,
            offset,
            tokens,
            ctx,
            bos_sink: text.bos.as_ref().map(|_| calibration.sink.name()),
            bos: text.bos,
            unknown_tokens,
            dialogue: text.dialogue,
            mode: None,
            allocation: (calibration.allocation == Allocation::Sensitivity)
                .then(|| calibration.allocation.name()),
        };
        Ok(CalibrationText {
            ids,
            record,
            pinned_sink,
        })
    }

    /// The window length.
    pub fn ctx(&self) -> usize {
        self.record.ctx
    }
}
