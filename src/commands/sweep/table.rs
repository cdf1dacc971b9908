//! `sweep.md`: the sweep as a markdown table, base row first, then the configurations in sweep
//! order. Holds no times, so identical sweeps give identical bytes.

use crate::commands::sweep::record::{ConfigRecord, SweepReport};
use crate::report::group_digits;
use std::fmt::Write as _;

/// `a -> b (+x.y%)`.
fn change(before: u64, after: u64) -> String {
    if before == 0 {
        return format!("{} -> {}", group_digits(before), group_digits(after));
    }
    let pct = 100.0 * (after as f64 - before as f64) / before as f64;
    format!(
        "{} -> {} ({pct:+.1}%)",
        group_digits(before),
        group_digits(after)
    )
}

/// The ranks of each kind as `kind min/mean/max`.
fn ranks_summary(config: &ConfigRecord) -> String {
    config
        .ranks
        .iter()
        .map(|(kind, r)| format!("{kind} {}/{:.1}/{}", r.min, r.mean, r.max))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The markdown document.
pub fn markdown(report: &SweepReport) -> String {
    let t = &report.text;
    let mut s = String::new();
    let _ = writeln!(s, "# Sweep of {}\n", report.model.architecture);
    let _ = writeln!(s, "Command: `{}`\n", report.command);
    let _ = writeln!(
        s,
        "Perplexity on `{}` (SHA-256 `{}`): {} tokens scored from token {} in {} windows of {}, \
         as `surgery-convert eval` computes it. K/V values per token and parameters are those of the \
         factored form (`--emit factored`), over all {} layers; ranks are per layer (min/mean/max).\n",
        t.file,
        t.sha256,
        group_digits(t.tokens as u64),
        t.offset,
        t.windows,
        t.ctx,
        report.model.shape.num_layers,
    );
    if let Some(c) = &report.calibration {
        let _ = writeln!(
            s,
            "Fit `act` calibrated on `{}` (SHA-256 `{}`): {} tokens from token {}, windows of {}.\n",
            c.file, c.sha256, c.tokens, c.offset, c.ctx
        );
    }
    let _ = writeln!(
        s,
        "| config | ranks min/mean/max | K/V values per token | decomposed params | perplexity | ratio to base |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    let _ = writeln!(
        s,
        "| base | - | {} | - | {:.4} | 1.000 |",
        group_digits(report.base.kv_cache_values_per_token),
        report.base.perplexity
    );
    for c in &report.configs {
        let kv = c.kv_cache_values_per_token;
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {:.4} | {:.3} |",
            c.label,
            ranks_summary(c),
            change(kv.before, kv.after),
            change(c.params.before, c.params.after),
            c.perplexity,
            c.ratio_to_base
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_signed_percentages() {
        assert_eq!(change(11520, 877), "11,520 -> 877 (-92.4%)");
        assert_eq!(change(100, 100), "100 -> 100 (+0.0%)");
        assert_eq!(change(0, 5), "0 -> 5");
    }
}
