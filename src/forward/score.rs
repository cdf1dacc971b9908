//! Scoring text with the forward pass: reading and tokenizing the text ([`read_text`]), cutting
//! the tokens to evaluate into windows by the model's convention ([`ScoredText::windows`],
//! [`crate::forward::windows`]), and the summed negative log-likelihood over windows
//! ([`negative_log_likelihood`], and [`negative_log_likelihood_edited`] for `sweep`).
//!
//! The convention is the interop suite's `perplexity()` (`tests/interop/common.py`): the file is
//! tokenized without special tokens, as a whole ([`read_text`] streams it and stops after the
//! tokens a pass uses, with the same ids: [`crate::forward::stream`]); `tokens` text tokens from
//! `offset` on are cut into non-overlapping windows of `ctx` positions (the remainder dropped),
//! each evaluated on its own from position 0, each starting with the tokenizer's BOS where it adds
//! one; every text token after the first position is scored (`ctx - 1` per window); perplexity is
//! `exp(total NLL / count)`.

use crate::error::{Error, Result};
use crate::forward::chat::ChatTemplate;
use crate::forward::stream::{encode_text, TextSpan};
use crate::forward::tokenize::TextTokenizer;
use crate::forward::windows::{lay_out, select, Flags, Selection};
use crate::forward::{Layer, Llama};
use crate::input::text::{Builtin, Message, TextSource};
use crate::model::bos::{BosPolicy, BosToken};
use serde::Serialize;
use std::path::Path;

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
    let mut state = crate::forward::PassState::default();
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
    /// The token every window starts with (`null`: none, the windows are text alone).
    pub bos: Option<BosToken>,
    /// Text tokens of the windows that are the tokenizer's unknown token (`<unk>`): text the
    /// tokenizer cannot represent, which a perplexity says nothing about.
    pub unknown_tokens: usize,
}

impl ScoredTokens {
    /// The share of the scored text tokens that are unknown to the tokenizer.
    pub fn unknown_share(&self) -> f64 {
        let text = self.windows * self.ctx - self.windows * usize::from(self.bos.is_some());
        self.unknown_tokens as f64 / text.max(1) as f64
    }
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

/// A text read and tokenized for scoring, with the model's window convention.
#[derive(Debug, Clone)]
pub struct ScoredText {
    /// The text's tokens (without special tokens) of the span read, from its offset on.
    pub ids: Vec<u32>,
    /// The span read.
    pub span: TextSpan,
    /// The text's tokens counted: all of them where it ends before the span does, else the
    /// span's end (what the errors of [`ScoredText::windows`] and the callers report).
    pub total: usize,
    /// SHA-256 of the text's bytes.
    pub sha256: String,
    /// The token every window starts with.
    pub bos: Option<BosToken>,
    /// The tokenizer's unknown token, if it has one.
    pub unknown: Option<u32>,
    /// How the built-in calibration text's dialogue was written: `chat template` (the model's)
    /// or `plain text`; `None` for other texts.
    pub dialogue: Option<&'static str>,
    /// The options the text and its windows were set by, for the errors.
    pub flags: Flags,
}

/// The windows of a [`ScoredText`] to run: the laid-out positions and which text tokens they hold.
#[derive(Debug, Clone)]
pub struct TextWindows {
    /// The positions the forward pass runs (BOS included), windows of `ctx`.
    pub ids: Vec<u32>,
    /// The text tokens in them.
    pub selection: Selection,
    /// Of which unknown to the tokenizer.
    pub unknown_tokens: usize,
}

impl ScoredText {
    /// The text tokens `range` (indices among the whole text's tokens), which the span read must
    /// hold.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Result<&[u32]> {
        range
            .start
            .checked_sub(self.span.offset)
            .zip(range.end.checked_sub(self.span.offset))
            .and_then(|(a, b)| self.ids.get(a..b))
            .ok_or_else(|| {
                Error::bug(format!(
                    "text tokens {range:?} asked of the {} read from {}",
                    self.ids.len(),
                    self.span.offset
                ))
            })
    }

    /// The BOS id windows start with.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.id)
    }

    /// Up to `tokens` text tokens from `offset` on, in whole windows of `ctx` positions, laid out
    /// by the convention ([`crate::forward::windows`]). Errors name the options of `flags`. The
    /// span read must hold them.
    pub fn windows(&self, offset: usize, tokens: usize, ctx: usize) -> Result<TextWindows> {
        let selection = select(
            self.total,
            (offset, tokens, ctx),
            self.bos_id(),
            &self.flags,
        )?;
        let text = self.slice(selection.range.clone())?;
        Ok(TextWindows {
            ids: lay_out(text, ctx, self.bos_id()),
            unknown_tokens: self
                .unknown
                .map_or(0, |u| text.iter().filter(|&&t| t == u).count()),
            selection,
        })
    }
}

/// Reads `source` (given as `option`) and tokenizes it with the `tokenizer.json` in `model_dir`,
/// without special tokens, as far as `span` (the tokens a pass uses) reaches: the ids are the
/// whole text's; the rest is read for the SHA-256 but not tokenized. The windows' BOS is decided
/// by `bos`.
pub fn read_text(
    model_dir: &Path,
    source: &TextSource,
    flags: &Flags,
    bos: BosPolicy,
    span: TextSpan,
) -> Result<ScoredText> {
    let option = flags.text;
    let tokenizer = TextTokenizer::load(model_dir)?;
    let template = ChatTemplate::load(model_dir)?;
    let render = |c: &[&[Message]]| match &template {
        Some(t) => t.render_all(c),
        None => Err(Error::bug("no chat template to render with")),
    };
    let open = || source.open(option, template.is_some().then_some(&render as _));
    let (read, sha256) = encode_text(&tokenizer, &open, span)?;
    Ok(ScoredText {
        ids: read.ids,
        span,
        total: read.total,
        sha256,
        bos: tokenizer.bos(bos, flags.bos)?,
        unknown: tokenizer.unknown_id(),
        dialogue: matches!(source, TextSource::Builtin(Builtin::Calibration)).then_some(
            match template {
                Some(_) => "chat template",
                None => "plain text",
            },
        ),
        flags: *flags,
    })
}
