//! The conversion, end to end: resolve the input, open it, plan, execute into a staging directory,
//! write the index, copies, report and checksums, then move the result into place.

use crate::budget;
use crate::checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE};
use crate::checksums;
use crate::cli::{Calibration, ConvertOptions, Output};
use crate::error::{Error, Result};
use crate::execute::{self, FitInputs, GroupReport, Pipelined};
use crate::input_hash::InputHasher;
use crate::output::{check_out_path, Staging};
use crate::plan::{self, Emit, FileSource, GroupKind, GroupPlan, Layout, Plan};
use crate::report::Report;
use crate::source;
use crate::spec::Spec;
use crate::writer::{copy_file, write_file, ShardWriter};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

fn progress_bar(options: &ConvertOptions, template: &str) -> ProgressBar {
    if options.output != Output::Summary || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Runs a conversion (or a dry run) and returns its report.
pub fn run(options: &ConvertOptions) -> Result<Report> {
    let started = Instant::now();
    let input = source::resolve(&options.input, &options.revision)?;
    let out = if options.dry_run {
        None
    } else {
        Some(check_out_path(&input.dir, &options.out, options.force)?)
    };
    let checkpoint = Checkpoint::open(&input.dir)?;
    if checkpoint.config.latent.is_some() {
        return Err(Error::invalid(
            checkpoint.dir.join(CONFIG_FILE),
            format!(
                "a factored checkpoint (written by --emit factored); expand it to a standard one first: surgery-convert expand {} --out DENSE_DIR",
                options.input
            ),
        ));
    }
    let inputs = fit_inputs(options.calibration.as_ref(), &checkpoint)?;
    let mut groups = plan::groups(&checkpoint, &options.surgery);
    resolve_budgets(&checkpoint, &mut groups, &inputs)?;

    let Some(out) = out else {
        let bar = progress_bar(options, "{spinner} decomposing {pos}/{len} matrices");
        let reports = execute::reports_only(&checkpoint, &groups, options.emit, &inputs, &bar)?;
        bar.finish_and_clear();
        let plan = plan::plan(
            &checkpoint,
            groups,
            &layout(options.emit, &reports),
            options.max_shard_size,
        )?;
        if options.output == Output::Summary {
            for line in plan.describe(&checkpoint) {
                // File names come from the input: printed escaped, one line each.
                eprintln!("{}", crate::error::escape_controls(&line));
            }
        }
        let report = Report::build(
            options,
            &input.identity,
            &checkpoint,
            &plan,
            reports,
            inputs.calibration.as_ref(),
            Vec::new(),
            None,
        );
        print(options, &report, started, None)?;
        return Ok(report);
    };

    let staging = Staging::create(&out)?;
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let mut hasher = InputHasher::new(&checkpoint);
    let (plan, reports) = match options.emit {
        Emit::Dense => {
            let plan = plan::plan(&checkpoint, groups, &Layout::Dense, options.max_shard_size)?;
            let bar = progress_bar(
                options,
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            );
            let mut writer = ShardWriter::new(staging.path(), &mut digests);
            let order = execute::need_order(&plan);
            let reports = execute::with_pipeline(
                &checkpoint,
                &plan.groups,
                &order,
                Emit::Dense,
                &inputs,
                |pipeline| {
                    let mut source = Pipelined::new(pipeline, plan.groups.len());
                    execute::execute(
                        &checkpoint,
                        &plan,
                        &mut source,
                        &mut writer,
                        &mut hasher,
                        &bar,
                    )?;
                    Ok(source.into_reports())
                },
            )?;
            bar.finish_and_clear();
            (plan, reports)
        }
        Emit::Factored => {
            let bar = progress_bar(options, "{spinner} decomposing {pos}/{len} matrices");
            let (reports, mut spill) = execute::factor_pass(
                &checkpoint,
                &groups,
                &inputs,
                &staging.path().join(SPILL_FILE),
                &bar,
            )?;
            bar.finish_and_clear();
            let plan = plan::plan(
                &checkpoint,
                groups,
                &layout(Emit::Factored, &reports),
                options.max_shard_size,
            )?;
            let bar = progress_bar(
                options,
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            );
            let mut writer = ShardWriter::new(staging.path(), &mut digests);
            execute::execute(
                &checkpoint,
                &plan,
                &mut spill,
                &mut writer,
                &mut hasher,
                &bar,
            )?;
            bar.finish_and_clear();
            spill.remove()?;
            (plan, reports)
        }
    };
    write_index_and_files(&checkpoint, &plan, staging.path(), &mut digests)?;
    let weight_files = hasher.finish(&checkpoint);
    let sizes = output_sizes(&plan, staging.path())?;
    let report = Report::build(
        options,
        &input.identity,
        &checkpoint,
        &plan,
        reports,
        inputs.calibration.as_ref(),
        weight_files,
        Some(&sizes),
    );
    finish(staging, &report, digests)?;
    print(
        options,
        &report,
        started,
        Some(&options.out.display().to_string()),
    )?;
    Ok(report)
}

/// The decomposition floor of a conversion (`--bench-decompose`): every group's matrix is decoded
/// into memory first, then only the fits are timed, in parallel across matrices as the conversion
/// runs them. Returns the seconds and the number of fits.
pub fn decompose_floor(options: &ConvertOptions) -> Result<(f64, usize)> {
    let input = source::resolve(&options.input, &options.revision)?;
    let checkpoint = Checkpoint::open(&input.dir)?;
    let inputs = fit_inputs(options.calibration.as_ref(), &checkpoint)?;
    let mut groups = plan::groups(&checkpoint, &options.surgery);
    resolve_budgets(&checkpoint, &mut groups, &inputs)?;
    let seconds = execute::decompose_floor(&checkpoint, &groups, &inputs)?;
    Ok((seconds, groups.len()))
}

/// Calibration statistics for fit `act` (none for the weight-only fits).
pub(crate) fn fit_inputs(
    calibration: Option<&Calibration>,
    checkpoint: &Checkpoint,
) -> Result<FitInputs> {
    let Some(calibration) = calibration else {
        return Ok(FitInputs::default());
    };
    let stats = crate::calibrate::calibrate(checkpoint, calibration)?;
    Ok(FitInputs {
        covariances: Some(stats.covariances),
        weighting: calibration.weighting,
        calibration: Some(stats.record),
    })
}

/// Resolves every `budget:F` SPEC to per-group ranks: per group kind, the spectra of all its groups
/// are ranked together and the kind's budget is spent from the top (`budget::allocate`).
pub(crate) fn resolve_budgets(
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
    let spectra = execute::spectra(checkpoint, &subset, inputs)?;
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
        let total = budget::total_components(
            &widths,
            fraction,
            execute::mean_dims(subset[members[0]].fit),
        );
        let kind_spectra: Vec<Vec<f64>> = members.iter().map(|&i| spectra[i].clone()).collect();
        for (&i, rank) in members.iter().zip(budget::allocate(&kind_spectra, total)) {
            groups[budgeted[i]].budget_rank = Some(rank);
        }
    }
    Ok(())
}

/// Scratch file for the factored form's factors, inside the staging directory (removed before the
/// output is committed).
const SPILL_FILE: &str = ".factors.spill";

/// The output layout for `emit`, given the groups' reports (their latent widths).
fn layout(emit: Emit, reports: &[GroupReport]) -> Layout {
    match emit {
        Emit::Dense => Layout::Dense,
        Emit::Factored => Layout::Factored {
            latents: reports.iter().map(|r| r.latent).collect(),
        },
    }
}

/// Writes the shard index (when planned) and the plan's other files into `dir`, adding digests.
pub(crate) fn write_index_and_files(
    checkpoint: &Checkpoint,
    plan: &Plan,
    dir: &Path,
    digests: &mut BTreeMap<String, String>,
) -> Result<()> {
    if plan.write_index {
        let weight_map = plan.weight_map();
        let index = serde_json::json!({
            "metadata": { "total_size": plan.data_len() },
            "weight_map": weight_map,
        });
        let bytes = crate::latent::to_pretty_bytes(&index, Path::new(INDEX_FILE))?;
        digests.insert(
            INDEX_FILE.into(),
            write_file(&dir.join(INDEX_FILE), &bytes)?,
        );
    }
    for file in &plan.files {
        let dst = dir.join(&file.relative);
        let digest = match &file.source {
            FileSource::Copy => copy_file(&checkpoint.dir.join(&file.relative), &dst)?,
            FileSource::Generated { bytes, .. } => write_file(&dst, bytes)?,
        };
        digests.insert(file.relative.to_string_lossy().into_owned(), digest);
    }
    Ok(())
}

/// Sizes of the written shards, in plan order.
pub(crate) fn output_sizes(plan: &Plan, dir: &Path) -> Result<Vec<u64>> {
    plan.shards
        .iter()
        .map(|s| {
            let p = dir.join(&s.file_name);
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| Error::io(&p, e))
        })
        .collect()
}

/// Writes `surgery.json` and `SHA256SUMS`, then moves the staging directory into place.
pub(crate) fn finish(
    staging: Staging,
    report: &impl serde::Serialize,
    mut digests: BTreeMap<String, String>,
) -> Result<()> {
    let json = serde_json::to_value(report).map_err(|source| Error::Json {
        path: "surgery.json".into(),
        source,
    })?;
    let bytes = crate::latent::to_pretty_bytes(&json, Path::new("surgery.json"))?;
    digests.insert(
        "surgery.json".into(),
        write_file(&staging.path().join("surgery.json"), &bytes)?,
    );
    write_file(
        &staging.path().join(checksums::FILE_NAME),
        checksums::format(&digests).as_bytes(),
    )?;
    staging.commit()
}

fn print(
    options: &ConvertOptions,
    report: &Report,
    started: Instant,
    out: Option<&str>,
) -> Result<()> {
    match options.output {
        Output::Quiet => {}
        Output::Summary => eprint!("{}", report.summary(started.elapsed().as_secs_f64(), out)),
        Output::Json => {
            let json = serde_json::to_string_pretty(report).map_err(|source| Error::Json {
                path: "surgery.json".into(),
                source,
            })?;
            println!("{json}");
        }
    }
    Ok(())
}
