//! The fuzzing harness (not part of the public API): one byte string becomes a checkpoint directory
//! (config, optional index, shards), which is then opened and planned exactly as the converter does.
//! Used by the `cargo fuzz` target in `fuzz/` and by the stable-Rust replay test of its corpus
//! (`tests/fuzz_corpus.rs`), so every input the fuzzer kept, and every crash it found, is rerun in CI.
//! Two narrower entries take one parsing path each, without touching the filesystem: a factored
//! checkpoint's `config.json` ([`factored_config`]) and the split of fused tensors
//! ([`split_fused`]).
//!
//! Input format: sections separated by [`SEPARATOR`]: `config.json`, then
//! `model.safetensors.index.json` (an empty section means none), then the shards. Without an index
//! the first shard is `model.safetensors`; with one, shard `i` of `n` is
//! `model-0000i-of-0000n.safetensors`, as Hugging Face names them.

use crate::error::{Error, Result};
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::checkpoint::{Checkpoint, TensorEntry};
use crate::input::{fused, header};
use crate::model::config::ModelConfig;
use crate::model::layout::indexed_shard_name;
use crate::model::layout::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::model::shapes::Sizes;
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

/// `data` as a `config.json` (any, but meant to be a factored checkpoint's, with
/// `latent_attention`), parsed and validated exactly as opening a checkpoint does, then every
/// layer's attention tensors and their expected shapes laid out as the checks of an opened
/// checkpoint lay them out. Returns how many attention tensors the layers hold (0 for a
/// configuration that is not factored). Must never panic, hang or allocate without bound: a valid
/// `latent_attention` lists one width per layer, so the layers are bounded by the input.
pub fn factored_config(data: &[u8]) -> Result<usize> {
    let path = Path::new(CONFIG_FILE);
    let value: serde_json::Value = serde_json::from_slice(data).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let config = ModelConfig::from_json(&value, path)?;
    if config.latent.is_none() {
        return Ok(0);
    }
    let sizes = Sizes {
        intermediate: config.intermediate_size.unwrap_or(1),
        vocab: config.vocab_size.unwrap_or(1),
    };
    let mut count = 0usize;
    for layer in 0..config.num_layers {
        for (role, shape) in config.attention_tensors(layer) {
            if config.expected_shape(sizes, Some(layer), role).as_deref() != Some(&shape[..]) {
                return Err(Error::bug(format!(
                    "layer {layer}: {role:?} has two expected shapes"
                )));
            }
            count = count.saturating_add(1);
        }
    }
    Ok(count)
}

/// Sections of `data` ([`SEPARATOR`]): a `config.json`, then a safetensors file whose header is
/// parsed with its limits and each of whose tensors the configuration's name table knows is split
/// as opening a checkpoint splits it (a fused tensor into its parts, by head counts and
/// `intermediate_size`). Returns how many entries the tensors became. Must never panic, whatever
/// `data` is; an [`Error::Bug`] (a part's bytes outside its tensor's, or parts not tiling it) is a
/// defect for a fuzz target to report.
pub fn split_fused(data: &[u8]) -> Result<usize> {
    let parts = sections(data);
    let config_path = Path::new(CONFIG_FILE);
    let config_bytes = parts.first().copied().unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_slice(config_bytes).map_err(|source| Error::Json {
            path: config_path.to_path_buf(),
            source,
        })?;
    let config = ModelConfig::from_json(&value, config_path)?;
    let path = Path::new(SINGLE_FILE);
    let file = parts.get(1).copied().unwrap_or_default();
    let header = header::parse(file).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.message,
    })?;
    let mut count = 0usize;
    for (name, info) in header.tensors {
        let Some(class) = config.arch.classify(&name) else {
            continue;
        };
        let (begin, end) = info.data_offsets;
        let range = header
            .data_start
            .checked_add(begin)
            .zip(header.data_start.checked_add(end))
            .map(|(b, e)| b..e)
            .filter(|r| r.start <= r.end && r.end <= file.len())
            .ok_or_else(|| Error::bug(format!("{name}: header offsets outside the file")))?;
        let stored = TensorEntry {
            name,
            shard: 0,
            dtype: info.dtype,
            shape: info.shape,
            range: range.clone(),
            class,
            fused: None,
        };
        let mut next = range.start;
        for part in fused::split(&config, path, stored)? {
            if part.range.start != next || part.range.end > range.end {
                return Err(Error::bug(format!(
                    "{}: bytes {:?} do not follow on from {next} inside {range:?}",
                    part.name, part.range
                )));
            }
            next = part.range.end;
            count = count.saturating_add(1);
        }
        if next != range.end {
            return Err(Error::bug(format!("parts of {range:?} end at {next}")));
        }
    }
    Ok(count)
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
    fn factored_configs_are_parsed_and_laid_out() {
        let config = |latent: &str| {
            format!(
                r#"{{"architectures": ["SurgeryLlamaForCausalLM"], "hidden_size": 8,
                "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
                "latent_attention": {latent}}}"#
            )
        };
        let shared = r#"{"format_version": 2, "kv": "shared", "kv_rank": [3, 3],
            "kv_share": "basis", "kv_groups": [[0, 1]], "original_architectures": ["LlamaForCausalLM"]}"#;
        // Layer 0: q_proj, kv_a_proj, k_b_proj, v_b_proj; layer 1 reads layer 0's kv_a_proj.
        assert_eq!(factored_config(config(shared).as_bytes()).unwrap(), 7);
        let bad_groups = shared.replace("[[0, 1]]", "[[1, 0]]");
        let err = factored_config(config(&bad_groups).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("kv_groups"), "{err}");
        let wrong_type = shared.replace("\"format_version\": 2", "\"format_version\": \"2\"");
        let err = factored_config(config(&wrong_type).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("wrong type"), "{err}");
        for junk in [&b""[..], b"[]", b"{", b"\xff", b"{\"architectures\": 1}"] {
            assert!(factored_config(junk).is_err());
        }
    }

    #[test]
    fn fused_tensors_split_alone() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad/family-phi3-fused-rows/input");
        let config = std::fs::read(dir.join(CONFIG_FILE)).unwrap();
        let shard = std::fs::read(dir.join(SINGLE_FILE)).unwrap();
        // The case's layer 1 qkv_proj is one row too long.
        let err = split_fused(&join(&[&config, &shard])).unwrap_err();
        assert!(err.to_string().contains("row blocks do not sum"), "{err}");
        let llama = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad/_base/input/config.json"),
        )
        .unwrap();
        let phi3 = String::from_utf8(llama.clone())
            .unwrap()
            .replace("LlamaForCausalLM", "Phi3ForCausalLM");
        let base = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/bad/_base/input/model.safetensors"),
        )
        .unwrap();
        // The Llama tensors read under the Phi-3 table: none is fused, each passes as itself or
        // is refused as a part stored apart.
        assert!(split_fused(&join(&[phi3.as_bytes(), &base])).is_err());
        assert!(split_fused(&join(&[&llama, &base])).unwrap() > 0);
        // A well-formed qkv_proj [q 8 + k 4 + v 4, hidden 8] becomes its three parts.
        let data = vec![0u8; 16 * 8 * 4];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16, 8], &data)
                .unwrap();
        let file =
            safetensors::serialize([("model.layers.0.self_attn.qkv_proj.weight", view)], None)
                .unwrap();
        assert_eq!(split_fused(&join(&[phi3.as_bytes(), &file])).unwrap(), 3);
        for junk in [
            &b""[..],
            &join(&[&llama, b"abc"]),
            &join(&[&llama, &base[..base.len() - 1]]),
        ] {
            assert!(split_fused(junk).is_err());
        }
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
