//! Parsing of the SPEC values given to `--q`, `--k`, `--v`, `--shared-kv` and `--separate`.
//!
//! A SPEC is an explained-variance threshold in (0, 1], a fixed rank written `rank:N`, or a budget
//! `budget:F`: keep the fraction F of the group kind's total rank (for K/V: of the K+V cache values)
//! over the whole model, distributed across layers by one global ranking of their spectra.

use std::fmt;
use std::str::FromStr;

/// How many components a fit keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spec {
    /// Keep the smallest count of components whose cumulative explained-variance ratio reaches this.
    Threshold(f64),
    /// Keep exactly this many components (clamped to the matrix's maximum rank).
    Rank(usize),
    /// Keep this fraction of the total output width over all layers, ranks allocated globally.
    Budget(f64),
}

impl FromStr for Spec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(f) = s.strip_prefix("budget:") {
            let f: f64 = f.parse().map_err(|_| {
                format!("`{s}`: a budget is a fraction in (0, 1], as in budget:0.5")
            })?;
            if !f.is_finite() || f <= 0.0 || f > 1.0 {
                return Err(format!(
                    "`{s}`: a budget must be a fraction in (0, 1], as in budget:0.5"
                ));
            }
            return Ok(Spec::Budget(f));
        }
        if let Some(n) = s.strip_prefix("rank:") {
            let n: i64 = n
                .parse()
                .map_err(|_| format!("`{s}`: rank must be a whole number, as in rank:32"))?;
            if n < 1 {
                return Err(format!("`{s}`: rank must be at least 1"));
            }
            let n = usize::try_from(n).map_err(|_| format!("`{s}`: rank is too large"))?;
            return Ok(Spec::Rank(n));
        }
        let t: f64 = s.parse().map_err(|_| {
            format!("`{s}` is neither a variance threshold in (0, 1] (e.g. 0.9) nor rank:N (e.g. rank:32)")
        })?;
        if !t.is_finite() || t <= 0.0 || t > 1.0 {
            return Err(format!(
                "`{s}`: a variance threshold must be a number in (0, 1], e.g. 0.9"
            ));
        }
        Ok(Spec::Threshold(t))
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Threshold(t) => write!(f, "{t}"),
            Spec::Rank(n) => write!(f, "rank:{n}"),
            Spec::Budget(x) => write!(f, "budget:{x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_thresholds_and_ranks() {
        assert_eq!("0.3".parse::<Spec>(), Ok(Spec::Threshold(0.3)));
        assert_eq!("1".parse::<Spec>(), Ok(Spec::Threshold(1.0)));
        assert_eq!("rank:8".parse::<Spec>(), Ok(Spec::Rank(8)));
        assert_eq!("rank:99999".parse::<Spec>(), Ok(Spec::Rank(99999)));
        assert_eq!("budget:0.25".parse::<Spec>(), Ok(Spec::Budget(0.25)));
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "0",
            "-0.5",
            "1.5",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "abc",
            "",
            "rank:0",
            "rank:-1",
            "rank:x",
            "rank:",
            "budget:0",
            "budget:1.5",
            "budget:x",
            "budget:nan",
        ] {
            assert!(bad.parse::<Spec>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["0.3", "1", "rank:12", "budget:0.5"] {
            let spec: Spec = s.parse().unwrap();
            assert_eq!(spec.to_string().parse::<Spec>().unwrap(), spec);
        }
    }
}
