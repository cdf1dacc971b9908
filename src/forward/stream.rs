//! Tokenizing a text as it is read, only as far as a pass needs ([`encode_span`]), with the ids
//! tokenizing the whole text gives.
//!
//! The text is tokenized in windows. A window is the text from its *context* start (a paragraph
//! start some KiB before its new text) to what has been read, which runs some KiB past its *cut*
//! (its *lookahead*). A token belongs to the window its end falls in: after the previous window's
//! cut, at or before this one's. The cut is a paragraph break (after `\n\n`), else a line break,
//! else before a space, else a character boundary, in the second half of the window's new text:
//! so every token counted was tokenized with text on both sides of it, as in the whole text. The
//! last tokens before each cut are tokenized again by the next window, from its context start,
//! and must come out the same (ids and bytes): a tokenizer whose tokens depend on text further
//! away than that (none of the supported families' kinds on ordinary text, tested on the
//! repository's texts with windows of a few hundred bytes: `stream_tests.rs`) is caught there,
//! and [`encode_text`] tokenizes the whole text instead. Reading stops once the span's last
//! token is counted; signals are honoured between windows.

use crate::error::Result;
use crate::forward::tokenize::{TextTokenizer, Token};
use crate::input::text_file::TextReader;

/// The text tokens a pass reads: `tokens` from `offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextSpan {
    /// Tokens of the text before the first one read.
    pub offset: usize,
    /// Tokens read.
    pub tokens: usize,
}

impl TextSpan {
    /// One past the last token read.
    pub fn end(self) -> usize {
        self.offset.saturating_add(self.tokens)
    }
}

/// A span's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanIds {
    /// The text's tokens from the span's offset on (at most its `tokens`; fewer where the text
    /// ends first).
    pub ids: Vec<u32>,
    /// The text's tokens counted: all of them where it ends before the span does, else the
    /// span's end.
    pub total: usize,
}

impl SpanIds {
    /// The span of a whole text's tokens `all`.
    pub fn of(all: &[u32], span: TextSpan) -> Self {
        let total = all.len().min(span.end());
        SpanIds {
            ids: all[span.offset.min(total)..total].to_vec(),
            total,
        }
    }
}

/// Window sizes, in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// Smallest new text of a window.
    pub min: usize,
    /// Largest new text of a window.
    pub max: usize,
    /// Text before a window's new text, tokenized again.
    pub context: usize,
    /// Text after a window's cut, tokenized but not counted.
    pub lookahead: usize,
}

/// The sizes [`encode_span`] uses: windows of 64 KiB to 1 MiB of new text (memory holds one
/// window's tokens), 4 KiB of context and of lookahead (a few paragraphs: each window tokenizes
/// about 1% again).
const SIZES: Sizes = Sizes {
    min: 64 << 10,
    max: 1 << 20,
    context: 4 << 10,
    lookahead: 4 << 10,
};
/// Bytes of new text read per token still needed: more than tokenizers average on text (about 4
/// for English), so a pass's tokens usually come from one window.
const BYTES_PER_TOKEN: usize = 8;
/// Tokens before a cut that the next window must tokenize the same.
const CHECKED: usize = 4;

/// The tokens of `span` in the text `reader` reads, tokenized as the whole text would be; reads
/// no further than the window holding the span's last token. `None`: two windows disagreed on
/// the tokens at a cut; tokenize the whole text instead.
pub fn encode_span(
    tokenizer: &TextTokenizer,
    reader: &mut TextReader,
    span: TextSpan,
) -> Result<Option<SpanIds>> {
    encode_with(tokenizer, reader, span, SIZES)
}

/// The tokens of `span` in the text `open` reads, and the SHA-256 of the whole text's bytes:
/// streamed ([`encode_span`]; the rest of the text is read for the hash and the UTF-8 check, not
/// tokenized), or where two windows disagree, the whole text read again and tokenized at once.
pub fn encode_text(
    tokenizer: &TextTokenizer,
    open: &dyn Fn() -> Result<TextReader>,
    span: TextSpan,
) -> Result<(SpanIds, String)> {
    encode_text_with(tokenizer, open, span, SIZES)
}

/// [`encode_text`] with window sizes `sizes`.
pub(crate) fn encode_text_with(
    tokenizer: &TextTokenizer,
    open: &dyn Fn() -> Result<TextReader>,
    span: TextSpan,
    sizes: Sizes,
) -> Result<(SpanIds, String)> {
    let mut reader = open()?;
    if let Some(ids) = encode_with(tokenizer, &mut reader, span, sizes)? {
        return Ok((ids, reader.finish()?));
    }
    drop(reader);
    let (text, sha256) = open()?.read_all()?;
    Ok((SpanIds::of(&tokenizer.encode(&text)?, span), sha256))
}

/// [`encode_span`] with window sizes `sizes`.
pub(crate) fn encode_with(
    tokenizer: &TextTokenizer,
    reader: &mut TextReader,
    span: TextSpan,
    sizes: Sizes,
) -> Result<Option<SpanIds>> {
    let mut stream = Stream {
        tokenizer,
        sizes,
        span,
        text: String::new(),
        base: 0,
        cut: 0,
        tail: Vec::new(),
        counted: 0,
        ids: Vec::new(),
        ended: false,
    };
    while stream.counted < span.end() && !(stream.ended && stream.cut == stream.read_to()) {
        crate::interrupt::check()?;
        let remaining = span.end() - stream.counted;
        let want = remaining
            .saturating_mul(BYTES_PER_TOKEN)
            .clamp(sizes.min, sizes.max);
        if !stream.window(reader, want)? {
            return Ok(None);
        }
    }
    Ok(Some(SpanIds {
        ids: stream.ids,
        total: stream.counted,
    }))
}

/// The state between windows.
struct Stream<'a> {
    tokenizer: &'a TextTokenizer,
    sizes: Sizes,
    span: TextSpan,
    /// The text read and kept, from byte `base` of the text on.
    text: String,
    base: usize,
    /// Tokens ending at or before this byte of the text are counted.
    cut: usize,
    /// The last tokens counted (at most [`CHECKED`]), their bytes counted from the text's start.
    tail: Vec<Token>,
    /// Tokens counted.
    counted: usize,
    /// The counted tokens from the span's offset on.
    ids: Vec<u32>,
    /// The whole text has been read.
    ended: bool,
}

impl Stream<'_> {
    /// One past the last byte read.
    fn read_to(&self) -> usize {
        self.base + self.text.len()
    }

    /// Reads about `want` bytes past the cut and the lookahead, tokenizes the window and counts
    /// its tokens; `false` where it disagrees with the last window at the cut.
    fn window(&mut self, reader: &mut TextReader, want: usize) -> Result<bool> {
        let needed = self.cut - self.base + want + self.sizes.lookahead;
        while !self.ended && self.text.len() < needed {
            let more = needed - self.text.len();
            self.ended = !reader.read_into(&mut self.text, more)?;
        }
        let next = if self.ended {
            self.text.len()
        } else {
            let (lo, hi) = (self.cut - self.base, self.text.len() - self.sizes.lookahead);
            boundary(&self.text, lo + (hi - lo) / 2, hi)
        };
        let base = self.base;
        let tokens: Vec<Token> = self
            .tokenizer
            .encode_spans(&self.text)?
            .into_iter()
            .map(|t| Token {
                id: t.id,
                start: base + t.start,
                end: base + t.end,
            })
            .collect();
        if tokens.windows(2).any(|w| w[1].end < w[0].end) {
            return Ok(false);
        }
        let before = tokens.partition_point(|t| t.end <= self.cut);
        if tokens[before.saturating_sub(self.tail.len())..before] != self.tail[..] {
            return Ok(false);
        }
        for &token in &tokens[before..] {
            if self.counted >= self.span.end() || (!self.ended && token.end > base + next) {
                break;
            }
            if self.counted >= self.span.offset {
                self.ids.push(token.id);
            }
            self.counted += 1;
            if self.tail.len() == CHECKED {
                self.tail.remove(0);
            }
            self.tail.push(token);
        }
        self.cut = base + next;
        if !self.ended {
            self.keep_context();
        }
        Ok(true)
    }

    /// Drops the text the next window does not read: it starts at a paragraph (or line, or word)
    /// start about `context` bytes before the tail it checks and the cut.
    fn keep_context(&mut self) {
        let Some(first) = self.tail.first() else {
            // Nothing counted yet: the next window starts at the text's start again.
            return;
        };
        let target = first
            .start
            .min(self.cut)
            .saturating_sub(self.base + self.sizes.context);
        let start = if target == 0 {
            0
        } else {
            boundary(
                &self.text,
                target.saturating_sub(self.sizes.context),
                target,
            )
        };
        self.text.drain(..start);
        self.base += start;
    }
}

/// Whether `b` is ASCII whitespace.
fn space(b: u8) -> bool {
    b.is_ascii_whitespace()
}

/// The last place in `text` after `lo`, at or before `hi`, where tokenizers end a token: after a
/// paragraph break (`\n\n` followed by a non-space), else after a line break followed by a
/// non-space, else before a space that follows a non-space; else the last character boundary at
/// or before `hi` (all of them character boundaries: `\n` and spaces are single bytes).
fn boundary(text: &str, lo: usize, hi: usize) -> usize {
    let mut hi = hi.min(text.len());
    while !text.is_char_boundary(hi) {
        hi -= 1;
    }
    let b = text.as_bytes();
    let (mut line, mut word) = (None, None);
    for p in (lo + 1..=hi).rev() {
        let Some(&next) = b.get(p) else { continue };
        if space(next) {
            if !space(b[p - 1]) && next != b'\n' && word.is_none() {
                word = Some(p);
            }
            continue;
        }
        if b[p - 1] == b'\n' {
            if p >= 2 && b[p - 2] == b'\n' {
                return p;
            }
            line = line.or(Some(p));
        }
    }
    line.or(word).unwrap_or(hi)
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
