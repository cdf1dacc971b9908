//! Resolving `--in`: a local checkpoint directory, or a Hugging Face repo id looked up in the local
//! Hugging Face cache (and downloaded with `hf-hub` unless `HF_HUB_OFFLINE` is set).
//!
//! `hf-hub` 0.5 is used with only its synchronous `ureq` client: a small dependency that reads the
//! cache layout `models--org--name/{refs,snapshots}` exactly as Python's `huggingface_hub` writes it.
//! It ignores `HF_HUB_OFFLINE` and `HF_HUB_CACHE`, so both are honoured here.

use crate::error::{Error, Result};
use crate::model::layout::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use hf_hub::{Cache, Repo, RepoType};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where the input came from, as recorded in the report.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum InputIdentity {
    /// A local directory, as given on the command line.
    Local {
        /// The `--in` value.
        path: String,
    },
    /// A Hugging Face repo.
    Hub {
        /// `org/name`.
        repo: String,
        /// The `--revision` asked for.
        revision: String,
        /// The commit the revision resolved to (the snapshot directory's name).
        commit: String,
    },
}

/// A resolved input: the directory to read and its identity.
#[derive(Debug, Clone)]
pub struct ResolvedInput {
    /// Directory holding `config.json` and the weights.
    pub dir: PathBuf,
    /// For the report.
    pub identity: InputIdentity,
}

/// Whether `s` has the shape of a Hugging Face repo id (`org/name`).
pub fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.starts_with('-')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The Hugging Face hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (the same order as `huggingface_hub`).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    Cache::default().path().clone()
}

/// Resolves `--in`; a download from the hub shows its progress on a terminal when `progress`.
pub fn resolve(input: &str, revision: &str, progress: bool) -> Result<ResolvedInput> {
    let path = Path::new(input);
    if path.exists() {
        if !path.is_dir() {
            return Err(Error::Source {
                input: input.into(),
                message: "not a directory (give the checkpoint directory holding config.json)"
                    .into(),
            });
        }
        return Ok(ResolvedInput {
            dir: path.to_path_buf(),
            identity: InputIdentity::Local { path: input.into() },
        });
    }
    if !looks_like_repo_id(input) {
        return Err(Error::Source {
            input: input.into(),
            message: "no such directory, and not a Hugging Face repo id of the form org/name"
                .into(),
        });
    }
    resolve_hub(
        input,
        revision,
        &hub_cache_dir(),
        env_flag("HF_HUB_OFFLINE"),
        progress,
    )
}

/// Resolves a repo id from the cache at `cache_dir`, downloading what is missing unless `offline`.
pub fn resolve_hub(
    repo_id: &str,
    revision: &str,
    cache_dir: &Path,
    offline: bool,
    progress: bool,
) -> Result<ResolvedInput> {
    // The revision names a file under `refs/`: held to the rules of a repo's file names.
    super::hub::listing::check_file_name(revision).map_err(|_| {
        Error::usage(
            "--revision",
            format!(
                "`{}` is not a branch, tag or commit name",
                super::hub::listing::shown(revision)
            ),
        )
    })?;
    if let Some(snapshot) = cached_snapshot(repo_id, revision, cache_dir) {
        if snapshot_is_complete(&snapshot) {
            return Ok(hub_input(repo_id, revision, snapshot));
        }
    }
    if offline {
        return Err(Error::Source {
            input: repo_id.into(),
            message: format!(
                "revision `{revision}` is not (completely) in the Hugging Face cache at {} and HF_HUB_OFFLINE is set",
                cache_dir.display()
            ),
        });
    }
    let snapshot = super::hub::download(repo_id, revision, cache_dir, progress)?;
    Ok(hub_input(repo_id, revision, snapshot))
}

fn hub_input(repo_id: &str, revision: &str, snapshot: PathBuf) -> ResolvedInput {
    let commit = snapshot
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    ResolvedInput {
        dir: snapshot,
        identity: InputIdentity::Hub {
            repo: repo_id.into(),
            revision: revision.into(),
            commit,
        },
    }
}

/// The snapshot directory of `revision` in the cache, if its `config.json` is there.
fn cached_snapshot(repo_id: &str, revision: &str, cache_dir: &Path) -> Option<PathBuf> {
    let cache = Cache::new(cache_dir.to_path_buf());
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    if let Some(config) = cache.repo(repo.clone()).get(CONFIG_FILE) {
        return config.parent().map(Path::to_path_buf);
    }
    // A ref file written with a trailing newline, or a revision that is itself a commit hash.
    let repo_dir = cache_dir.join(repo.folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let commit = super::hub::listing::check_commit(&commit).ok()?;
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.join(CONFIG_FILE).is_file().then_some(snapshot)
}

/// Whether a snapshot holds config and every weight file it needs.
fn snapshot_is_complete(snapshot: &Path) -> bool {
    let index = snapshot.join(INDEX_FILE);
    if let Ok(text) = std::fs::read_to_string(&index) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            return true; // let the checkpoint reader report the broken index
        };
        let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
            return true;
        };
        return map
            .values()
            .filter_map(|v| v.as_str())
            .all(|f| snapshot.join(f).is_file());
    }
    snapshot.join(SINGLE_FILE).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_shape() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_repo_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0"));
        for bad in [
            "TinyLlama",
            "a/b/c",
            "/abs/path",
            "./x/y",
            "../x",
            "org/",
            "a b/c",
        ] {
            assert!(!looks_like_repo_id(bad), "{bad}");
        }
    }
}
