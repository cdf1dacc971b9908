//! The quality check after a conversion: the input and the written output (still in its staging
//! directory) scored on the same held-out tokens by `eval`'s convention, so `surgery-convert eval`
//! on either model with the same text gives the same figure. The text is read and tokenized
//! before the conversion starts ([`prepare`]), so a bad `--check-text` fails before any work.

use crate::error::{Error, Result};
use crate::forward::score::{mean_nll, read_text, ScoredTokens};
use crate::forward::stream::TextSpan;
use crate::forward::windows::{text_per_window, Flags};
use crate::forward::Llama;
use crate::input::checkpoint::Checkpoint;
use crate::model::bos::BosToken;
use crate::options::TextWindow;
use crate::report::CheckRecord;
use indicatif::ProgressBar;
use std::path::Path;
use std::time::Instant;

/// The options the check's text and windows are set by (its windows are fixed: their errors
/// are the text's).
const CHECK_FLAGS: Flags = Flags {
    text: "--check-text",
    bos: "--bos",
    ctx: "--check-text",
    tokens: "--check-text",
    offset: "--check-text",
};

/// The check's tokens, chosen, tokenized and laid out in windows.
#[derive(Debug, Clone)]
pub struct PreparedCheck {
    window: TextWindow,
    ids: Vec<u32>,
    sha256: String,
    windows: usize,
    bos: Option<BosToken>,
    unknown_tokens: usize,
}

/// Reads and tokenizes the check's text with the tokenizer in `model_dir` and picks its tokens,
/// as `eval` does.
pub fn prepare(window: &TextWindow, model_dir: &Path) -> Result<PreparedCheck> {
    let span = TextSpan {
        offset: window.offset,
        tokens: window.tokens.get(),
    };
    let text = read_text(model_dir, &window.text, &CHECK_FLAGS, window.bos, span)?;
    let ctx = window.ctx.get();
    let per_window = text_per_window(ctx, text.bos_id());
    if text.total < window.offset.saturating_add(per_window) {
        return Err(Error::usage(
            "--check-text",
            format!(
                "{} has {} tokens, fewer than one window of {ctx}: give a longer held-out text",
                window.text, text.total
            ),
        ));
    }
    let windows = text
        .windows(window.offset, window.tokens.get(), ctx)
        .map_err(|e| match e {
            Error::Usage { message, .. } => {
                Error::usage("--check-text", format!("{}: {message}", window.text))
            }
            other => other,
        })?;
    Ok(PreparedCheck {
        window: window.clone(),
        ids: windows.ids,
        sha256: text.sha256,
        windows: windows.selection.windows,
        bos: text.bos,
        unknown_tokens: windows.unknown_tokens,
    })
}

/// Perplexity and predictions scored of `checkpoint` on the check's tokens.
fn perplexity(
    check: &PreparedCheck,
    checkpoint: &Checkpoint,
    bar: &ProgressBar,
) -> Result<(f64, usize)> {
    let llama = Llama::new(checkpoint)?;
    let (nll_mean, count) = mean_nll(&llama, &check.ids, check.window.ctx.get(), |_| bar.inc(1))?;
    Ok((nll_mean.exp(), count))
}

/// Scores `input` and the checkpoint written in `output_dir`; returns the record and its seconds.
pub fn run(
    check: &PreparedCheck,
    input: &Checkpoint,
    output_dir: &Path,
    bar: &ProgressBar,
) -> Result<(CheckRecord, f64)> {
    let started = Instant::now();
    bar.set_length(2 * input.config.num_layers as u64);
    let (input_perplexity, tokens) = perplexity(check, input, bar)?;
    let output = Checkpoint::open(output_dir)?;
    let (output_perplexity, _) = perplexity(check, &output, bar)?;
    bar.finish_and_clear();
    let record = CheckRecord {
        scored: ScoredTokens {
            text: check.window.text.to_string(),
            text_sha256: check.sha256.clone(),
            offset: check.window.offset,
            tokens,
            ctx: check.window.ctx.get(),
            windows: check.windows,
            bos: check.bos.clone(),
            unknown_tokens: check.unknown_tokens,
        },
        input_perplexity,
        output_perplexity,
        ratio: output_perplexity / input_perplexity,
    };
    Ok((record, started.elapsed().as_secs_f64()))
}
