//! The quality check's record in `surgery.json` and its line in the summary: the input and the
//! output scored on the same held-out tokens, by `eval`'s convention.

use super::group_digits;
use crate::forward::score::ScoredTokens;
use serde::Serialize;

/// Both models' perplexity on the same tokens.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRecord {
    /// The text (`--check-text` as given, or `built-in:check`) and the tokens scored.
    #[serde(flatten)]
    pub scored: ScoredTokens,
    /// Perplexity of the input model.
    pub input_perplexity: f64,
    /// Perplexity of the output model.
    pub output_perplexity: f64,
    /// `output_perplexity / input_perplexity`.
    pub ratio: f64,
}

/// The share of unknown tokens above which a perplexity says nothing about the text: the
/// tokenizer could not represent it.
pub const UNKNOWN_MEANINGLESS: f64 = 0.1;

/// A warning line for `count` of `of` text tokens unknown to the tokenizer in `what`, if any.
pub fn unknown_warning(what: &str, count: usize, of: usize) -> Option<String> {
    (count > 0).then(|| {
        format!(
            "warning: {} of {} tokens of {what} ({:.1}%) are the tokenizer's unknown token: it cannot represent that text, and figures on it mean little; give text in the model's language and script",
            group_digits(count as u64),
            group_digits(of as u64),
            100.0 * count as f64 / of.max(1) as f64
        )
    })
}

/// What a ratio of perplexities means for a user, and what to try next (`calibrated`: the fit
/// was `act` already).
fn verdict(ratio: f64, calibrated: bool) -> String {
    let next = if calibrated {
        "try a larger budget"
    } else {
        "try --fit act"
    };
    match ratio {
        r if r < 1.05 => "within 5% of the input".into(),
        r if r < 1.25 => "slightly worse than the input".into(),
        r if r < 2.0 => "noticeably worse than the input".into(),
        r if r < 10.0 => format!("much worse than the input; {next}"),
        _ => format!("the model is broken; {next}"),
    }
}

/// A perplexity for people: one decimal below 100, whole and digit-grouped above.
fn perplexity(p: f64) -> String {
    if !p.is_finite() {
        return format!("{p}");
    }
    if p < 100.0 {
        format!("{p:.1}")
    } else {
        group_digits(p.round() as u64)
    }
}

/// A ratio: two decimals below 10, whole above.
fn times(r: f64) -> String {
    if r.is_finite() && r >= 10.0 {
        format!("x{}", group_digits(r.round() as u64))
    } else {
        format!("x{r:.2}")
    }
}

impl CheckRecord {
    /// `perplexity on the built-in sample (1,022 tokens): 21.8 -> 22,513 (x1031): the model is
    /// broken; try --fit act`, then the time it took; windows that start with a BOS say so, and a
    /// text the tokenizer cannot represent gets no verdict.
    pub fn summary_line(&self, calibrated: bool, seconds: Option<f64>) -> String {
        let text = if self.scored.text == "built-in:check" {
            "the built-in sample".to_string()
        } else {
            self.scored.text.clone()
        };
        let bos = self.scored.bos.as_ref().map_or(String::new(), |b| {
            format!(", each window after {}", b.token)
        });
        let took = seconds.map_or(String::new(), |s| format!(" (checked in {s:.1}s)"));
        let verdict = if self.scored.unknown_share() > UNKNOWN_MEANINGLESS {
            format!(
                "not meaningful: {:.0}% of the text is unknown to the tokenizer",
                100.0 * self.scored.unknown_share()
            )
        } else {
            verdict(self.ratio, calibrated)
        };
        format!(
            "perplexity on {text} ({} tokens{bos}): {} -> {} ({}): {verdict}{took}",
            group_digits(self.scored.tokens as u64),
            perplexity(self.input_perplexity),
            perplexity(self.output_perplexity),
            times(self.ratio),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(input: f64, output: f64) -> CheckRecord {
        CheckRecord {
            scored: ScoredTokens {
                text: "built-in:check".into(),
                text_sha256: String::new(),
                offset: 0,
                tokens: 1022,
                ctx: 512,
                windows: 2,
                bos: None,
                unknown_tokens: 0,
            },
            input_perplexity: input,
            output_perplexity: output,
            ratio: output / input,
        }
    }

    #[test]
    fn the_line_says_what_the_ratio_means() {
        assert_eq!(
            record(21.8, 22_513.0).summary_line(false, None),
            "perplexity on the built-in sample (1,022 tokens): 21.8 -> 22,513 (x1,033): the model is broken; try --fit act"
        );
        let good = record(20.0, 20.5).summary_line(true, Some(3.31));
        assert_eq!(
            good,
            "perplexity on the built-in sample (1,022 tokens): 20.0 -> 20.5 (x1.02): within 5% of the input (checked in 3.3s)"
        );
        assert!(record(20.0, 44.0)
            .summary_line(true, None)
            .ends_with("(x2.20): much worse than the input; try a larger budget"));
        assert!(record(20.0, 30.0)
            .summary_line(false, None)
            .ends_with("noticeably worse than the input"));
        assert!(record(20.0, 24.0)
            .summary_line(false, None)
            .ends_with("slightly worse than the input"));
        assert!(record(20.0, 400.0)
            .summary_line(true, None)
            .ends_with("the model is broken; try a larger budget"));
    }

    #[test]
    fn the_line_names_the_bos_and_refuses_a_verdict_on_unknown_text() {
        let mut r = record(20.0, 20.5);
        r.scored.bos = Some(crate::model::bos::BosToken {
            token: "<bos>".into(),
            id: 2,
            source: crate::model::bos::BosSource::PostProcessor,
        });
        assert!(r
            .summary_line(true, None)
            .starts_with("perplexity on the built-in sample (1,022 tokens, each window after <bos>): 20.0 -> 20.5"));
        // 2 windows of 511 text tokens with a BOS; 103 unknown is just over 10%.
        r.scored.unknown_tokens = 103;
        let line = r.summary_line(true, None);
        assert!(
            line.ends_with("(x1.02): not meaningful: 10% of the text is unknown to the tokenizer"),
            "{line}"
        );
        assert_eq!(unknown_warning("x", 0, 10), None);
        let w = unknown_warning("the calibration text", 5, 1000).unwrap();
        assert!(
            w.starts_with("warning: 5 of 1,000 tokens of the calibration text (0.5%)"),
            "{w}"
        );
    }
}
