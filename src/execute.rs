//! The executor: walks the plan shard by shard and tensor by tensor, decomposing each layer's groups
//! (in parallel across matrices) when the first of its tensors is due, and hands bytes to a sink.
//!
//! Only the reconstructions of the layer(s) in flight are held in memory; input pages are released
//! as soon as they have been consumed.

use crate::checkpoint::Checkpoint;
use crate::decompose::{decompose, matrix_from_rows, relative_error, Fit};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::plan::{GroupPlan, Op, Plan, ShardPlan, TensorPlan};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashMap;

/// What one decomposition kept and cost, as recorded in `surgery.json`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// Layer index.
    pub layer: usize,
    /// `q`, `k`, `v` or `shared_kv`.
    pub kind: &'static str,
    /// The tensors fitted together, in stacking order.
    pub tensors: Vec<String>,
    /// Shape of the (stacked) matrix fitted: `[rows, cols]`.
    pub shape: [usize; 2],
    /// The SPEC given.
    pub spec: String,
    /// The reconstruction.
    pub fit: &'static str,
    /// Components kept.
    pub rank: usize,
    /// Components available.
    pub full_rank: usize,
    /// Whether `rank:N` exceeded the maximum and was clamped.
    pub rank_clamped: bool,
    /// Explained variance kept (sum of the kept components' ratios).
    pub variance_kept: f64,
    /// `||W - W'||_F / ||W||_F` over the whole group, after rounding to the output dtype.
    pub relative_error: f64,
    /// The same per tensor, in `tensors` order.
    pub tensor_relative_errors: Vec<f64>,
    /// Parameters of the original matrices.
    pub params_original: u64,
    /// Parameters of the factored form (down-projection plus up-projections, with the mean
    /// direction for `pca`).
    pub params_factored: u64,
}

/// Where the executor sends output bytes.
pub trait TensorSink {
    /// A new output file starts.
    fn begin_shard(&mut self, shard: &ShardPlan) -> Result<()>;
    /// The next tensor's bytes, in plan order.
    fn write_tensor(&mut self, tensor: &TensorPlan, bytes: &[u8]) -> Result<()>;
    /// The current file is complete.
    fn finish_shard(&mut self) -> Result<()>;
}

/// Extra latent dimensions a fit needs for the mean row.
pub fn mean_dims(fit: Fit) -> usize {
    usize::from(fit == Fit::Pca)
}

struct GroupOutput {
    report: GroupReport,
    bytes: Vec<Option<Vec<u8>>>,
}

/// Decodes, stacks and fits one group; returns its report and each member's encoded output.
fn run_group(checkpoint: &Checkpoint, group: &GroupPlan) -> Result<GroupOutput> {
    let members: Vec<_> = group
        .members
        .iter()
        .map(|&i| &checkpoint.tensors[i])
        .collect();
    let first = members[0];
    let path = &checkpoint.shards[first.shard].path;
    let names: Vec<String> = members.iter().map(|t| t.name.clone()).collect();
    let cols = first.shape[1];
    let mut rows = 0usize;
    let mut types = Vec::with_capacity(members.len());
    let mut original = Vec::new();
    for t in &members {
        let ft = FloatType::from_dtype(t.dtype).ok_or_else(|| {
            Error::tensor(
                &checkpoint.shards[t.shard].path,
                &t.name,
                format!("dtype {:?} cannot be decomposed", t.dtype),
            )
        })?;
        types.push(ft);
        rows += t.shape[0];
        original.extend(ft.decode(checkpoint.bytes(t)));
        checkpoint.release(t);
    }
    let w = matrix_from_rows(rows, cols, &original);
    let d = decompose(w.as_ref(), group.fit, group.spec).map_err(|e| {
        Error::tensor(
            path,
            names.join("+"),
            format!("layer {}: cannot decompose: {e}", group.layer),
        )
    })?;
    drop(w);

    let mut bytes = Vec::with_capacity(members.len());
    let mut rounded_all = Vec::with_capacity(original.len());
    let mut tensor_errors = Vec::with_capacity(members.len());
    let mut row0 = 0;
    for (t, ft) in members.iter().zip(&types) {
        let r = t.shape[0];
        let mut values = Vec::with_capacity(r * cols);
        for i in row0..row0 + r {
            for j in 0..cols {
                values.push(d.reconstruction[(i, j)]);
            }
        }
        let encoded = ft.encode(&values);
        let rounded = ft.decode(&encoded);
        tensor_errors.push(relative_error(
            &original[row0 * cols..(row0 + r) * cols],
            &rounded,
        ));
        rounded_all.extend(rounded);
        bytes.push(Some(encoded));
        row0 += r;
    }
    let rank = d.choice.rank;
    let latent = (rank + mean_dims(group.fit)) as u64;
    let report = GroupReport {
        layer: group.layer,
        kind: group.kind.name(),
        tensors: names,
        shape: [rows, cols],
        spec: group.spec.to_string(),
        fit: group.fit.name(),
        rank,
        full_rank: d.choice.full_rank,
        rank_clamped: d.choice.clamped,
        variance_kept: d.variance_kept,
        relative_error: relative_error(&original, &rounded_all),
        tensor_relative_errors: tensor_errors,
        params_original: (rows * cols) as u64,
        params_factored: latent * (rows + cols) as u64,
    };
    Ok(GroupOutput { report, bytes })
}

/// Runs groups in parallel; errors are reported for the lowest group index, so they are
/// deterministic too.
fn run_groups(
    checkpoint: &Checkpoint,
    plan: &Plan,
    indices: &[usize],
) -> Result<Vec<(usize, GroupOutput)>> {
    let results: Vec<(usize, Result<GroupOutput>)> = indices
        .par_iter()
        .map(|&g| (g, run_group(checkpoint, &plan.groups[g])))
        .collect();
    results
        .into_iter()
        .map(|(g, r)| r.map(|o| (g, o)))
        .collect()
}

/// Computes every group's report without producing output (for `--dry-run`).
pub fn reports_only(
    checkpoint: &Checkpoint,
    plan: &Plan,
    progress: &ProgressBar,
) -> Result<Vec<GroupReport>> {
    progress.set_length(plan.groups.len() as u64);
    let results: Vec<Result<GroupReport>> = plan
        .groups
        .par_iter()
        .map(|g| {
            let r = run_group(checkpoint, g).map(|o| o.report);
            progress.inc(1);
            r
        })
        .collect();
    results.into_iter().collect()
}

/// Produces every output tensor in plan order and hands it to `sink`. Returns the group reports in
/// plan order.
pub fn execute(
    checkpoint: &Checkpoint,
    plan: &Plan,
    sink: &mut dyn TensorSink,
    progress: &ProgressBar,
) -> Result<Vec<GroupReport>> {
    progress.set_length(plan.data_len());
    let mut reports: Vec<Option<GroupReport>> = vec![None; plan.groups.len()];
    let mut pending: HashMap<usize, Vec<Option<Vec<u8>>>> = HashMap::new();
    for shard in &plan.shards {
        sink.begin_shard(shard)?;
        for tensor in &shard.tensors {
            match tensor.op {
                Op::Copy { tensor: index } => {
                    let t = &checkpoint.tensors[index];
                    sink.write_tensor(tensor, checkpoint.bytes(t))?;
                    checkpoint.release(t);
                }
                Op::Reconstruct { group, member } => {
                    if reports[group].is_none() {
                        let layer = plan.groups[group].layer;
                        let due: Vec<usize> = (0..plan.groups.len())
                            .filter(|&g| plan.groups[g].layer == layer && reports[g].is_none())
                            .collect();
                        for (g, out) in run_groups(checkpoint, plan, &due)? {
                            reports[g] = Some(out.report);
                            pending.insert(g, out.bytes);
                        }
                    }
                    let bytes = pending
                        .get_mut(&group)
                        .and_then(|m| m.get_mut(member))
                        .and_then(Option::take)
                        .ok_or_else(|| {
                            Error::tensor(
                                &checkpoint.dir,
                                &tensor.name,
                                "internal error: output produced twice",
                            )
                        })?;
                    sink.write_tensor(tensor, &bytes)?;
                    if pending
                        .get(&group)
                        .is_some_and(|m| m.iter().all(Option::is_none))
                    {
                        pending.remove(&group);
                    }
                }
            }
            progress.inc(tensor.byte_len as u64);
        }
        sink.finish_shard()?;
    }
    Ok(reports.into_iter().flatten().collect())
}
