//! A plan's non-tensor outputs and the end of a run: the shard index, the copied and generated
//! files, the report and `SHA256SUMS` written last, then the staging directory committed.

use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::model::layout::INDEX_FILE;
use crate::output::checksums;
use crate::output::staging::Staging;
use crate::output::writer::{copy_file, write_file};
use crate::plan::{FileSource, Plan};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes the shard index (when planned) and the plan's other files into `dir`, adding digests.
pub fn write_index_and_files(
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
        let bytes = crate::model::latent::to_pretty_bytes(&index, Path::new(INDEX_FILE))?;
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
pub fn output_sizes(plan: &Plan, dir: &Path) -> Result<Vec<u64>> {
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
pub fn finish(
    staging: Staging,
    report: &impl serde::Serialize,
    mut digests: BTreeMap<String, String>,
) -> Result<()> {
    let json = serde_json::to_value(report).map_err(|source| Error::Json {
        path: "surgery.json".into(),
        source,
    })?;
    let bytes = crate::model::latent::to_pretty_bytes(&json, Path::new("surgery.json"))?;
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
