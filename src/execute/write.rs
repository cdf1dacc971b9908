//! The two write passes of a conversion: dense (fits pipelined ahead of the writer, in the order
//! the plan needs them) and factored (every fit first, spilled to a scratch file, because the
//! layout needs every latent width; then the write pass reads the spill back).

use super::input_hash::InputHasher;
use super::pipeline::{need_order, with_pipeline, Pipelined};
use super::{execute, factor_pass, layout, FitInputs, GroupReport};
use crate::digest::FileRecord;
use crate::error::Result;
use crate::input::checkpoint::Checkpoint;
use crate::output::writer::ShardWriter;
use crate::plan::{self, Emit, GroupPlan, Layout, Plan};
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::path::Path;

/// Scratch file for the factored form's factors, inside the staging directory (removed before the
/// output is committed).
const SPILL_FILE: &str = ".factors.spill";

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
    let mut hasher = InputHasher::new(checkpoint);
    let mut writer = ShardWriter::new(dir, digests);
    let order = need_order(&plan);
    let reports = with_pipeline(
        checkpoint,
        &plan.groups,
        &order,
        Emit::Dense,
        inputs,
        |pipeline| {
            let mut source = Pipelined::new(pipeline, plan.groups.len());
            execute(
                checkpoint,
                &plan,
                &mut source,
                inputs,
                &mut writer,
                &mut hasher,
                bar,
            )?;
            Ok(source.into_reports())
        },
    )?;
    bar.finish_and_clear();
    Ok(Written {
        plan,
        reports,
        weight_files: hasher.finish(checkpoint),
    })
}

/// Fits every group in the factored form (spilled into `dir`), plans the layout their latent
/// widths give, and writes its shards into `dir`. `bars`: the fit pass's, the write pass's.
pub fn write_factored(
    checkpoint: &Checkpoint,
    groups: Vec<GroupPlan>,
    inputs: &FitInputs,
    max_shard_size: Option<u64>,
    dir: &Path,
    digests: &mut BTreeMap<String, String>,
    bars: [&ProgressBar; 2],
) -> Result<Written> {
    let [fit_bar, write_bar] = bars;
    let (reports, mut spill) =
        factor_pass(checkpoint, &groups, inputs, &dir.join(SPILL_FILE), fit_bar)?;
    fit_bar.finish_and_clear();
    let plan = plan::plan(
        checkpoint,
        groups,
        &layout(Emit::Factored, &reports),
        max_shard_size,
    )?;
    let mut hasher = InputHasher::new(checkpoint);
    let mut writer = ShardWriter::new(dir, digests);
    execute(
        checkpoint,
        &plan,
        &mut spill,
        inputs,
        &mut writer,
        &mut hasher,
        write_bar,
    )?;
    write_bar.finish_and_clear();
    spill.remove()?;
    Ok(Written {
        plan,
        reports,
        weight_files: hasher.finish(checkpoint),
    })
}
