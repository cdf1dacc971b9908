//! Every `budget:F` SPEC resolved to per-group ranks, before the plan: per group kind, the
//! spectra of all its groups (weight-only, or on the one-shot pass's statistics) ranked together
//! and the budget spent from the top ([`crate::fit::budget`]), optionally rescaled by measured
//! sensitivity ([`super::sensitivity`]).

use super::progress::Progress;
use super::text::CalibrationText;
use crate::error::Result;
use crate::execute::{spectra, FitInputs};
use crate::fit::budget;
use crate::fit::spec::Spec;
use crate::forward::Llama;
use crate::input::checkpoint::Checkpoint;
use crate::plan::{GroupKind, GroupPlan, Share};

/// Resolves every `budget:F` SPEC to per-group ranks: per group kind, the spectra of all its groups
/// are ranked together and the kind's budget is spent from the top (`budget::allocate`). With
/// `sensitivity` (`--budget-allocation sensitivity`, its calibration), the spectra are then scaled
/// by each group's measured sensitivity ([`super::sensitivity`], probed on `sensitivity`'s
/// text) and the budget spent again.
pub fn resolve_budgets(
    checkpoint: &Checkpoint,
    groups: &mut [GroupPlan],
    inputs: &FitInputs,
    sensitivity: Option<(&Llama, &CalibrationText, &dyn Progress)>,
) -> Result<()> {
    let budgeted: Vec<usize> = (0..groups.len())
        .filter(|&g| matches!(groups[g].spec, Spec::Budget(_)))
        .collect();
    if budgeted.is_empty() {
        return Ok(());
    }
    let mut subset: Vec<GroupPlan> = budgeted.iter().map(|&g| groups[g].clone()).collect();
    let spectra = spectra(checkpoint, &subset, inputs)?;
    allocate(checkpoint, &mut subset, &spectra);
    if let Some(probe) = sensitivity {
        let scales = super::sensitivity::sensitivities(probe, &subset, &spectra, inputs)?;
        let scaled: Vec<Vec<f64>> = spectra
            .iter()
            .zip(&scales)
            .map(|(s, k)| s.iter().map(|r| r * k).collect())
            .collect();
        allocate(checkpoint, &mut subset, &scaled);
    }
    for (&g, group) in budgeted.iter().zip(subset) {
        groups[g].resolved_rank = group.resolved_rank;
    }
    Ok(())
}

/// Sets every group's `resolved_rank` from `spectra` (`spectra[i]` group `i`'s), per group kind.
fn allocate(checkpoint: &Checkpoint, subset: &mut [GroupPlan], spectra: &[Vec<f64>]) {
    let mut kinds: Vec<GroupKind> = subset.iter().map(|g| g.kind).collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds {
        let members: Vec<usize> = (0..subset.len())
            .filter(|&i| subset[i].kind == kind)
            .collect();
        let Spec::Budget(fraction) = subset[members[0]].spec else {
            continue;
        };
        let widths: Vec<usize> = members
            .iter()
            .map(|&i| {
                subset[i]
                    .members
                    .iter()
                    .map(|&t| checkpoint.tensors[t].shape[0])
                    .sum()
            })
            .collect();
        // What a component costs in cached values, and what it is worth: a latent shared by G
        // layers is cached once and predicts G layers' outputs (its ratios are shares of all G
        // layers' energy); a shared basis is cached by each of its G layers.
        let costs: Vec<usize> = members
            .iter()
            .map(|&i| match subset[i].share {
                Some(Share::Basis) => subset[i].layers,
                _ => 1,
            })
            .collect();
        let kind_spectra: Vec<Vec<f64>> = members
            .iter()
            .map(|&i| {
                let worth = subset[i].layers as f64;
                spectra[i].iter().map(|r| r * worth).collect()
            })
            .collect();
        let mean_dims = subset[members[0]].fit.mean_dims() * costs.iter().sum::<usize>();
        let total = budget::total_components(&widths, fraction, 0).saturating_sub(mean_dims);
        for (&i, rank) in members
            .iter()
            .zip(budget::allocate_costed(&kind_spectra, &costs, total))
        {
            subset[i].resolved_rank = Some(rank);
        }
    }
}
