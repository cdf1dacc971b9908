//! The token-window convention every pass over text shares (calibration, `eval`, the quality
//! check, `sweep`, the sensitivity probe, the compensation pass): how a text's tokens become the
//! windows of `ctx` positions the forward pass runs, each from position 0 and seeing nothing of
//! the others.
//!
//! - **No BOS** (the tokenizer adds none, or `--bos never`): a window is `ctx` consecutive text
//!   tokens; its first token is context only, the `ctx - 1` after it are predicted.
//! - **A BOS** (the tokenizer's post-processor adds one, or `--bos always`): a window is the BOS
//!   followed by the next `ctx - 1` text tokens, so windows do not overlap in text and every text
//!   token is predicted, the first one from the BOS alone.
//!
//! Either way a whole window scores `ctx - 1` predictions: [`crate::forward::Llama::log_likelihood`]
//! scores every next-token prediction inside the laid-out windows, BOS positions included as the
//! context they are.

use crate::error::{Error, Result};
use std::ops::Range;

/// The text tokens one window of `ctx` positions holds.
pub fn text_per_window(ctx: usize, bos: Option<u32>) -> usize {
    ctx.saturating_sub(usize::from(bos.is_some()))
}

/// The positions the forward pass runs over `text`: without `bos`, `text` itself; with it, `bos`
/// in front of every `ctx - 1` text tokens (the last window may be shorter). `ctx` must leave room
/// for a text token (see [`check_ctx`]).
pub fn lay_out(text: &[u32], ctx: usize, bos: Option<u32>) -> Vec<u32> {
    match bos {
        None => text.to_vec(),
        Some(bos) => {
            let per = text_per_window(ctx, Some(bos)).max(1);
            let mut ids = Vec::with_capacity(text.len() + text.len().div_ceil(per));
            for chunk in text.chunks(per) {
                ids.push(bos);
                ids.extend_from_slice(chunk);
            }
            ids
        }
    }
}

/// Refuses a window length that leaves no text token after the BOS, naming the window's option
/// `option` and the BOS's `bos_flag`.
pub fn check_ctx(ctx: usize, bos: Option<u32>, (option, bos_flag): (&str, &str)) -> Result<()> {
    match (ctx, bos) {
        (0, _) => Err(Error::usage(option, "must be at least 1")),
        (1, Some(_)) => Err(Error::usage(
            option,
            format!("windows start with the BOS token, so a window of 1 holds no text: give at least 2 (or {bos_flag} never)"),
        )),
        _ => Ok(()),
    }
}

/// The text tokens evaluated: `range` of the text's ids, cut into `windows` windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Indices into the text's ids.
    pub range: Range<usize>,
    /// Number of windows.
    pub windows: usize,
}

/// The options a pass's text and windows are set by, as its errors name them: the forward pass
/// spells no option itself; each command hands its own (`eval`'s `--text`, `--ctx`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// The text (`--text`, `--calibrate`).
    pub text: &'static str,
    /// Whether windows start with a BOS (`--bos`).
    pub bos: &'static str,
    /// The window length (`--ctx`).
    pub ctx: &'static str,
    /// How many text tokens (`--tokens`).
    pub tokens: &'static str,
    /// The first text token (`--offset`).
    pub offset: &'static str,
}

/// Picks the text tokens to evaluate from a text of `total` tokens: up to `tokens` from `offset`
/// on, in whole windows of `ctx` positions (`ctx - 1` text tokens each with a `bos`). Errors name
/// the option to change, as `flags` spell them.
pub fn select(
    total: usize,
    (offset, tokens, ctx): (usize, usize, usize),
    bos: Option<u32>,
    flags: &Flags,
) -> Result<Selection> {
    check_ctx(ctx, bos, (flags.ctx, flags.bos))?;
    let per = text_per_window(ctx, bos);
    let (ctx_flag, offset_flag) = (flags.ctx, flags.offset);
    if tokens < per {
        return Err(Error::usage(
            flags.tokens,
            format!("{tokens} tokens make no window of {ctx_flag} {ctx}"),
        ));
    }
    let available = total.saturating_sub(offset);
    let windows = tokens.min(available) / per;
    if windows == 0 {
        return Err(Error::usage(
            offset_flag,
            format!(
                "the text has {total} tokens; {available} remain after {offset_flag} {offset}, fewer than a window of {ctx_flag} {ctx} holds ({per})"
            ),
        ));
    }
    Ok(Selection {
        range: offset..offset + windows * per,
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: Flags = Flags {
        text: "--text",
        bos: "--bos",
        ctx: "--ctx",
        tokens: "--tokens",
        offset: "--offset",
    };

    #[test]
    fn selection_follows_the_convention() {
        // 4096 tokens in windows of 512 from offset 0: 8 windows.
        assert_eq!(
            select(10_000, (0, 4096, 512), None, &FLAGS).unwrap(),
            Selection {
                range: 0..4096,
                windows: 8
            }
        );
        // The remainder is dropped; the offset shifts the slice.
        assert_eq!(
            select(10_000, (7, 300, 64), None, &FLAGS).unwrap(),
            Selection {
                range: 7..7 + 256,
                windows: 4
            }
        );
        // Fewer tokens in the text than asked: whole windows of what remains.
        assert_eq!(
            select(1000, (100, 4096, 256), None, &FLAGS)
                .unwrap()
                .windows,
            3
        );
        // With a BOS a window holds ctx - 1 text tokens: 4096 tokens still make 8 windows of 512
        // positions, 4088 text tokens, every one of them predicted.
        assert_eq!(
            select(10_000, (0, 4096, 512), Some(2), &FLAGS).unwrap(),
            Selection {
                range: 0..4088,
                windows: 8
            }
        );
        assert_eq!(
            select(1000, (0, 1000, 2), Some(2), &FLAGS).unwrap().windows,
            1000
        );
    }

    #[test]
    fn selection_errors_name_the_option() {
        let msg = |r: Result<Selection>| r.unwrap_err().to_string();
        let option = |r: Result<Selection>| match r {
            Err(Error::Usage { option, .. }) => option,
            other => panic!("not a usage error: {other:?}"),
        };
        assert_eq!(option(select(100, (0, 100, 0), None, &FLAGS)), "--ctx");
        assert_eq!(option(select(100, (0, 100, 1), Some(1), &FLAGS)), "--ctx");
        assert_eq!(
            option(select(10_000, (0, 100, 512), None, &FLAGS)),
            "--tokens"
        );
        assert_eq!(
            option(select(600, (200, 4096, 512), None, &FLAGS)),
            "--offset"
        );
        assert!(msg(select(100, (0, 100, 0), None, &FLAGS)).starts_with("--ctx"));
        assert!(msg(select(100, (0, 100, 1), Some(1), &FLAGS)).contains("--bos never"));
        assert!(msg(select(10_000, (0, 100, 512), None, &FLAGS)).starts_with("--tokens"));
        let m = msg(select(600, (200, 4096, 512), None, &FLAGS));
        assert!(m.starts_with("--offset") && m.contains("400 remain"), "{m}");
        assert!(msg(select(10, (20, 4096, 4), None, &FLAGS)).contains("0 remain"));
    }

    #[test]
    fn windows_start_with_the_bos_and_never_overlap_in_text() {
        let text: Vec<u32> = (10..20).collect();
        // No BOS: the text itself, bit for bit.
        assert_eq!(lay_out(&text, 4, None), text);
        // BOS 1, windows of 4 positions: 3 text tokens each, the last window shorter.
        assert_eq!(
            lay_out(&text, 4, Some(1)),
            vec![1, 10, 11, 12, 1, 13, 14, 15, 1, 16, 17, 18, 1, 19]
        );
        assert_eq!(lay_out(&[], 4, Some(1)), Vec::<u32>::new());
        assert!(check_ctx(2, Some(1), ("--calib-ctx", "--bos")).is_ok());
        assert!(check_ctx(1, None, ("--calib-ctx", "--bos")).is_ok());
        let e = check_ctx(1, Some(1), ("--calib-ctx", "--bos"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--calib-ctx"), "{e}");
    }
}
