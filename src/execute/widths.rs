//! The factored layout's width pass: every group's latent width decided before any fit runs, so the
//! layout (shapes, offsets, headers) can be planned first and the fits then run ahead of the write
//! pass, as for dense output, with nothing spilled.
//!
//! A rank SPEC (or a resolved budget) needs no computation. A threshold needs the spectrum: for the
//! weight-only fits it comes from the eigenvalues alone of the same Gram matrix the fit decomposes
//! ([`spectrum_owned`], without eigenvectors); where the threshold falls within [`MARGIN`] of a
//! component boundary (so the last bits of the eigenvalues could decide), and for fit `act`, whose
//! weighting is the fit's own, the fit itself is run for its spectrum. Each threshold is then
//! pinned to the rank found (`GroupPlan::resolved_rank`), so the fit of the write pass keeps
//! exactly the width the layout planned.

use super::group::{decompose_failure, fit_group, release_members, stack_group};
use super::FitInputs;
use crate::error::{Error, Result};
use crate::fit::decompose::{rank_for_threshold, Fit};
use crate::fit::spec::Spec;
use crate::fit::spectrum::spectrum_owned;
use crate::input::checkpoint::Checkpoint;
use crate::plan::GroupPlan;
use rayon::prelude::*;

/// How far a threshold must be from a cumulative ratio for the eigenvalue-only spectrum to decide
/// the rank: far above what a solver's rounding moves the ratios (about 1e-15).
const MARGIN: f64 = 1e-9;

/// Decides every group's latent width (in group order) and pins threshold SPECs to the rank it
/// implies; groups are examined in parallel. `progress` is told each finished group.
pub fn resolve_latents(
    checkpoint: &Checkpoint,
    groups: &mut [GroupPlan],
    inputs: &FitInputs,
    progress: &(impl Fn() + Sync),
) -> Result<Vec<usize>> {
    let resolved: Vec<Result<(Option<usize>, usize)>> = groups
        .par_iter()
        .map(|group| {
            let r = resolve(checkpoint, group, inputs);
            progress();
            r
        })
        .collect();
    let mut widths = Vec::with_capacity(groups.len());
    for (group, r) in groups.iter_mut().zip(resolved) {
        let (rank, width) = r?;
        if rank.is_some() {
            group.resolved_rank = rank;
        }
        widths.push(width);
    }
    Ok(widths)
}

/// One group: the rank a threshold resolves to (`None` for other SPECs) and the latent width.
fn resolve(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    inputs: &FitInputs,
) -> Result<(Option<usize>, usize)> {
    let spec = group.effective_spec();
    let (rows, cols) = stacked_shape(checkpoint, group)?;
    let weight_only = group.fit != Fit::Act;
    if let (Spec::Rank(n), true) = (spec, weight_only) {
        // Every weight-only spectrum has one ratio per dimension of the smaller side (as
        // `choose_rank` clamps a rank to it).
        let rank = n.min(rows.min(cols));
        return Ok((None, rank + group.fit.mean_dims()));
    }
    let Spec::Threshold(t) = spec else {
        // Fit `act` with a rank: the fit's own output gives the width.
        return Ok((None, full_fit(checkpoint, group, inputs, spec)?.1));
    };
    if weight_only {
        let (_, w) = stack_group(checkpoint, group)?;
        let ratios =
            spectrum_owned(w, group.fit).map_err(|e| decompose_failure(checkpoint, group, e));
        release_members(checkpoint, group);
        let ratios = ratios?;
        let rank = rank_for_threshold(&ratios, t);
        if clear_of_boundary(&ratios, t, rank) {
            return Ok((Some(rank), rank + group.fit.mean_dims()));
        }
    }
    let (rank, width) = full_fit(checkpoint, group, inputs, spec)?;
    Ok((Some(rank), width))
}

/// The fit itself (as the write pass would run it with `spec`): its rank and latent width.
fn full_fit(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    inputs: &FitInputs,
    spec: Spec,
) -> Result<(usize, usize)> {
    let (_, w) = stack_group(checkpoint, group)?;
    release_members(checkpoint, group);
    let d = fit_group(checkpoint, group, inputs, w, spec)?;
    Ok((d.choice.rank, d.factors.down.nrows()))
}

/// Whether threshold `t` lies more than [`MARGIN`] inside the component boundary `rank` falls on:
/// the cumulative ratio before the last kept component is below it and the one at it above it.
fn clear_of_boundary(ratios: &[f64], t: f64, rank: usize) -> bool {
    if t >= 1.0 {
        return true;
    }
    let mut cumulative = 0.0;
    let mut before = 0.0;
    for (i, r) in ratios.iter().enumerate().take(rank) {
        if i + 1 == rank {
            before = cumulative;
        }
        cumulative += r;
    }
    t - before > MARGIN && cumulative - t > MARGIN
}

/// `[rows, cols]` of the group's stacked matrix, from the member shapes.
fn stacked_shape(checkpoint: &Checkpoint, group: &GroupPlan) -> Result<(usize, usize)> {
    let first = group
        .members
        .first()
        .map(|&i| &checkpoint.tensors[i])
        .ok_or_else(|| Error::bug(format!("layer {}: a group without members", group.layer)))?;
    let rows = group
        .members
        .iter()
        .map(|&i| checkpoint.tensors[i].shape[0])
        .sum();
    Ok((rows, first.shape.get(1).copied().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_within_the_margin_are_not_clear() {
        let ratios = [0.5, 0.3, 0.2];
        // 0.6 lies between 0.5 and 0.8: rank 2, well clear.
        assert_eq!(rank_for_threshold(&ratios, 0.6), 2);
        assert!(clear_of_boundary(&ratios, 0.6, 2));
        // Exactly on a cumulative ratio, or a hair either side: the fit decides.
        assert!(!clear_of_boundary(&ratios, 0.8, 2));
        assert!(!clear_of_boundary(&ratios, 0.5 + 1e-12, 2));
        assert!(!clear_of_boundary(&ratios, 0.8 - 1e-12, 2));
        // The first component, and a threshold of 1 (every component).
        assert!(clear_of_boundary(&ratios, 0.3, 1));
        assert!(clear_of_boundary(&ratios, 1.0, 3));
    }
}
