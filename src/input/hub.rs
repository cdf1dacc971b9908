//! Downloading a repo from the Hugging Face hub into the local cache with `hf-hub`'s blocking
//! client, as `huggingface_hub` would: `HF_ENDPOINT` and `HF_TOKEN` are honoured, and since the
//! client has no timeout, the download runs on its own thread, watched: no new byte in the repo's
//! `blobs/` for `HF_HUB_DOWNLOAD_TIMEOUT` seconds (default 10, as in `huggingface_hub`) is an
//! error, and so is Ctrl-C (`docs/hub-protocol.md` has what the client sends and expects).

use crate::error::{Error, Result};
use crate::model::layout::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Seconds without a new byte after which a download is given up, unless `HF_HUB_DOWNLOAD_TIMEOUT`
/// says otherwise.
const DEFAULT_TIMEOUT_SECONDS: f64 = 10.0;

/// How often the watcher looks.
const POLL: Duration = Duration::from_millis(50);

/// Downloads what the conversion needs of `repo_id` at `revision` into `cache_dir`; returns the
/// snapshot directory. `progress`: show the client's progress bars (on a terminal only).
pub fn download(
    repo_id: &str,
    revision: &str,
    cache_dir: &Path,
    progress: bool,
) -> Result<PathBuf> {
    let timeout = stall_timeout()?;
    let blobs = cache_dir
        .join(Repo::model(repo_id.to_string()).folder_name())
        .join("blobs");
    let (tx, rx) = mpsc::channel();
    let (repo, rev, dir) = (
        repo_id.to_string(),
        revision.to_string(),
        cache_dir.to_path_buf(),
    );
    std::thread::Builder::new()
        .name("hub-download".into())
        .spawn(move || {
            let _ = tx.send(fetch(&repo, &rev, &dir, progress));
        })
        .map_err(|e| Error::io("<download thread>", e))?;
    let (mut seen, mut since) = (bytes_in(&blobs), Instant::now());
    loop {
        match rx.recv_timeout(POLL) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::bug("the download thread ended without a result"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        crate::interrupt::check()?;
        let now = bytes_in(&blobs);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > timeout {
            return Err(Error::Source {
                input: repo_id.into(),
                message: format!(
                    "the Hugging Face hub sent nothing for {:.0} s (a stalled server or network); try again, or raise HF_HUB_DOWNLOAD_TIMEOUT",
                    timeout.as_secs_f64()
                ),
            });
        }
    }
}

/// `HF_HUB_DOWNLOAD_TIMEOUT` in seconds, or the default.
fn stall_timeout() -> Result<Duration> {
    let Some(text) = env_value("HF_HUB_DOWNLOAD_TIMEOUT") else {
        return Ok(Duration::from_secs_f64(DEFAULT_TIMEOUT_SECONDS));
    };
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            Error::usage(
                "HF_HUB_DOWNLOAD_TIMEOUT",
                format!("`{text}` is not a positive number of seconds (e.g. 10)"),
            )
        })
}

/// Bytes of every file in `dir` (partial downloads included), 0 if it does not exist.
fn bytes_in(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A non-empty environment variable.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// What to do about a refusal of the hub (`error` as hf-hub prints it): a 401 or 403 is a gated
/// or private repo, or a bad token.
fn access_hint(error: &str) -> &'static str {
    if error.ends_with("http status: 401") || error.ends_with("http status: 403") {
        " (a gated or private repo needs access: log in with `hf auth login` or set HF_TOKEN)"
    } else {
        ""
    }
}

/// Downloads config, weights and the small non-weight files of a repo into the cache (the
/// blocking `hf-hub` calls; [`download`] watches them).
fn fetch(repo_id: &str, revision: &str, cache_dir: &Path, progress: bool) -> Result<PathBuf> {
    let fail = |message: String| Error::Source {
        input: repo_id.into(),
        message,
    };
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir.to_path_buf()))
        .with_progress(progress && std::io::stderr().is_terminal());
    // As huggingface_hub does: HF_ENDPOINT replaces the hub's address, HF_TOKEN the token file.
    if let Some(endpoint) = env_value("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = env_value("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| fail(format!("cannot set up the Hugging Face client: {e}")))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = repo.info().map_err(|e| {
        fail(format!(
            "cannot list revision `{revision}` on the Hugging Face hub: {e}{}",
            access_hint(&e.to_string())
        ))
    })?;
    let config = repo.get(CONFIG_FILE).map_err(|e| {
        fail(format!(
            "cannot download {CONFIG_FILE}: {e}{}",
            access_hint(&e.to_string())
        ))
    })?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut weights: Vec<String> = Vec::new();
    if names.contains(&INDEX_FILE) {
        let index = repo
            .get(INDEX_FILE)
            .map_err(|e| fail(format!("cannot download {INDEX_FILE}: {e}")))?;
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
        if let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) {
            weights.extend(map.values().filter_map(|v| v.as_str()).map(str::to_string));
        }
        weights.sort();
        weights.dedup();
    } else {
        weights.push(SINGLE_FILE.to_string());
    }
    let others = names.iter().filter(|name| {
        let ext = Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        !name.starts_with('.') && !super::checkpoint::is_foreign_weight_extension(ext)
    });
    for name in weights.iter().map(String::as_str).chain(others.copied()) {
        repo.get(name).map_err(|e| {
            fail(format!(
                "cannot download {name}: {e}{}",
                access_hint(&e.to_string())
            ))
        })?;
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| fail("downloaded config.json has no parent directory".into()))
}
