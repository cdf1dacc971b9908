//! One group's fit: its members decoded and stacked, fitted (weight-only or activation-aware),
//! encoded in the output form, and measured (errors as written, sizes) into its report.

use super::weighting::layer_weight;
use super::{FitInputs, GroupReport};
use crate::error::{Error, Result};
use crate::fit::act::{check_inputs, decompose_spectrum, spectrum_of};
use crate::fit::compensate::compensate;
use crate::fit::decompose::{
    count_non_finite, decompose_owned, decompose_with_basis, error_ratio, product, DecomposeError,
    Decomposition, Fit,
};
use crate::fit::spec::Spec;
use crate::input::checkpoint::{Checkpoint, TensorEntry};
use crate::model::dtype::FloatType;
use crate::plan::{Emit, GroupPlan};
use faer::Mat;
use indicatif::ProgressBar;
use rayon::prelude::*;

/// Decodes and stacks a group's members straight into one matrix: the types and the matrix.
/// The members' pages stay mapped: the caller releases them after its last read.
pub(crate) fn stack_group(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
) -> Result<(Vec<FloatType>, Mat<f64>)> {
    let mut types = Vec::with_capacity(group.members.len());
    let cols = checkpoint.tensors[group.members[0]].shape[1];
    let rows: usize = group
        .members
        .iter()
        .map(|&i| checkpoint.tensors[i].shape[0])
        .sum();
    let mut w = Mat::<f64>::zeros(rows, cols);
    let mut row0 = 0;
    for &i in &group.members {
        let t = &checkpoint.tensors[i];
        let ft = checkpoint.float_type(t, "decomposed")?;
        types.push(ft);
        ft.decode_into(
            checkpoint.bytes(t),
            w.as_mut().subrows_mut(row0, t.shape[0]),
        );
        // Checked per member, so the message names the tensor as the file stores it (a fused
        // one with the part's rows); the fit checks the stack again.
        let bad = count_non_finite(w.as_ref().subrows(row0, t.shape[0]));
        if bad > 0 {
            return Err(checkpoint.tensor_error(
                t,
                format!(
                    "layer {}: {bad} non-finite values (NaN or infinite); a matrix to decompose must be finite",
                    group.layer
                ),
            ));
        }
        row0 += t.shape[0];
    }
    Ok((types, w))
}

/// Releases the pages of a group's members.
pub(crate) fn release_members(checkpoint: &Checkpoint, group: &GroupPlan) {
    for &i in &group.members {
        checkpoint.release(&checkpoint.tensors[i]);
    }
}

/// Fits a stacked group (consumed: the weight-only fits centre it in place) with its fit and
/// effective SPEC.
pub(crate) fn fit_group(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    inputs: &FitInputs,
    w: Mat<f64>,
    spec: Spec,
) -> Result<Decomposition> {
    Ok(fit_group_kept(checkpoint, group, inputs, w, spec)?.0)
}

/// [`fit_group`], with the share of each layer's weighted output energy kept on the calibration
/// inputs for a calibrated group spanning several layers (empty otherwise).
pub(crate) fn fit_group_kept(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    inputs: &FitInputs,
    w: Mat<f64>,
    spec: Spec,
) -> Result<(Decomposition, Vec<f64>)> {
    let fail = |e: DecomposeError| decompose_failure(checkpoint, group, e);
    match (group.fit, group.share) {
        (Fit::Act, Some(share)) => {
            let d = super::shared::fit_shared(checkpoint, group, share, inputs, w.as_ref(), spec)?;
            Ok((d.decomposition, d.layer_energy_kept))
        }
        (Fit::Act, None) => {
            let c = inputs
                .covariances
                .as_ref()
                .and_then(|c| c.get(group.layer))
                .ok_or_else(|| fail(DecomposeError::NeedsCalibration))?;
            let stats = inputs.attention.get(group.layer);
            // The BOS position (where calibration keeps it exact) is the same in every window.
            let pinned: Vec<Vec<f64>> = stats.and_then(|s| s.sink.clone()).into_iter().collect();
            // One-shot calibration's inputs are fixed: a group's spectrum is computed once, by
            // its first fit (sequential calibration's refit weight is its own).
            let sequential = inputs.sequential_at(group.layer);
            let kept = match sequential {
                None => inputs.spectra.get(&group.members, w.nrows())?,
                Some(_) => None,
            };
            let spectrum = match kept {
                Some(spectrum) => spectrum,
                None => {
                    // Sequential calibration fits the refit weight on the compressed model's
                    // inputs.
                    let (w, c) = match sequential {
                        Some(m) => {
                            let compressed = m.compressed.load()?;
                            let target = m.target.load()?;
                            let refit =
                                compensate(w.as_ref(), (*target).as_ref(), (*compressed).as_ref())
                                    .map_err(fail)?;
                            (refit, compressed)
                        }
                        None => (w, c.load()?),
                    };
                    check_inputs(w.as_ref(), (*c).as_ref()).map_err(fail)?;
                    let weighted = layer_weight(
                        checkpoint,
                        group.layer,
                        &group.members,
                        inputs.weighting,
                        w.as_ref(),
                        (*c).as_ref(),
                        stats,
                    )?;
                    let spectrum = spectrum_of(weighted).map_err(fail)?;
                    if sequential.is_none() {
                        inputs.spectra.offer(&group.members, &spectrum)?;
                    }
                    spectrum
                }
            };
            Ok((
                decompose_spectrum(&spectrum, spec, &pinned).map_err(fail)?,
                Vec::new(),
            ))
        }
        (fit, _) => {
            // The width pass may have decomposed it already (factored output with a threshold).
            let d = match inputs.bases.take(group.members[0]) {
                Some(basis) => decompose_with_basis(w, basis, spec),
                None => decompose_owned(w, fit, spec),
            };
            Ok((d.map_err(fail)?, Vec::new()))
        }
    }
}

/// Why `group` could not be decomposed, named by its first member's file and its tensors.
pub(crate) fn decompose_failure(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    e: DecomposeError,
) -> Error {
    let first = &checkpoint.tensors[group.members[0]];
    let names: Vec<&str> = group
        .members
        .iter()
        .map(|&i| checkpoint.tensors[i].name.as_str())
        .collect();
    Error::tensor(
        &checkpoint.shards[first.shard].path,
        names.join("+"),
        format!("layer {}: cannot decompose: {e}", group.layer),
    )
}

/// Every group's explained-variance spectrum (descending), in group order, computed in parallel:
/// what `budget:F` allocates ranks from.
pub fn spectra(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    inputs: &FitInputs,
) -> Result<Vec<Vec<f64>>> {
    let results: Vec<Result<Vec<f64>>> = groups
        .par_iter()
        .map(|group| {
            let (_, w) = stack_group(checkpoint, group)?;
            release_members(checkpoint, group);
            Ok(fit_group(checkpoint, group, inputs, w, Spec::Rank(1))?.spectrum)
        })
        .collect();
    results.into_iter().collect()
}

/// One fitted group: its report and its encoded outputs (see [`Op::Computed`] for their order).
pub(crate) struct GroupOutput {
    pub(crate) report: GroupReport,
    pub(crate) pieces: Vec<Option<Vec<u8>>>,
}

/// `||W - W'||_F / ||W||_F` of the whole group and of each member (`rows[k]` rows each, `cols`
/// columns), summed in row-major order. `original(i, buf)` and `written(i, buf)` fill `buf` with row
/// `i` of `W` and `W'`.
fn group_errors(
    rows: &[usize],
    cols: usize,
    original: impl Fn(usize, &mut [f64]),
    written: impl Fn(usize, &mut [f64]),
) -> (f64, Vec<f64>) {
    let (mut a_row, mut b_row) = (vec![0.0; cols], vec![0.0; cols]);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    let mut members = Vec::with_capacity(rows.len());
    let mut i = 0;
    for &n in rows {
        let (mut d, mut m) = (0.0f64, 0.0f64);
        for _ in 0..n {
            original(i, &mut a_row);
            written(i, &mut b_row);
            for (&a, &b) in a_row.iter().zip(&b_row) {
                let e = a - b;
                diff += e * e;
                norm += a * a;
                d += e * e;
                m += a * a;
            }
            i += 1;
        }
        members.push(error_ratio(d, m));
    }
    (error_ratio(diff, norm), members)
}

/// Decodes, stacks and fits one group; returns its report and its outputs in the `emit` form.
pub(crate) fn run_group(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    emit: Emit,
    inputs: &FitInputs,
) -> Result<GroupOutput> {
    let started = std::time::Instant::now();
    let members: Vec<_> = group
        .members
        .iter()
        .map(|&i| &checkpoint.tensors[i])
        .collect();
    let names: Vec<String> = members.iter().map(|t| t.name.clone()).collect();
    let member_rows: Vec<usize> = members.iter().map(|t| t.shape[0]).collect();
    let (types, w) = stack_group(checkpoint, group)?;
    let (rows, cols) = (w.nrows(), w.ncols());
    let (d, layer_energy_kept) =
        fit_group_kept(checkpoint, group, inputs, w, group.effective_spec())?;

    // The errors compare W, decoded again from the input's pages (so the fit could consume its
    // copy), with W' as the output represents it, rounded.
    let mut starts = Vec::with_capacity(members.len());
    let mut row0 = 0;
    for t in &members {
        starts.push(row0);
        row0 += t.shape[0];
    }
    let member_of = |i: usize| starts.partition_point(|&s| s <= i) - 1;
    let inputs_bytes: Vec<&[u8]> = members.iter().map(|t| checkpoint.bytes(t)).collect();
    let row_of = |bytes: &[&[u8]], i: usize, buf: &mut [f64]| {
        let k = member_of(i);
        let size = types[k].size();
        let start = (i - starts[k]) * cols * size;
        types[k].decode_slice(&bytes[k][start..start + cols * size], buf);
    };
    let original = |i: usize, buf: &mut [f64]| row_of(&inputs_bytes, i, buf);
    let mut pieces: Vec<Option<Vec<u8>>> = Vec::with_capacity(members.len() + 1);
    let (relative_error, tensor_errors) = match emit {
        Emit::Dense => {
            for ((t, ft), &start) in members.iter().zip(&types).zip(&starts) {
                pieces.push(Some(
                    ft.encode_rows(d.reconstruction.as_ref().subrows(start, t.shape[0])),
                ));
            }
            let encoded: Vec<&[u8]> = pieces.iter().flatten().map(Vec::as_slice).collect();
            group_errors(&member_rows, cols, original, |i, buf| {
                row_of(&encoded, i, buf)
            })
        }
        Emit::Factored => {
            let latent = d.factors.down.nrows();
            let down = types[0].encode_rows(d.factors.down.as_ref());
            let mut down_rounded = Mat::<f64>::zeros(latent, cols);
            types[0].decode_into(&down, down_rounded.as_mut());
            pieces.push(Some(down));
            let mut up_rounded = Mat::<f64>::zeros(rows, latent);
            for ((t, ft), &start) in members.iter().zip(&types).zip(&starts) {
                let encoded = ft.encode_rows(d.factors.up.as_ref().subrows(start, t.shape[0]));
                ft.decode_into(&encoded, up_rounded.as_mut().subrows_mut(start, t.shape[0]));
                pieces.push(Some(encoded));
            }
            let written = product(up_rounded.as_ref(), down_rounded.as_ref());
            group_errors(&member_rows, cols, original, |i, buf| {
                for (j, x) in buf.iter_mut().enumerate() {
                    *x = written[(i, j)];
                }
            })
        }
    };
    release_members(checkpoint, group);
    let rank = d.choice.rank;
    let latent = d.factors.down.nrows();
    let bytes_original = members.iter().map(|t| t.range.len() as u64).sum();
    let bytes_factored = factored_bytes(&members, &types, latent, cols);
    let report = GroupReport {
        layer: group.layer,
        layers: group.spanned_layers(),
        share: group.share.map(crate::plan::Share::name),
        kind: group.kind.name(),
        tensors: names,
        shape: [rows, cols],
        spec: group.spec.to_string(),
        fit: group.fit.name(),
        rank,
        latent,
        full_rank: d.choice.full_rank,
        rank_clamped: d.choice.clamped,
        variance_kept: d.variance_kept,
        relative_error,
        tensor_relative_errors: tensor_errors,
        params_original: (rows * cols) as u64,
        params_factored: (latent * (rows + cols)) as u64,
        bytes_original,
        bytes_factored,
        layer_energy_kept,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(GroupOutput { report, pieces })
}

/// Bytes of a group's factored form: the down-projection `[latent, cols]` in the first member's
/// dtype, each member's up-projection `[rows, latent]` in its own.
fn factored_bytes(
    members: &[&TensorEntry],
    types: &[FloatType],
    latent: usize,
    cols: usize,
) -> u64 {
    let ups: usize = members
        .iter()
        .zip(types)
        .map(|(t, ft)| t.shape[0] * latent * ft.size())
        .sum();
    (latent * cols * types[0].size() + ups) as u64
}

/// Fits one group and encodes its outputs in the `emit` form (for dense: each member's
/// reconstruction in its dtype), with its report. For in-memory use (`sweep`).
pub fn fit_and_encode(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    emit: Emit,
    inputs: &FitInputs,
) -> Result<(GroupReport, Vec<Vec<u8>>)> {
    let out = run_group(checkpoint, group, emit, inputs)?;
    Ok((out.report, out.pieces.into_iter().flatten().collect()))
}

/// Runs groups in parallel; errors are reported for the lowest group index, so they are
/// deterministic too.
pub(crate) fn run_groups(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    indices: &[usize],
    emit: Emit,
    inputs: &FitInputs,
    progress: Option<&ProgressBar>,
) -> Result<Vec<(usize, GroupOutput)>> {
    let results: Vec<(usize, Result<GroupOutput>)> = indices
        .par_iter()
        .map(|&g| {
            let r = run_group(checkpoint, &groups[g], emit, inputs);
            if let Some(p) = progress {
                p.inc(1);
            }
            (g, r)
        })
        .collect();
    results
        .into_iter()
        .map(|(g, r)| r.map(|o| (g, o)))
        .collect()
}

/// Computes every group's report without producing output (for `--dry-run`).
pub fn reports_only(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    emit: Emit,
    inputs: &FitInputs,
    progress: &ProgressBar,
) -> Result<Vec<GroupReport>> {
    progress.set_length(groups.len() as u64);
    let all: Vec<usize> = (0..groups.len()).collect();
    Ok(
        run_groups(checkpoint, groups, &all, emit, inputs, Some(progress))?
            .into_iter()
            .map(|(_, o)| o.report)
            .collect(),
    )
}
