//! Assembling `surgery.json` from the options, the input, the plan and the groups' reports.

use super::{
    kv_values_per_token, BeforeAfter, FileRecord, InputRecord, LayerRecord, ModelRecord,
    OptionsRecord, OutputRecord, Report, ShardRecord, Tool, Totals,
};
use crate::execute::CalibrationRecord;
use crate::execute::{FitInputs, GroupReport};
use crate::input::checkpoint::Checkpoint;
use crate::input::source::InputIdentity;
use crate::model::config::ModelConfig;
use crate::options::ConvertOptions;
use crate::plan::Plan;
use std::collections::BTreeMap;

const ZERO: BeforeAfter = BeforeAfter {
    before: 0,
    after: 0,
};

impl Report {
    /// Assembles the report.
    #[allow(clippy::too_many_arguments)] // one call site per output form; a builder would add nothing
    pub fn build(
        options: &ConvertOptions,
        identity: &InputIdentity,
        checkpoint: &Checkpoint,
        plan: &Plan,
        groups: Vec<GroupReport>,
        inputs: &FitInputs,
        weight_files: Vec<FileRecord>,
        output_sizes: Option<&[u64]>,
    ) -> Report {
        let c = &checkpoint.config;
        let layers = layer_records(c, &groups);
        let totals = totals(checkpoint, plan, &groups, &layers);
        Report {
            tool: Tool::current(),
            command: options.reproduce_command(),
            options: options_record(options, plan, inputs.calibration.as_ref()),
            input: InputRecord {
                identity: identity.clone(),
                architecture: c.class_name.clone(),
                weight_files,
                skipped_files: checkpoint
                    .skipped_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            },
            model: ModelRecord::of(c),
            output: output_record(plan, output_sizes),
            layers,
            totals,
            compensated: inputs
                .compensated
                .values()
                .map(|c| c.report.clone())
                .collect(),
            check: None,
            timings: Default::default(),
        }
    }
}

/// The output-determining options.
fn options_record(
    options: &ConvertOptions,
    plan: &Plan,
    calibration: Option<&CalibrationRecord>,
) -> OptionsRecord {
    let s = &options.surgery;
    let spec = |x: Option<crate::fit::spec::Spec>| x.map(|s| s.to_string());
    OptionsRecord {
        shared_kv: spec(s.shared_kv),
        q: spec(s.q),
        k: spec(s.k),
        v: spec(s.v),
        fit: s.fit.name(),
        emit: plan.emit.name(),
        max_shard_size: options.max_shard_size,
        compensate: s.compensate.map(|c| c.name()),
        calibration: calibration.cloned(),
    }
}

/// The output files: shard sizes as written (or their data bytes in a dry run).
fn output_record(plan: &Plan, output_sizes: Option<&[u64]>) -> OutputRecord {
    OutputRecord {
        emit: plan.emit.name(),
        weight_files: plan
            .shards
            .iter()
            .enumerate()
            .map(|(i, sh)| ShardRecord {
                name: sh.file_name.clone(),
                tensors: sh.tensors.len(),
                bytes: output_sizes
                    .and_then(|s| s.get(i).copied())
                    .unwrap_or_else(|| sh.data_len()),
            })
            .collect(),
        index: plan.write_index,
        copied_files: plan
            .copied_files()
            .map(|p| p.display().to_string())
            .collect(),
    }
}

/// One record per layer, with its groups and their sums.
fn layer_records(c: &ModelConfig, groups: &[GroupReport]) -> Vec<LayerRecord> {
    let kv_dim = c.kv_dim() as u64;
    let mut layers: Vec<LayerRecord> = (0..c.num_layers)
        .map(|layer| LayerRecord {
            layer,
            groups: Vec::new(),
            params: ZERO,
            bytes: ZERO,
            kv_cache_values_per_token: BeforeAfter {
                before: 2 * kv_dim,
                after: 2 * kv_dim,
            },
        })
        .collect();
    for g in groups {
        let l = &mut layers[g.layer];
        l.params.before += g.params_original;
        l.params.after += g.params_factored;
        l.bytes.before += g.bytes_original;
        l.bytes.after += g.bytes_factored;
        l.groups.push(g.clone());
    }
    for l in &mut layers {
        l.kv_cache_values_per_token.after = kv_values_per_token(groups, l.layer, kv_dim);
    }
    layers
}

/// Whole-model totals.
fn totals(
    checkpoint: &Checkpoint,
    plan: &Plan,
    groups: &[GroupReport],
    layers: &[LayerRecord],
) -> Totals {
    let mut variance: BTreeMap<String, (f64, usize)> = Default::default();
    for g in groups {
        let e = variance.entry(g.kind.to_string()).or_default();
        e.0 += g.variance_kept;
        e.1 += 1;
    }
    let params = |shape: &[usize]| shape.iter().product::<usize>() as u64;
    let sum = |f: fn(&GroupReport) -> u64| groups.iter().map(f).sum::<u64>();
    Totals {
        decompositions: groups.len(),
        params: BeforeAfter {
            before: sum(|g| g.params_original),
            after: sum(|g| g.params_factored),
        },
        bytes: BeforeAfter {
            before: sum(|g| g.bytes_original),
            after: sum(|g| g.bytes_factored),
        },
        model_params: BeforeAfter {
            before: checkpoint.tensors.iter().map(|t| params(&t.shape)).sum(),
            after: plan
                .shards
                .iter()
                .flat_map(|s| &s.tensors)
                .map(|t| params(&t.shape))
                .sum(),
        },
        model_bytes: BeforeAfter {
            before: checkpoint
                .tensors
                .iter()
                .map(|t| t.range.len() as u64)
                .sum(),
            after: plan.data_len(),
        },
        kv_cache_values_per_token: BeforeAfter {
            before: layers
                .iter()
                .map(|l| l.kv_cache_values_per_token.before)
                .sum(),
            after: layers
                .iter()
                .map(|l| l.kv_cache_values_per_token.after)
                .sum(),
        },
        mean_variance_kept: variance
            .into_iter()
            .map(|(k, (sum, n))| (k, sum / n as f64))
            .collect(),
    }
}
