//! The quality check's record in `surgery.json` and its line in the summary: the input and the
//! output scored on the same held-out tokens, by `eval`'s convention.

use super::group_digits;
use crate::llama::score::ScoredTokens;
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
    /// broken; try --fit act`, then the time it took.
    pub fn summary_line(&self, calibrated: bool, seconds: Option<f64>) -> String {
        let text = if self.scored.text == "built-in:check" {
            "the built-in sample".to_string()
        } else {
            self.scored.text.clone()
        };
        let took = seconds.map_or(String::new(), |s| format!(" (checked in {s:.1}s)"));
        format!(
            "perplexity on {text} ({} tokens): {} -> {} ({}): {}{took}",
            group_digits(self.scored.tokens as u64),
            perplexity(self.input_perplexity),
            perplexity(self.output_perplexity),
            times(self.ratio),
            verdict(self.ratio, calibrated),
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
}
