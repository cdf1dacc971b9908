//! The conversion, end to end: resolve the input, open it, plan, execute into a staging directory,
//! write the index, copies, report and checksums, then move the result into place.

use crate::checkpoint::{Checkpoint, INDEX_FILE};
use crate::checksums;
use crate::cli::{ConvertOptions, Output};
use crate::error::{Error, Result};
use crate::execute;
use crate::output::{check_out_path, Staging};
use crate::plan;
use crate::report::{FileRecord, Report};
use crate::source;
use crate::writer::{copy_file, sha256_file, write_file, ShardWriter};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::IsTerminal;
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
    let plan = plan::plan(&checkpoint, &options.surgery, options.max_shard_size);

    let Some(out) = out else {
        if options.output == Output::Summary {
            for line in plan.describe(&checkpoint) {
                eprintln!("{line}");
            }
        }
        let bar = progress_bar(options, "{spinner} decomposing {pos}/{len} matrices");
        let groups = execute::reports_only(&checkpoint, &plan, &bar)?;
        bar.finish_and_clear();
        let report = Report::build(
            options,
            &input.identity,
            &checkpoint,
            &plan,
            groups,
            Vec::new(),
            None,
        );
        print(options, &report, started, None)?;
        return Ok(report);
    };

    let staging = Staging::create(&out)?;
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let bar = progress_bar(
        options,
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    );
    let groups = {
        let mut writer = ShardWriter::new(staging.path(), &mut digests);
        execute::execute(&checkpoint, &plan, &mut writer, &bar)?
    };
    bar.finish_and_clear();

    if plan.write_index {
        let weight_map = plan.weight_map();
        let index = serde_json::json!({
            "metadata": { "total_size": plan.data_len() },
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_string_pretty(&index).map_err(|source| Error::Json {
            path: INDEX_FILE.into(),
            source,
        })?;
        text.push('\n');
        digests.insert(
            INDEX_FILE.into(),
            write_file(&staging.path().join(INDEX_FILE), text.as_bytes())?,
        );
    }
    for copy in &plan.copies {
        let digest = copy_file(
            &checkpoint.dir.join(&copy.relative),
            &staging.path().join(&copy.relative),
        )?;
        digests.insert(copy.relative.to_string_lossy().into_owned(), digest);
    }

    let weight_files = checkpoint
        .shards
        .par_iter()
        .map(|s| {
            Ok(FileRecord {
                name: s.file_name.clone(),
                bytes: std::fs::metadata(&s.path)
                    .map_err(|e| Error::io(&s.path, e))?
                    .len(),
                sha256: sha256_file(&s.path)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let sizes = plan
        .shards
        .iter()
        .map(|s| {
            let p = staging.path().join(&s.file_name);
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| Error::io(&p, e))
        })
        .collect::<Result<Vec<u64>>>()?;
    let report = Report::build(
        options,
        &input.identity,
        &checkpoint,
        &plan,
        groups,
        weight_files,
        Some(&sizes),
    );
    let mut json = serde_json::to_string_pretty(&report).map_err(|source| Error::Json {
        path: "surgery.json".into(),
        source,
    })?;
    json.push('\n');
    digests.insert(
        "surgery.json".into(),
        write_file(&staging.path().join("surgery.json"), json.as_bytes())?,
    );
    write_file(
        &staging.path().join(checksums::FILE_NAME),
        checksums::format(&digests).as_bytes(),
    )?;
    staging.commit()?;
    print(
        options,
        &report,
        started,
        Some(&options.out.display().to_string()),
    )?;
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
