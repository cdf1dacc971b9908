//! The fuzzing harness (not part of the public API): one byte string becomes a checkpoint directory
//! (config, optional index, shards), which is then opened and planned exactly as the converter does.
//! Used by the `cargo fuzz` target in `fuzz/` and by the stable-Rust replay test of its corpus
//! (`tests/fuzz_corpus.rs`), so every input the fuzzer kept, and every crash it found, is rerun in CI.
//!
//! Input format: sections separated by [`SEPARATOR`]: `config.json`, then
//! `model.safetensors.index.json` (an empty section means none), then the shards. Without an index
//! the first shard is `model.safetensors`; with one, shard `i` of `n` is
//! `model-0000i-of-0000n.safetensors`, as Hugging Face names them.

use crate::error::{Error, Result};
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::model::layout::indexed_shard_name;
use crate::model::layout::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::plan::{self, Layout, Surgery};
use std::path::Path;

/// Separates the sections of a fuzz input.
pub const SEPARATOR: &[u8] = b"\n--8<--\n";

/// Most shards one input becomes.
const MAX_SHARDS: usize = 8;

/// Splits `data` at [`SEPARATOR`].
pub fn sections(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

/// Joins sections into one fuzz input (the inverse of [`sections`]).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEPARATOR)
}

/// Writes `data`'s sections into `dir` (emptied first), then opens the checkpoint and plans a dense
/// `--q 0.9 --shared-kv 0.3` conversion of it. Returns the error a user would see; must never panic,
/// hang or allocate without bound, whatever `data` is.
pub fn open_and_plan(data: &[u8], dir: &Path) -> Result<usize> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let parts = sections(data);
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    };
    if let Some(config) = parts.first() {
        write(CONFIG_FILE, config)?;
    }
    let index = parts.get(1).copied().unwrap_or_default();
    let shards: Vec<&[u8]> = parts.iter().skip(2).take(MAX_SHARDS).copied().collect();
    if index.is_empty() {
        if let Some(shard) = shards.first() {
            write(SINGLE_FILE, shard)?;
        }
    } else {
        write(INDEX_FILE, index)?;
        for (i, shard) in shards.iter().enumerate() {
            write(&indexed_shard_name(i, shards.len()), shard)?;
        }
    }
    let checkpoint = Checkpoint::open(dir)?;
    let surgery = Surgery {
        q: Some(Spec::Threshold(0.9)),
        k: None,
        v: None,
        shared_kv: Some(Spec::Threshold(0.3)),
        fit: Fit::Pca,
        sharing: None,
        compensate: None,
    };
    let groups = plan::groups(&checkpoint, &surgery);
    let plan = plan::plan(&checkpoint, groups, &Layout::Dense, Some(1 << 20))?;
    Ok(plan.groups.len())
}

/// The hub's answers (feature `fuzzing`): `data`'s sections are a revision listing, an ETag, a
/// `Content-Range` and a redirect `Location`, each checked as a download checks it (file names that
/// stay inside the repo, hashes, sizes, redirect targets). Must never panic.
pub fn hub_answer(data: &[u8]) -> usize {
    crate::input::hub::fuzz_answer(&sections(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip() {
        let parts: [&[u8]; 3] = [b"{}", b"", b"abc"];
        assert_eq!(sections(&join(&parts)), parts.to_vec());
        assert_eq!(sections(b"x"), vec![b"x".as_slice()]);
    }

    #[test]
    fn a_real_fixture_plans() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-f32-gqa");
        let config = std::fs::read(dir.join(CONFIG_FILE)).unwrap();
        let shard = std::fs::read(dir.join(SINGLE_FILE)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let groups = open_and_plan(&join(&[&config, b"", &shard]), tmp.path()).unwrap();
        assert!(groups > 0);
        let err = open_and_plan(&join(&[&config, b"", &shard[..100]]), tmp.path()).unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
}
