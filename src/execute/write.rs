//! The two write passes of a conversion, both with the fits pipelined ahead of the writer in the
//! order the plan needs them: dense, and factored, whose layout needs every latent width first
//! (the width pass, [`super::widths`]).

use super::input_hash::hash_alongside;
use super::pipeline::{need_order, with_pipeline, Pipelined};
use super::widths::resolve_latents;
use super::{execute, FitInputs, GroupReport};
use crate::digest::FileRecord;
use crate::error::Result;
use crate::input::checkpoint::Checkpoint;
use crate::output::writer::ShardWriter;
use crate::plan::{self, Emit, GroupPlan, Layout, Plan};
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::path::Path;

/// What a write pass produced.
#[derive(Debug)]
pub struct Written {
    /// The plan it executed.
    pub plan: Plan,
    /// Every group's report, in group order.
    pub reports: Vec<GroupReport>,
    /// The input weight files, hashed on the way.
    pub weight_files: Vec<FileRecord>,
}

/// Plans the dense form and writes its shards into `dir` (digests into `digests`), the groups
/// fitted ahead of the writer.
pub fn write_dense(
    checkpoint: &Checkpoint,
    groups: Vec<GroupPlan>,
    inputs: &FitInputs,
    max_shard_size: Option<u64>,
    dir: &Path,
    digests: &mut BTreeMap<String, String>,
    bar: &ProgressBar,
) -> Result<Written> {
    let plan = plan::plan(checkpoint, groups, &Layout::Dense, max_shard_size)?;
    write_pipelined(checkpoint, plan, Emit::Dense, inputs, dir, digests, bar)
}

/// Decides every group's latent width first (the width pass, `widths`), plans the factored layout
/// they give, and writes its shards into `dir` with the fits run ahead of the writer as for dense
/// output. `bars`: the width pass's, the write pass's.
pub fn write_factored(
    checkpoint: &Checkpoint,
    mut groups: Vec<GroupPlan>,
    inputs: &FitInputs,
    max_shard_size: Option<u64>,
    dir: &Path,
    digests: &mut BTreeMap<String, String>,
    bars: [&ProgressBar; 2],
) -> Result<Written> {
    let [width_bar, write_bar] = bars;
    width_bar.set_length(groups.len() as u64);
    let latents = resolve_latents(checkpoint, &mut groups, inputs, &|| width_bar.inc(1))?;
    width_bar.finish_and_clear();
    let plan = plan::plan(
        checkpoint,
        groups,
        &Layout::Factored { latents },
        max_shard_size,
    )?;
    write_pipelined(
        checkpoint,
        plan,
        Emit::Factored,
        inputs,
        dir,
        digests,
        write_bar,
    )
}

/// Writes `plan`'s shards into `dir`, its groups fitted in `emit` form ahead of the writer, in
/// the order the writes need them (a fit whose output disagrees with the planned shapes is caught
/// by the writer).
fn write_pipelined(
    checkpoint: &Checkpoint,
    plan: Plan,
    emit: Emit,
    inputs: &FitInputs,
    dir: &Path,
    digests: &mut BTreeMap<String, String>,
    bar: &ProgressBar,
) -> Result<Written> {
    let mut writer = ShardWriter::new(dir, digests);
    let order = need_order(&plan);
    let (reports, weight_files) = hash_alongside(checkpoint, plan.data_len(), |pace| {
        with_pipeline(checkpoint, &plan.groups, &order, emit, inputs, |pipeline| {
            let mut source = Pipelined::new(pipeline, plan.groups.len());
            execute(
                checkpoint,
                &plan,
                &mut source,
                inputs,
                &mut writer,
                pace,
                bar,
            )?;
            Ok(source.into_reports())
        })
    })?;
    bar.finish_and_clear();
    Ok(Written {
        plan,
        reports,
        weight_files,
    })
}
