//! `surgery-convert expand`: a factored checkpoint (`--emit factored`) multiplied back into a
//! standard dense one, for runtimes without the factored module (llama.cpp, vLLM, candle).
//!
//! Each `b @ a` pair becomes the projection it replaced, under its original name, in the
//! up-projection's dtype and shard; `config.json` gets its original architecture back; everything
//! else is copied. The output carries its own `surgery.json` (embedding the factored checkpoint's
//! report) and `SHA256SUMS`.

use crate::error::{Error, Result};
use crate::execute::input_hash::hash_alongside;
use crate::execute::{self, NoPieces};
use crate::input::checkpoint::Checkpoint;
use crate::input::source::{InputIdentity, ResolvedInput};
use crate::model::layout::CONFIG_FILE;
use crate::options::ExpandOptions;
use crate::output::files::{finish, output_sizes, write_index_and_files};
use crate::output::staging::{OutTarget, Staging};
use crate::output::writer::ShardWriter;
use crate::plan::{self, Op, Plan};
use crate::report::{group_digits, FileRecord, ShardRecord, Tool};
use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

/// `surgery.json` of an expanded checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ExpandReport {
    /// Tool name and version.
    pub tool: Tool,
    /// The command that reproduces this output (add `--out DIR`).
    pub command: String,
    /// `expand`.
    pub operation: &'static str,
    /// The factored input.
    pub input: ExpandInput,
    /// Output weight files.
    pub output: Vec<ShardRecord>,
    /// Each dense projection restored, with the factors it was multiplied from.
    pub expanded: Vec<ExpandedTensor>,
    /// The factored checkpoint's own `surgery.json`, when it has one.
    pub source_report: Option<Value>,
}

/// Where the factored checkpoint came from.
#[derive(Debug, Clone, Serialize)]
pub struct ExpandInput {
    /// Local path or hub repo.
    #[serde(flatten)]
    pub identity: InputIdentity,
    /// Weight files with size and SHA-256.
    pub weight_files: Vec<FileRecord>,
}

/// One restored projection.
#[derive(Debug, Clone, Serialize)]
pub struct ExpandedTensor {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `[up, down]`: the factors multiplied.
    pub from: [String; 2],
}

/// Runs `expand`.
pub fn run(options: &ExpandOptions) -> Result<()> {
    let started = Instant::now();
    let out = (!options.dry_run).then_some((options.out.as_path(), options.force));
    let (input, out, checkpoint) =
        super::open_input(&options.input, &options.revision, !options.quiet, out)?;
    let latent = checkpoint.config.latent.clone().ok_or_else(|| {
        Error::invalid(
            checkpoint.dir.join(CONFIG_FILE),
            "not a factored checkpoint (no latent_attention); only output of --emit factored can be expanded",
        )
    })?;
    let plan = plan::plan_expand(&checkpoint, &latent)?;
    let expanded = expanded_tensors(&checkpoint, &plan);
    let Some(out) = out else {
        if !options.quiet {
            for line in plan.describe(&checkpoint) {
                eprintln!("{line}");
            }
            eprintln!(
                "dry run: {} projections would be expanded; nothing written",
                expanded.len()
            );
        }
        return Ok(());
    };
    let source_report = source_report(&checkpoint)?;
    let count = expanded.len();
    let sizes = write(
        options,
        &input,
        &checkpoint,
        &plan,
        expanded,
        source_report,
        &out,
    )?;
    if !options.quiet {
        eprintln!(
            "expanded {} projections; wrote {} ({} weight files, {} bytes) in {:.2}s",
            count,
            options.out.display(),
            sizes.len(),
            group_digits(sizes.iter().sum()),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Each projection the plan restores, with the factors it multiplies.
fn expanded_tensors(checkpoint: &Checkpoint, plan: &Plan) -> Vec<ExpandedTensor> {
    plan.shards
        .iter()
        .flat_map(|s| &s.tensors)
        .flat_map(|t| match &t.op {
            Op::Fused { parts } => parts.iter().collect(),
            _ => vec![t],
        })
        .filter_map(|t| match t.op {
            Op::Expand { down, up } => Some(ExpandedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                from: [
                    checkpoint.tensors[up].name.clone(),
                    checkpoint.tensors[down].name.clone(),
                ],
            }),
            _ => None,
        })
        .collect()
}

/// The factored checkpoint's own `surgery.json`, when it has one.
fn source_report(checkpoint: &Checkpoint) -> Result<Option<Value>> {
    let path = checkpoint.dir.join("surgery.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str::<Value>(&text)
        .map(Some)
        .map_err(|source| Error::Json { path, source })
}

/// Writes the expanded checkpoint and its report into a staging directory committed as `out`;
/// returns the shard sizes.
fn write(
    options: &ExpandOptions,
    input: &ResolvedInput,
    checkpoint: &Checkpoint,
    plan: &Plan,
    expanded: Vec<ExpandedTensor>,
    source_report: Option<Value>,
    out: &OutTarget,
) -> Result<Vec<u64>> {
    let staging = Staging::create(out)?;
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let ((), weight_files) = hash_alongside(checkpoint, plan.data_len(), |pace| {
        let mut writer = ShardWriter::new(staging.path(), &mut digests);
        execute::execute(
            checkpoint,
            plan,
            &mut NoPieces,
            &execute::FitInputs::default(),
            &mut writer,
            pace,
            &ProgressBar::hidden(),
        )
    })?;
    write_index_and_files(checkpoint, plan, staging.path(), &mut digests)?;
    let sizes = output_sizes(plan, staging.path())?;
    let report = ExpandReport {
        tool: Tool::current(),
        command: options.reproduce_command(),
        operation: "expand",
        input: ExpandInput {
            identity: input.identity.clone(),
            weight_files,
        },
        output: plan
            .shards
            .iter()
            .zip(&sizes)
            .map(|(s, &bytes)| ShardRecord {
                name: s.file_name.clone(),
                tensors: s.tensors.len(),
                bytes,
            })
            .collect(),
        expanded,
        source_report,
    };
    finish(staging, &report, digests)?;
    Ok(sizes)
}
