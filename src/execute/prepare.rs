//! What the fits need before they run: the calibration statistics of fit `act` (the forward pass
//! over calibration text) and every `budget:F` SPEC resolved to per-group ranks. Sequential
//! calibration resolves the budgets on one-shot statistics first (the ranks must be known before
//! the compressed stream can run), then runs its own pass ([`super::sequential`]), which also
//! refits `o_proj` where `--compensate o_proj` asks (after the one-shot pass in one-shot mode).

use crate::error::Result;
use crate::execute::{spectra, FitInputs};
use crate::fit::budget;
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::options::{Allocation, CalibrateMode, Calibration};
use crate::plan::{GroupKind, GroupPlan, Share};

/// The statistics every fit of `groups` reads, with their `budget:F` SPECs resolved: one-shot
/// calibration (or none, for the weight-only fits), or sequential calibration after the budgets.
pub fn prepare_inputs(
    calibration: Option<&Calibration>,
    checkpoint: &Checkpoint,
    groups: &mut [GroupPlan],
) -> Result<FitInputs> {
    let sequential = calibration.is_some_and(|c| c.mode == CalibrateMode::Sequential);
    let compensating = groups.iter().any(|g| g.compensate.is_some());
    let budgeted = groups.iter().any(|g| matches!(g.spec, Spec::Budget(_)));
    let one_shot = match (sequential, budgeted) {
        (true, false) => FitInputs::default(),
        _ => fit_inputs(calibration, checkpoint, groups)?,
    };
    let sensitivity = calibration.filter(|c| c.allocation == Allocation::Sensitivity);
    resolve_budgets(checkpoint, groups, &one_shot, sensitivity)?;
    match calibration {
        Some(calibration) if sequential || compensating => {
            let one_shot = if sequential {
                FitInputs::default()
            } else {
                one_shot
            };
            super::sequential::sequential_inputs(checkpoint, calibration, groups, one_shot)
        }
        _ => Ok(one_shot),
    }
}

/// Calibration statistics for fit `act` (none for the weight-only fits), with the cross moments
/// that the shared latent groups among `groups` need.
pub fn fit_inputs(
    calibration: Option<&Calibration>,
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
) -> Result<FitInputs> {
    let Some(calibration) = calibration else {
        return Ok(FitInputs::default());
    };
    let mut pairs: Vec<(usize, usize)> = groups.iter().flat_map(GroupPlan::cross_pairs).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let scratch = crate::scratch::Scratch::new()?;
    let stats = crate::llama::calibrate::calibrate(checkpoint, calibration, &pairs, &scratch)?;
    Ok(FitInputs {
        covariances: Some(stats.covariances),
        cross: stats.cross,
        sequential: Vec::new(),
        compensated: Default::default(),
        weighting: calibration.weighting,
        attention: stats.attention,
        calibration: Some(stats.record),
        bases: Default::default(),
    })
}

/// Resolves every `budget:F` SPEC to per-group ranks: per group kind, the spectra of all its groups
/// are ranked together and the kind's budget is spent from the top (`budget::allocate`). With
/// `sensitivity` (`--budget-allocation sensitivity`, its calibration), the spectra are then scaled
/// by each group's measured sensitivity ([`super::sensitivity`]) and the budget spent again.
pub fn resolve_budgets(
    checkpoint: &Checkpoint,
    groups: &mut [GroupPlan],
    inputs: &FitInputs,
    sensitivity: Option<&Calibration>,
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
    if let Some(calibration) = sensitivity {
        let scales =
            super::sensitivity::sensitivities(checkpoint, calibration, &subset, &spectra, inputs)?;
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
