//! A conversion's write pass: the plan's shards written with the fits pipelined ahead of the writer
//! in the order the plan needs them. The plan is made before it, by the command; the factored
//! layout it is made from needs every latent width first ([`factored_layout`], the width pass,
//! [`super::widths`]).

use super::input_hash::hash_alongside;
use super::pipeline::{need_order, with_pipeline, Pipelined};
use super::widths::resolve_latents;
use super::{execute, FitInputs, GroupReport};
use crate::digest::FileRecord;
use crate::error::Result;
use crate::input::checkpoint::Checkpoint;
use crate::output::writer::ShardWriter;
use crate::plan::{Emit, GroupPlan, Layout, Plan};
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

/// The factored layout of `groups`: every group's latent width decided first (the width pass,
/// `widths`, which pins threshold SPECs to the rank found, before the plan is made, and keeps the
/// bases it decomposed in `inputs` for the write pass). `bar` counts the groups.
pub fn factored_layout(
    checkpoint: &Checkpoint,
    groups: &mut [GroupPlan],
    inputs: &FitInputs,
    bar: &ProgressBar,
) -> Result<Layout> {
    bar.set_length(groups.len() as u64);
    let latents = resolve_latents(checkpoint, groups, inputs, &|| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(Layout::Factored { latents })
}

/// Writes `plan`'s shards into `dir`, its groups fitted in `emit` form ahead of the writer, in
/// the order the writes need them (a fit whose output disagrees with the planned shapes is caught
/// by the writer).
pub fn write_plan(
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
