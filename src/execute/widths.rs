//! The factored layout's width pass: every group's latent width decided before any fit runs, so the
//! layout (shapes, offsets, headers) can be planned first and the fits then run ahead of the write
//! pass, as for dense output, with nothing spilled.
//!
//! A rank SPEC (or a resolved budget) needs no computation. A threshold needs the spectrum: for the
//! weight-only fits the width pass runs the fit's decomposing half ([`fit_basis`]: centring, Gram
//! matrix, eigendecomposition), and for fit `act`, whose weighting is the fit's own, the whole fit.
//! Each threshold is then pinned to the rank found (`GroupPlan::resolved_rank`), so the fit of the
//! write pass keeps exactly the width the layout planned; the weight-only bases are handed to it
//! ([`super::kept_bases::KeptBases`], up to [`super::kept_bases::KEPT_BYTES`]), so it only finishes them instead of decomposing again.

use super::group::{decompose_failure, fit_group, release_members, stack_group};
use super::FitInputs;
use crate::error::{Error, Result};
use crate::fit::basis::fit_basis;
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::plan::GroupPlan;
use rayon::prelude::*;

/// Decides every group's latent width (in group order) and pins threshold SPECs to the rank it
/// implies; groups are examined in parallel, and their weight-only bases kept in `inputs.bases`.
/// `progress` is told each finished group.
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
    match (spec, weight_only) {
        (Spec::Rank(n), true) => {
            // Every weight-only spectrum has one ratio per dimension of the smaller side (as
            // `choose_rank` clamps a rank to it).
            let rank = n.min(rows.min(cols));
            Ok((None, rank + group.fit.mean_dims()))
        }
        (Spec::Threshold(_), true) => {
            let (_, w) = stack_group(checkpoint, group)?;
            let basis =
                fit_basis(w, group.fit, spec).map_err(|e| decompose_failure(checkpoint, group, e));
            release_members(checkpoint, group);
            let basis = basis?;
            let rank = basis.rank();
            inputs.bases.offer(group.members[0], basis);
            Ok((Some(rank), rank + group.fit.mean_dims()))
        }
        (Spec::Threshold(_), false) => {
            let (rank, width) = full_fit(checkpoint, group, inputs, spec)?;
            Ok((Some(rank), width))
        }
        // Fit `act` with a rank: the fit's own output gives the width.
        _ => Ok((None, full_fit(checkpoint, group, inputs, spec)?.1)),
    }
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
