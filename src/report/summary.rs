//! The human summary of a conversion, printed on stderr: one row per layer, then the totals, the
//! clamped ranks, and where the output went.

use super::check::unknown_warning;
use super::{group_digits, Report};
use crate::plan::Emit;
use std::fmt::Write as _;

/// `100 * (b - a) / a`, or 0 for `a == 0`.
fn percent_change(a: u64, b: u64) -> f64 {
    if a == 0 {
        0.0
    } else {
        100.0 * (b as f64 - a as f64) / a as f64
    }
}

impl Report {
    /// The human summary: one row per layer, then totals.
    pub fn summary(&self, seconds: f64, out: Option<&str>) -> String {
        let mut s = self.layer_table();
        self.write_totals(&mut s);
        for g in self
            .layers
            .iter()
            .flat_map(|l| &l.groups)
            .filter(|g| g.rank_clamped)
        {
            let _ = writeln!(
                s,
                "note: layer {} {}: {} exceeds the maximum rank {}; clamped",
                g.layer, g.kind, g.spec, g.full_rank
            );
        }
        if !self.compensated.is_empty() {
            let _ = writeln!(s, "{}", self.compensation_line());
        }
        if let Some(c) = &self.options.calibration {
            if let Some(w) = unknown_warning("the calibration text", c.unknown_tokens, c.tokens) {
                let _ = writeln!(s, "{w}");
            }
        }
        if let Some(check) = &self.check {
            let sc = &check.scored;
            let text = sc.windows * (sc.ctx - usize::from(sc.bos.is_some()));
            if let Some(w) = unknown_warning("the held-out text", sc.unknown_tokens, text) {
                let _ = writeln!(s, "{w}");
            }
            let calibrated = self.options.calibration.is_some();
            let _ = writeln!(s, "{}", check.summary_line(calibrated, self.timings.check));
        } else if out.is_some() && self.options.calibration.is_none() {
            let _ = writeln!(
                s,
                "perplexity not checked (off for weight-only fits): add --check to score the input and the output on the built-in sample"
            );
        }
        let _ = writeln!(s, "{}", self.timing_line());
        match out {
            Some(out) => {
                let bytes: u64 = self.output.weight_files.iter().map(|f| f.bytes).sum();
                let _ = writeln!(
                    s,
                    "wrote {out} ({} weight files, {} bytes) in {seconds:.2}s",
                    self.output.weight_files.len(),
                    group_digits(bytes)
                );
            }
            None => {
                let _ = writeln!(s, "dry run: nothing written ({seconds:.2}s)");
            }
        }
        s
    }

    /// Where the time went: calibration (or the budgets' spectra), the write pass, the fits inside
    /// it (summed over the threads that ran them); the check's line has its own.
    fn timing_line(&self) -> String {
        let t = &self.timings;
        let fits: f64 = self
            .layers
            .iter()
            .flat_map(|l| &l.groups)
            .map(|g| g.seconds)
            .sum();
        let mut parts = Vec::new();
        if self.options.calibration.is_some() {
            parts.push(format!("calibration {:.2}s", t.prepare));
        } else if t.prepare >= 0.005 {
            parts.push(format!("budget spectra {:.2}s", t.prepare));
        }
        parts.push(format!("fits {fits:.2}s (summed over threads)"));
        if let Some(write) = t.write {
            parts.push(format!("write pass {write:.2}s (the fits run inside it)"));
        }
        format!("time: {}", parts.join(", "))
    }

    /// What `--compensate o_proj` rewrote: how many tensors, by how much, and the attention output
    /// error on the calibration tokens before and after (means over the layers).
    fn compensation_line(&self) -> String {
        let n = self.compensated.len();
        let mean = |f: fn(&crate::execute::CompensationReport) -> f64| {
            self.compensated.iter().map(f).sum::<f64>() / n.max(1) as f64
        };
        format!(
            "o_proj compensated in {n} layers (changed by {:.3} relative): attention output error on the calibration tokens {:.4} -> {:.4} (mean)",
            mean(|c| c.relative_change),
            mean(|c| c.calibration_error_before),
            mean(|c| c.calibration_error_after)
        )
    }

    /// The header and one row per layer: each kind's rank and variance kept, the largest error,
    /// the K/V values cached per token.
    fn layer_table(&self) -> String {
        let kinds: Vec<&str> = ["q", "k", "v", "shared_kv"]
            .into_iter()
            .filter(|k| {
                self.layers
                    .iter()
                    .any(|l| l.groups.iter().any(|g| g.kind == *k))
            })
            .collect();
        let mut s = String::new();
        let _ = write!(s, "{:>5}", "layer");
        for k in &kinds {
            let _ = write!(s, "  {:>22}", format!("{k} rank (var kept)"));
        }
        let _ = writeln!(s, "  {:>9}  {:>14}", "max err", "kv/token");
        for l in &self.layers {
            let _ = write!(s, "{:>5}", l.layer);
            let mut max_err = 0.0f64;
            for k in &kinds {
                match l.groups.iter().find(|g| g.kind == *k) {
                    Some(g) => {
                        max_err = max_err.max(g.relative_error);
                        let _ = write!(
                            s,
                            "  {:>22}",
                            format!("{}/{} ({:.3})", g.rank, g.full_rank, g.variance_kept)
                        );
                    }
                    None => {
                        // A later layer of a group spanning several layers points at its first.
                        let shared = self
                            .layers
                            .iter()
                            .flat_map(|o| &o.groups)
                            .find(|g| g.kind == *k && g.covers(l.layer));
                        let cell = shared.map_or("-".to_string(), |g| {
                            format!("{} of layer {}", g.share.unwrap_or("shared"), g.layer)
                        });
                        let _ = write!(s, "  {:>22}", cell);
                    }
                }
            }
            let kv = l.kv_cache_values_per_token;
            let _ = writeln!(
                s,
                "  {:>9.4}  {:>14}",
                max_err,
                format!("{} -> {}", kv.before, kv.after)
            );
        }
        s
    }

    /// The totals: decompositions, KV cache and parameters (and for the factored form, the model).
    fn write_totals(&self, s: &mut String) {
        let t = &self.totals;
        let kv = t.kv_cache_values_per_token;
        let factored = self.output.emit == Emit::Factored.name();
        let _ = writeln!(
            s,
            "{} decompositions (fit {}, emit {})",
            t.decompositions, self.options.fit, self.output.emit
        );
        let _ = writeln!(
            s,
            "KV cache per token{}: {} -> {} values ({:+.1}%); decomposed params{}: {} -> {} ({:+.1}%)",
            if factored { "" } else { " if factored" },
            group_digits(kv.before),
            group_digits(kv.after),
            percent_change(kv.before, kv.after),
            if factored { "" } else { " if factored" },
            group_digits(t.params.before),
            group_digits(t.params.after),
            percent_change(t.params.before, t.params.after),
        );
        if factored {
            let _ = writeln!(
                s,
                "model: {} -> {} parameters, {} -> {} bytes of weights ({:+.1}%)",
                group_digits(t.model_params.before),
                group_digits(t.model_params.after),
                group_digits(t.model_bytes.before),
                group_digits(t.model_bytes.after),
                percent_change(t.model_bytes.before, t.model_bytes.after),
            );
        }
    }
}
