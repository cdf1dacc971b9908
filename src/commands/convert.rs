//! The conversion, end to end: resolve the input, open it, prepare the fits, then either plan and
//! report (`--dry-run`) or execute into a staging directory, write the index, copies, report and
//! checksums, and move the result into place.

use super::check::PreparedCheck;
use crate::calibrate::calibrate;
use crate::error::{Error, Result};
use crate::execute::write::{factored_layout, write_plan, Written};
use crate::execute::{self, FitInputs};
use crate::input::checkpoint::Checkpoint;
use crate::input::source::ResolvedInput;
use crate::options::{ConvertOptions, Output};
use crate::output::files::{finish, output_sizes, write_index_and_files};
use crate::output::staging::{OutTarget, Staging};
use crate::plan::{self, Emit, GroupPlan, Layout};
use crate::report::Report;
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::time::Instant;

/// The bar of the fits alone (dry runs, the factored form's first pass).
const FIT_BAR: &str = "{spinner} decomposing {pos}/{len} matrices";
/// The bar of the quality check (both models, layer by layer).
const CHECK_BAR: &str = "checking: layer {pos}/{len} {wide_bar} {elapsed}";
/// The bar of the write pass.
const WRITE_BAR: &str = "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";

fn progress_bar(options: &ConvertOptions, template: &str) -> ProgressBar {
    super::progress_bar(options.output == Output::Summary, 0, template)
}

/// Runs a conversion (or a dry run) and returns its report.
pub fn run(options: &ConvertOptions) -> Result<()> {
    let started = Instant::now();
    let out = (!options.dry_run).then_some((options.out.as_path(), options.force));
    let (input, out, checkpoint) = super::open_input(
        &options.input,
        &options.revision,
        options.output == Output::Summary,
        out,
    )?;
    checkpoint.require_dense(&options.input)?;
    let check = match &options.check {
        Some(window) => Some(super::check::prepare(window, &input.dir)?),
        None => None,
    };
    let mut groups = plan::groups(&checkpoint, &options.surgery);
    let prepared = Instant::now();
    let calibration = options
        .calibration
        .as_ref()
        .map(|c| (c, super::calibration_passes(c.mode, &groups)));
    let bars = super::progress::PassBars::new(options.output == Output::Summary);
    let inputs = calibrate(&checkpoint, calibration, &mut groups, &bars)?;
    let prepare = prepared.elapsed().as_secs_f64();
    let mut report = match out {
        None => dry_run(options, &input, &checkpoint, groups, &inputs)?,
        Some(out) => convert(
            options,
            &input,
            &checkpoint,
            (groups, &inputs),
            check.as_ref(),
            &out,
        )?,
    };
    report.timings.prepare = prepare;
    let out = (!options.dry_run).then(|| options.out.display().to_string());
    print(options, &report, started, out.as_deref())?;
    Ok(())
}

/// Fits every group, plans and prints the plan (as a summary); writes nothing.
fn dry_run(
    options: &ConvertOptions,
    input: &ResolvedInput,
    checkpoint: &Checkpoint,
    groups: Vec<GroupPlan>,
    inputs: &FitInputs,
) -> Result<Report> {
    let bar = progress_bar(options, FIT_BAR);
    let reports = execute::reports_only(checkpoint, &groups, options.emit, inputs, &bar)?;
    bar.finish_and_clear();
    let layout = execute::layout(options.emit, &reports);
    let plan = plan::plan(checkpoint, groups, &layout, options.max_shard_size)?;
    if options.output == Output::Summary {
        for line in plan.describe(checkpoint) {
            // File names come from the input: printed escaped, one line each.
            eprintln!("{}", crate::error::escape_controls(&line));
        }
    }
    Ok(Report::build(
        options,
        &input.identity,
        checkpoint,
        &plan,
        reports,
        inputs,
        Vec::new(),
        None,
    ))
}

/// Writes the conversion into a staging directory, runs the quality check on it (when `check`),
/// and commits it as `out`.
fn convert(
    options: &ConvertOptions,
    input: &ResolvedInput,
    checkpoint: &Checkpoint,
    (groups, inputs): (Vec<GroupPlan>, &FitInputs),
    check: Option<&PreparedCheck>,
    out: &OutTarget,
) -> Result<Report> {
    let staging = Staging::create(out)?;
    let writing = Instant::now();
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let mut groups = groups;
    let layout = match options.emit {
        Emit::Dense => Layout::Dense,
        Emit::Factored => factored_layout(
            checkpoint,
            &mut groups,
            inputs,
            &progress_bar(options, FIT_BAR),
        )?,
    };
    // The plan is complete here: ranks and widths decided, nothing written into it afterwards.
    let plan = plan::plan(checkpoint, groups, &layout, options.max_shard_size)?;
    let written = write_plan(
        checkpoint,
        plan,
        options.emit,
        inputs,
        staging.path(),
        &mut digests,
        &progress_bar(options, WRITE_BAR),
    )?;
    let write = writing.elapsed().as_secs_f64();
    let Written {
        plan,
        reports,
        weight_files,
    } = written;
    write_index_and_files(checkpoint, &plan, staging.path(), &mut digests)?;
    let sizes = output_sizes(&plan, staging.path())?;
    let mut report = Report::build(
        options,
        &input.identity,
        checkpoint,
        &plan,
        reports,
        inputs,
        weight_files,
        Some(&sizes),
    );
    if let Some(check) = check {
        let bar = progress_bar(options, CHECK_BAR);
        let (record, seconds) = super::check::run(check, checkpoint, staging.path(), &bar)?;
        report.check = Some(record);
        report.timings.check = Some(seconds);
    }
    report.timings.write = Some(write);
    finish(staging, &report, digests)?;
    Ok(report)
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
