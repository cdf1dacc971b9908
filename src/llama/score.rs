//! Scoring text with the forward pass: choosing the tokens to evaluate ([`select`]), reading and
//! tokenizing the text ([`read_text`]), and the summed negative log-likelihood over windows
//! ([`negative_log_likelihood`], and [`negative_log_likelihood_edited`] for `sweep`).
//!
//! The convention is the interop suite's `perplexity()` (`tests/interop/common.py`): the whole
//! file is tokenized without special tokens; `ids[offset .. offset + tokens]` is cut into
//! `floor(tokens / ctx)` non-overlapping windows of `ctx` tokens (the remainder dropped), each
//! evaluated on its own from position 0 without BOS; every next-token prediction inside a window is
//! scored (`ctx - 1` per window); perplexity is `exp(total NLL / count)`.

use crate::error::{Error, Result};
use crate::input::text::TextSource;
use crate::llama::tokenize::TextTokenizer;
use crate::llama::{Layer, Llama};
use serde::Serialize;
use std::ops::Range;
use std::path::Path;

/// The token ids evaluated: `range` of the text's ids, `windows` windows of `ctx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Indices into the text's ids.
    pub range: Range<usize>,
    /// Number of windows.
    pub windows: usize,
}

/// Picks the ids to evaluate from a text of `total` tokens: up to `tokens` from `offset` on, in
/// whole windows of `ctx`. Errors name the option to change.
pub fn select(total: usize, offset: usize, tokens: usize, ctx: usize) -> Result<Selection> {
    if ctx == 0 {
        return Err(Error::usage("--ctx", "must be at least 1"));
    }
    if tokens < ctx {
        return Err(Error::usage(
            "--tokens",
            format!("{tokens} tokens make no window of --ctx {ctx}"),
        ));
    }
    let available = total.saturating_sub(offset);
    let windows = tokens.min(available) / ctx;
    if windows == 0 {
        return Err(Error::usage(
            "--offset",
            format!(
                "the text has {total} tokens; {available} remain after --offset {offset}, fewer than --ctx {ctx}"
            ),
        ));
    }
    Ok(Selection {
        range: offset..offset + windows * ctx,
        windows,
    })
}

/// Runs the layer-wise forward pass over `ids` in windows of `ctx` and returns the summed negative
/// log-likelihood and the number of predictions scored. `progress` is told each finished layer.
pub fn negative_log_likelihood(
    llama: &Llama<'_>,
    ids: &[u32],
    ctx: usize,
    progress: impl FnMut(usize),
) -> Result<(f64, usize)> {
    negative_log_likelihood_edited(llama, ids, ctx, |_| Ok(()), progress)
}

/// [`negative_log_likelihood`] with each layer passed to `edit` after decoding and before it is
/// applied (`sweep` swaps in reconstructed projections there), so only one edited layer exists at
/// a time.
pub fn negative_log_likelihood_edited(
    llama: &Llama<'_>,
    ids: &[u32],
    ctx: usize,
    mut edit: impl FnMut(&mut Layer) -> Result<()>,
    mut progress: impl FnMut(usize),
) -> Result<(f64, usize)> {
    let mut h = llama.embed(ids)?;
    let mut state = crate::llama::PassState::default();
    for index in 0..llama.params().num_layers {
        let mut layer = llama.layer(index)?;
        edit(&mut layer)?;
        layer.forward(&mut h, ctx, &mut state)?;
        drop(layer);
        progress(index);
    }
    llama.log_likelihood(h.as_ref(), ids, ctx)
}

/// Which tokens were scored, as `eval` and the quality check report them.
#[derive(Debug, Clone, Serialize)]
pub struct ScoredTokens {
    /// The text: a file as given, or `built-in:check`.
    pub text: String,
    /// SHA-256 of the text's bytes.
    pub text_sha256: String,
    /// First token scored (of the whole text's tokens).
    pub offset: usize,
    /// Next-token predictions scored: `windows * (ctx - 1)`.
    pub tokens: usize,
    /// Window length.
    pub ctx: usize,
    /// Windows scored.
    pub windows: usize,
}

/// The mean negative log-likelihood per scored token of `llama` on `ids` in windows of `ctx`,
/// and the number of predictions scored ([`negative_log_likelihood`]).
pub fn mean_nll(
    llama: &Llama<'_>,
    ids: &[u32],
    ctx: usize,
    progress: impl FnMut(usize),
) -> Result<(f64, usize)> {
    let (nll, count) = negative_log_likelihood(llama, ids, ctx, progress)?;
    Ok((nll / count.max(1) as f64, count))
}

/// A text read and tokenized for scoring.
#[derive(Debug, Clone)]
pub struct ScoredText {
    /// Every token of the text, without special tokens.
    pub ids: Vec<u32>,
    /// SHA-256 of the text's bytes.
    pub sha256: String,
}

/// Reads `source` (given as `option`) and tokenizes the whole text with the `tokenizer.json` in
/// `model_dir`, without special tokens.
pub fn read_text(model_dir: &Path, source: &TextSource, option: &str) -> Result<ScoredText> {
    let tokenizer = TextTokenizer::load(model_dir)?;
    let text = source.load(option)?;
    Ok(ScoredText {
        ids: tokenizer.encode(&text.text)?,
        sha256: text.sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_the_convention() {
        // 4096 tokens in windows of 512 from offset 0: 8 windows.
        assert_eq!(
            select(10_000, 0, 4096, 512).unwrap(),
            Selection {
                range: 0..4096,
                windows: 8
            }
        );
        // The remainder is dropped; the offset shifts the slice.
        assert_eq!(
            select(10_000, 7, 300, 64).unwrap(),
            Selection {
                range: 7..7 + 256,
                windows: 4
            }
        );
        // Fewer tokens in the text than asked: whole windows of what remains.
        assert_eq!(select(1000, 100, 4096, 256).unwrap().windows, 3);
    }

    #[test]
    fn selection_errors_name_the_option() {
        let msg = |r: Result<Selection>| r.unwrap_err().to_string();
        let option = |r: Result<Selection>| match r {
            Err(Error::Usage { option, .. }) => option,
            other => panic!("not a usage error: {other:?}"),
        };
        assert_eq!(option(select(100, 0, 100, 0)), "--ctx");
        assert_eq!(option(select(10_000, 0, 100, 512)), "--tokens");
        assert_eq!(option(select(600, 200, 4096, 512)), "--offset");
        assert!(msg(select(100, 0, 100, 0)).starts_with("--ctx"));
        assert!(msg(select(10_000, 0, 100, 512)).starts_with("--tokens"));
        let m = msg(select(600, 200, 4096, 512));
        assert!(m.starts_with("--offset") && m.contains("400 remain"), "{m}");
        assert!(msg(select(10, 20, 4096, 4)).contains("0 remain"));
    }
}
