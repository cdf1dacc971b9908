//! The `eval` subcommand: perplexity of a checkpoint (standard or factored) on a text file, with
//! this tool's own forward pass ([`crate::forward`]), reported as JSON on stdout; which tokens are
//! scored is [`crate::forward::score`]'s convention.

use crate::error::{Error, Result};
use crate::forward::score::{mean_nll, read_text, ScoredTokens};
use crate::forward::stream::TextSpan;
use crate::forward::Llama;
use crate::options::EvalOptions;
use serde::Serialize;
use std::time::Instant;

/// What `eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// MODEL as given.
    pub model: String,
    /// The text and the tokens scored.
    #[serde(flatten)]
    pub scored: ScoredTokens,
    /// `exp(nll_mean)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll_mean: f64,
    /// Wall time of the whole evaluation (loading, tokenizing, forward), seconds.
    pub seconds: f64,
    /// Of which the forward pass and the scoring (weights decoded layer by layer included),
    /// seconds.
    pub forward_seconds: f64,
    /// Worker threads used.
    pub threads: usize,
}

/// Runs `eval` and prints the report as JSON on stdout.
pub fn run(options: &EvalOptions) -> Result<()> {
    let started = Instant::now();
    let w = &options.window;
    let (ctx, tokens) = (w.ctx.get(), w.tokens.get());
    let (input, _, checkpoint) = super::open_input(&options.model, &options.revision, true, None)?;
    let llama = Llama::new(&checkpoint)?;
    let span = TextSpan {
        offset: w.offset,
        tokens,
    };
    let text = read_text(
        &input.dir,
        &w.text,
        &crate::commands::EVAL_FLAGS,
        w.bos,
        span,
    )?;
    let windows = text.windows(w.offset, tokens, ctx)?;

    let bar = super::progress_bar(
        true,
        llama.params().num_layers as u64,
        "eval: layer {pos}/{len} {wide_bar} {elapsed}",
    );
    let forward = Instant::now();
    let (nll_mean, count) = mean_nll(&llama, &windows.ids, ctx, |_| bar.inc(1))?;
    let forward_seconds = forward.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let report = EvalReport {
        model: options.model.clone(),
        scored: ScoredTokens {
            text: w.text.to_string(),
            text_sha256: text.sha256.clone(),
            offset: w.offset,
            tokens: count,
            ctx,
            windows: windows.selection.windows,
            bos: text.bos.clone(),
            unknown_tokens: windows.unknown_tokens,
        },
        perplexity: nll_mean.exp(),
        nll_mean,
        seconds: started.elapsed().as_secs_f64(),
        forward_seconds,
        threads: rayon::current_num_threads(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|source| Error::Json {
        path: w.text.to_string().into(),
        source,
    })?;
    println!("{json}");
    Ok(())
}
