//! The spectra `inspect` reports: per layer, the explained-variance ratios of `k_proj` alone,
//! `v_proj` alone and the two stacked (the weight-only `pca` fit, exactly as a conversion computes
//! them), and the number of components each needs for a given share of its variance — the rank a
//! conversion with that threshold keeps.

use crate::error::{Error, Result};
use crate::execute::{spectra, FitInputs};
use crate::fit::decompose::{rank_for_threshold, Fit};
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::plan::{groups, GroupKind, Surgery};
use serde::Serialize;
use std::collections::BTreeMap;

/// The variance shares reported.
pub const THRESHOLDS: [f64; 3] = [0.5, 0.9, 0.99];

/// One layer's explained-variance ratios, each descending.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpectra {
    /// The layer.
    pub layer: usize,
    /// `k_proj` alone.
    pub k: Vec<f64>,
    /// `v_proj` alone.
    pub v: Vec<f64>,
    /// `[k_proj; v_proj]` stacked, one shared basis.
    pub shared_kv: Vec<f64>,
}

/// Every layer's spectra (fit `pca`), computed in parallel.
pub fn layer_spectra(checkpoint: &Checkpoint) -> Result<Vec<LayerSpectra>> {
    let probe = Some(Spec::Rank(1));
    let surgery = |k, v, shared_kv| Surgery {
        q: None,
        k,
        v,
        shared_kv,
        fit: Fit::Pca,
        sharing: None,
        compensate: None,
    };
    let mut all = groups(checkpoint, &surgery(probe, probe, None));
    all.extend(groups(checkpoint, &surgery(None, None, probe)));
    let ratios = spectra(checkpoint, &all, &FitInputs::default())?;
    let layers = checkpoint.config.num_layers;
    let mut out: Vec<LayerSpectra> = (0..layers)
        .map(|layer| LayerSpectra {
            layer,
            k: Vec::new(),
            v: Vec::new(),
            shared_kv: Vec::new(),
        })
        .collect();
    for (group, spectrum) in all.iter().zip(ratios) {
        let l = out
            .get_mut(group.layer)
            .ok_or_else(|| Error::bug(format!("layer {} out of range", group.layer)))?;
        match group.kind {
            GroupKind::K => l.k = spectrum,
            GroupKind::V => l.v = spectrum,
            GroupKind::SharedKv => l.shared_kv = spectrum,
            GroupKind::Q => {}
        }
    }
    Ok(out)
}

/// Components needed per threshold, keyed by the threshold as written (`"0.9"`).
pub type Counts = BTreeMap<String, usize>;

/// The components `spectrum` needs for each of [`THRESHOLDS`].
pub fn counts(spectrum: &[f64]) -> Counts {
    THRESHOLDS
        .iter()
        .map(|&t| (t.to_string(), rank_for_threshold(spectrum, t)))
        .collect()
}

/// Element-wise sum of two counts.
fn add(a: &Counts, b: &Counts) -> Counts {
    a.iter()
        .map(|(k, n)| (k.clone(), n + b.get(k).copied().unwrap_or(0)))
        .collect()
}

/// Components available per matrix.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FullRank {
    /// `k_proj`.
    pub k: usize,
    /// `v_proj`.
    pub v: usize,
    /// The stack.
    pub shared_kv: usize,
}

/// One layer's counts.
#[derive(Debug, Clone, Serialize)]
pub struct LayerCounts {
    /// The layer.
    pub layer: usize,
    /// Components available.
    pub full_rank: FullRank,
    /// `k_proj` alone.
    pub k: Counts,
    /// `v_proj` alone.
    pub v: Counts,
    /// `k + v`: what separate fits cache per token.
    pub separate: Counts,
    /// The stack with one shared basis: what the shared latent caches per token.
    pub shared_kv: Counts,
}

/// The counts of one layer's spectra.
pub fn layer_counts(s: &LayerSpectra) -> LayerCounts {
    let (k, v) = (counts(&s.k), counts(&s.v));
    LayerCounts {
        layer: s.layer,
        full_rank: FullRank {
            k: s.k.len(),
            v: s.v.len(),
            shared_kv: s.shared_kv.len(),
        },
        separate: add(&k, &v),
        k,
        v,
        shared_kv: counts(&s.shared_kv),
    }
}

/// Sums over layers.
#[derive(Debug, Clone, Serialize)]
pub struct TotalCounts {
    /// `k_proj` alone.
    pub k: Counts,
    /// `v_proj` alone.
    pub v: Counts,
    /// Separate fits, K plus V.
    pub separate: Counts,
    /// Shared K/V.
    pub shared_kv: Counts,
}

/// The sums of `layers`' counts.
pub fn totals(layers: &[LayerCounts]) -> TotalCounts {
    let zero: Counts = THRESHOLDS.iter().map(|t| (t.to_string(), 0)).collect();
    let sum = |pick: fn(&LayerCounts) -> &Counts| {
        layers
            .iter()
            .fold(zero.clone(), |acc, l| add(&acc, pick(l)))
    };
    TotalCounts {
        k: sum(|l| &l.k),
        v: sum(|l| &l.v),
        separate: sum(|l| &l.separate),
        shared_kv: sum(|l| &l.shared_kv),
    }
}

/// Running sums of a spectrum: the variance kept by the first `i + 1` components.
pub fn cumulative(spectrum: &[f64]) -> Vec<f64> {
    spectrum
        .iter()
        .scan(0.0, |acc, r| {
            *acc += r;
            Some(*acc)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_threshold_rule() {
        let s = LayerSpectra {
            layer: 3,
            k: vec![0.625, 0.3125, 0.03125, 0.03125],
            v: vec![0.25, 0.25, 0.25, 0.25],
            shared_kv: vec![0.5, 0.375, 0.1171875, 0.0078125],
        };
        let c = layer_counts(&s);
        assert_eq!(c.k["0.5"], 1);
        assert_eq!(c.k["0.9"], 2);
        assert_eq!(c.k["0.99"], 4);
        assert_eq!(c.v["0.5"], 2);
        assert_eq!(c.separate["0.5"], 3);
        assert_eq!(c.shared_kv["0.5"], 1);
        assert_eq!(c.shared_kv["0.9"], 3);
        assert_eq!(c.shared_kv["0.99"], 3);
        assert_eq!(c.full_rank.shared_kv, 4);
        let t = totals(&[c.clone(), c]);
        assert_eq!(t.separate["0.9"], 2 * (2 + 4));
        let cum = cumulative(&s.k);
        assert_eq!(cum, [0.625, 0.9375, 0.96875, 1.0]);
    }
}
