//! `surgery-convert verify DIR`: recomputes every checksum in `SHA256SUMS`, validates every
//! safetensors header (offsets in bounds and contiguous, dtype x shape = byte length) and the shard
//! index against the shards. Each problem is reported on its own line. When the files are intact,
//! the checkpoint is then opened as every command opens it ([`Checkpoint::open`]: `config.json`, a
//! factored checkpoint's groups and ranks, every tensor's presence and shape); its first problem
//! is the error.

use crate::digest::sha256_file;
use crate::error::{Error, Result};
use crate::input::checkpoint::{map_file, Checkpoint};
use crate::model::layout::INDEX_FILE;
use crate::output::checksums;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What a successful verification covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Files whose checksum matched.
    pub files: usize,
    /// Safetensors files whose header is valid.
    pub weight_files: usize,
    /// Tensors in them.
    pub tensors: usize,
}

/// Runs `verify DIR`: checks it and prints what was covered.
pub fn run(dir: &Path) -> Result<()> {
    let v = verify(dir)?;
    println!(
        "OK: {} ({} files match SHA256SUMS; {} safetensors files, {} tensors, headers, index, config and shapes valid)",
        dir.display(),
        v.files,
        v.weight_files,
        v.tensors
    );
    Ok(())
}

/// Verifies `dir`.
pub fn verify(dir: &Path) -> Result<Verified> {
    if !dir.is_dir() {
        return Err(Error::invalid(dir, "not a directory"));
    }
    let sums_path = dir.join(checksums::FILE_NAME);
    let text = std::fs::read_to_string(&sums_path).map_err(|e| Error::io(&sums_path, e))?;
    let entries = checksums::parse(&text, &sums_path)?;
    let mut problems = Vec::new();
    let present: BTreeSet<String> = crate::input::files::walk(dir, true)?
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    let mut files = 0;
    for (name, expected) in &entries {
        if name.split('/').any(|p| p == ".." || p.is_empty()) || Path::new(name).is_absolute() {
            problems.push(format!("{name}: path leaves the directory; refused"));
            continue;
        }
        let path = dir.join(name);
        if !path.is_file() {
            problems.push(format!("{name}: listed in SHA256SUMS but missing"));
            continue;
        }
        let actual = sha256_file(&path)?;
        if &actual != expected {
            problems.push(format!(
                "{name}: checksum mismatch (SHA256SUMS has {expected}, file has {actual})"
            ));
        } else {
            files += 1;
        }
    }
    for name in &present {
        if name != checksums::FILE_NAME && !listed.contains(name.as_str()) {
            problems.push(format!("{name}: not listed in SHA256SUMS"));
        }
    }

    // Headers of every safetensors file.
    let mut shard_tensors: BTreeMap<String, (BTreeSet<String>, u64)> = BTreeMap::new();
    for name in present.iter().filter(|n| n.ends_with(".safetensors")) {
        let path = dir.join(name);
        let map = map_file(&path)?;
        match crate::input::header::parse(&map) {
            Ok(header) => {
                let data_len = (map.len() - header.data_start) as u64;
                let names: BTreeSet<String> = header.tensors.into_iter().map(|(n, _)| n).collect();
                shard_tensors.insert(name.clone(), (names, data_len));
            }
            Err(e) => problems.push(format!("{name}: invalid safetensors header: {e}")),
        }
    }

    // The index against the shards.
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let text =
            crate::input::files::read_limited(&index_path, crate::input::index::MAX_INDEX_BYTES)?;
        match serde_json::from_str::<Value>(&text) {
            Err(e) => problems.push(format!("{INDEX_FILE}: not valid JSON: {e}")),
            Ok(value) => check_index(&value, &shard_tensors, &mut problems),
        }
    }

    if problems.is_empty() && !shard_tensors.is_empty() {
        // The files are intact and consistent: the checkpoint they make must also open as every
        // command opens it (config.json, a factored one's latent_attention: groups and ranks, and
        // every tensor's presence and shape).
        Checkpoint::open(dir)?;
    }
    if problems.is_empty() {
        Ok(Verified {
            files,
            weight_files: shard_tensors.len(),
            tensors: shard_tensors.values().map(|(n, _)| n.len()).sum(),
        })
    } else {
        Err(Error::VerifyFailed {
            dir: dir.to_path_buf(),
            problems,
        })
    }
}

fn check_index(
    value: &Value,
    shards: &BTreeMap<String, (BTreeSet<String>, u64)>,
    problems: &mut Vec<String>,
) {
    let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
        problems.push(format!("{INDEX_FILE}: missing `weight_map`"));
        return;
    };
    let mut referenced = BTreeSet::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            problems.push(format!(
                "{INDEX_FILE}: entry for tensor `{tensor}` is not a file name"
            ));
            continue;
        };
        referenced.insert(file.to_string());
        match shards.get(file) {
            None => problems.push(format!(
                "{INDEX_FILE}: tensor `{tensor}` is mapped to {file}, which is missing or invalid"
            )),
            Some((names, _)) if !names.contains(tensor) => problems.push(format!(
                "{INDEX_FILE}: tensor `{tensor}` is mapped to {file}, which does not contain it"
            )),
            Some(_) => {}
        }
    }
    let mut total = 0u64;
    for file in &referenced {
        if let Some((names, len)) = shards.get(file) {
            total += len;
            for name in names {
                if map.get(name).and_then(Value::as_str) != Some(file.as_str()) {
                    problems.push(format!(
                        "{file}: tensor `{name}` is not mapped to this file in {INDEX_FILE}"
                    ));
                }
            }
        }
    }
    if let Some(declared) = value
        .pointer("/metadata/total_size")
        .and_then(Value::as_u64)
    {
        if declared != total {
            problems.push(format!("{INDEX_FILE}: metadata.total_size is {declared} but the shards hold {total} bytes of tensor data"));
        }
    }
}
