//! Downloading a repo from the Hugging Face hub into the local cache, as `huggingface_hub` would:
//! `HF_ENDPOINT` and `HF_TOKEN` are honoured, the cache is laid out as `huggingface_hub` reads it,
//! and everything the hub sends is untrusted input. `hf-hub`'s download API could not be made to
//! check what it writes (it joins listed names and headers into paths, commits unverified bodies,
//! sends the token across redirects), so it is replaced here: [`listing`] checks names, commits and
//! ETags (pure), [`client`] sends the requests (redirects bounded, the token kept to the endpoint's
//! origin, every wait bounded by `HF_HUB_DOWNLOAD_TIMEOUT`), [`blob`] fetches one file (size limits
//! before writing, length and SHA-256 checked before a blob enters the cache) and [`store`] lays
//! out the cache. The download runs on its own thread so that Ctrl-C is answered at once
//! (`docs/hub-protocol.md` has what is sent and expected).

mod blob;
mod client;
mod fetch;
pub mod listing;
mod store;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Seconds without a new byte after which a download is given up, unless `HF_HUB_DOWNLOAD_TIMEOUT`
/// says otherwise.
const DEFAULT_TIMEOUT_SECONDS: f64 = 10.0;

/// How often the watcher looks.
const POLL: Duration = Duration::from_millis(50);

/// Downloads what the conversion needs of `repo_id` at `revision` into `cache_dir`; returns the
/// snapshot directory. `progress`: show a bar per file (on a terminal only) and warnings.
pub fn download(
    repo_id: &str,
    revision: &str,
    cache_dir: &Path,
    progress: bool,
) -> Result<PathBuf> {
    let stall = stall_timeout()?;
    let (tx, rx) = mpsc::channel();
    let (repo, rev, dir) = (
        repo_id.to_string(),
        revision.to_string(),
        cache_dir.to_path_buf(),
    );
    std::thread::Builder::new()
        .name("hub-download".into())
        .spawn(move || {
            let _ = tx.send(fetch::run(&repo, &rev, &dir, progress, stall));
        })
        .map_err(|e| Error::io("<download thread>", e))?;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::bug("the download thread ended without a result"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => crate::interrupt::check()?,
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

/// The fuzzing entry of what a hub sends (feature `fuzzing`): `sections` are a revision listing,
/// an ETag, a `Content-Range` and a redirect `Location`; each is checked as a download checks it.
/// Must never panic; returns how many were accepted.
#[cfg(feature = "fuzzing")]
#[allow(clippy::panic)] // a broken containment invariant must crash, for the fuzzer to report it
pub fn fuzz_answer(sections: &[&[u8]]) -> usize {
    let text = |i: usize| String::from_utf8_lossy(sections.get(i).copied().unwrap_or_default());
    let mut accepted = 0;
    if let Ok(listing) = listing::Listing::parse(sections.first().copied().unwrap_or_default()) {
        accepted += 1 + listing.files.len();
        let store = store::Store::new(Path::new("/nonexistent"), "org/name", &listing.commit);
        for name in &listing.files {
            // A checked name stays inside the repo's folder.
            if !store.file(name).starts_with(store.snapshot()) {
                panic!("a checked name left the snapshot: {name:?}");
            }
        }
    }
    accepted += usize::from(listing::check_etag(&text(1)).is_ok());
    accepted += usize::from(listing::content_range_total(&text(2)).is_ok());
    accepted += usize::from(listing::content_range_start(&text(2)).is_some());
    let base = "https://huggingface.co/org/name/resolve/main/config.json";
    accepted += usize::from(client::resolve(base, &text(3)).is_ok());
    accepted
}
