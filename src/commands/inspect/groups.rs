//! Cross-layer sharing in weight space (`inspect --share-layers`): for groups of `G` adjacent
//! layers (the last group may be shorter), the components ONE basis for the stacked
//! `[W_k; W_v]` rows of the whole group needs for each share of its variance (weight-only `pca`,
//! rows of every layer stacked, as a conversion stacks one layer's), against the sum of the
//! group's per-layer shared K/V counts. Fewer components for the group than the sum means the
//! layers' K/V row spaces overlap.

use super::spectra::{counts, Counts, LayerCounts, THRESHOLDS};
use crate::error::Result;
use crate::execute::{spectra, FitInputs};
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::plan::{groups, layer_groups, GroupKind, GroupPlan, Share, Surgery};
use serde::Serialize;
use std::num::NonZeroUsize;

/// One group of adjacent layers.
#[derive(Debug, Clone, Serialize)]
pub struct LayerGroup {
    /// The layers, in order.
    pub layers: Vec<usize>,
    /// Components available: `min(rows of the stack, hidden)`.
    pub full_rank: usize,
    /// The stack of every layer's K and V rows, one basis.
    pub shared_kv: Counts,
    /// The sum of the layers' own shared K/V counts.
    pub per_layer_sum: Counts,
}

/// Every group of one size.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSize {
    /// `G`, layers per group.
    pub size: usize,
    /// The groups.
    pub groups: Vec<LayerGroup>,
    /// Summed over the groups.
    pub shared_kv: Counts,
    /// Summed over every layer (the same for every `G`).
    pub per_layer_sum: Counts,
}

/// Element-wise sum of counts.
fn sum<'a>(all: impl Iterator<Item = &'a Counts>) -> Counts {
    let mut out: Counts = THRESHOLDS.iter().map(|t| (t.to_string(), 0)).collect();
    for c in all {
        for (k, n) in c {
            *out.entry(k.clone()).or_insert(0) += n;
        }
    }
    out
}

/// The counts for every size in `sizes` (`per_layer`: the layers' own counts, by layer).
pub fn group_counts(
    checkpoint: &Checkpoint,
    sizes: &[NonZeroUsize],
    per_layer: &[LayerCounts],
) -> Result<Vec<GroupSize>> {
    let probe = Surgery {
        q: None,
        k: None,
        v: None,
        shared_kv: Some(Spec::Rank(1)),
        fit: Fit::Pca,
        sharing: None,
        compensate: None,
    };
    let layer_plans = groups(checkpoint, &probe);
    let mut out = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let members = layer_groups(checkpoint.config.num_layers, size);
        let plans: Vec<GroupPlan> = members
            .iter()
            .map(|layers| GroupPlan {
                layer: layers[0],
                layers: layers.len(),
                share: (layers.len() > 1).then_some(Share::Basis),
                kind: GroupKind::SharedKv,
                spec: Spec::Rank(1),
                resolved_rank: None,
                fit: Fit::Pca,
                members: layer_plans
                    .iter()
                    .filter(|p| layers.contains(&p.layer))
                    .flat_map(|p| p.members.iter().copied())
                    .collect(),
                compensate: None,
            })
            .collect();
        let spectra = spectra(checkpoint, &plans, &FitInputs::default())?;
        let groups: Vec<LayerGroup> = members
            .into_iter()
            .zip(spectra)
            .map(|(layers, spectrum)| LayerGroup {
                full_rank: spectrum.len(),
                shared_kv: counts(&spectrum),
                per_layer_sum: sum(layers
                    .iter()
                    .filter_map(|&l| per_layer.get(l))
                    .map(|c| &c.shared_kv)),
                layers,
            })
            .collect();
        out.push(GroupSize {
            size: size.get(),
            shared_kv: sum(groups.iter().map(|g| &g.shared_kv)),
            per_layer_sum: sum(groups.iter().map(|g| &g.per_layer_sum)),
            groups,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_per_threshold() {
        let a: Counts = [("0.5".to_string(), 2), ("0.9".to_string(), 5)].into();
        let b: Counts = [("0.5".to_string(), 1), ("0.9".to_string(), 4)].into();
        let s = sum([&a, &b].into_iter());
        assert_eq!((s["0.5"], s["0.9"], s["0.99"]), (3, 9, 0));
    }
}
