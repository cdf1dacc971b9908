//! What the fits need before they run: the calibration statistics of fit `act` (the forward pass
//! over calibration text) and every `budget:F` SPEC resolved to per-group ranks.

use crate::error::Result;
use crate::execute::{spectra, FitInputs};
use crate::fit::budget;
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::options::Calibration;
use crate::plan::{GroupKind, GroupPlan};

/// Calibration statistics for fit `act` (none for the weight-only fits).
pub fn fit_inputs(calibration: Option<&Calibration>, checkpoint: &Checkpoint) -> Result<FitInputs> {
    let Some(calibration) = calibration else {
        return Ok(FitInputs::default());
    };
    let stats = crate::llama::calibrate::calibrate(checkpoint, calibration)?;
    Ok(FitInputs {
        covariances: Some(stats.covariances),
        weighting: calibration.weighting,
        calibration: Some(stats.record),
    })
}

/// Resolves every `budget:F` SPEC to per-group ranks: per group kind, the spectra of all its groups
/// are ranked together and the kind's budget is spent from the top (`budget::allocate`).
pub fn resolve_budgets(
    checkpoint: &Checkpoint,
    groups: &mut [GroupPlan],
    inputs: &FitInputs,
) -> Result<()> {
    let budgeted: Vec<usize> = (0..groups.len())
        .filter(|&g| matches!(groups[g].spec, Spec::Budget(_)))
        .collect();
    if budgeted.is_empty() {
        return Ok(());
    }
    let subset: Vec<GroupPlan> = budgeted.iter().map(|&g| groups[g].clone()).collect();
    let spectra = spectra(checkpoint, &subset, inputs)?;
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
        let total = budget::total_components(&widths, fraction, subset[members[0]].fit.mean_dims());
        let kind_spectra: Vec<Vec<f64>> = members.iter().map(|&i| spectra[i].clone()).collect();
        for (&i, rank) in members.iter().zip(budget::allocate(&kind_spectra, total)) {
            groups[budgeted[i]].budget_rank = Some(rank);
        }
    }
    Ok(())
}
