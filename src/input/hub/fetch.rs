//! What a conversion needs of a repo, fetched in order: the revision's listing (its commit, its
//! files, every name checked), `config.json`, the index if listed and the shards it names (each
//! listed, each name checked) or `model.safetensors`, then the other small files, every one at the
//! listed commit and under the size limit of its kind.

use super::blob::{self, Remote};
use super::client::{Client, Follow};
use super::listing::{check_file_name, shown, url_encode, Listing, MAX_LISTING_BYTES};
use super::store::Store;
use super::{access_hint, env_value};
use crate::error::{Error, Result};
use crate::input::config_file::MAX_CONFIG_BYTES;
use crate::input::index::MAX_INDEX_BYTES;
use crate::model::layout::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use std::io::IsTerminal;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest weight file accepted (1 TiB; the largest shards on the hub are tens of GB).
const MAX_WEIGHT_BYTES: u64 = 1 << 40;

/// Largest other file accepted (256 MiB: tokenizers are tens of MB); a larger one is skipped with
/// a warning, since the conversion does not need it.
const MAX_OTHER_BYTES: u64 = 256 << 20;

/// The hub's address: `HF_ENDPOINT`, else the hub.
fn endpoint() -> String {
    env_value("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into())
}

/// The token: `HF_TOKEN`, else the file `huggingface_hub` saves it in (`HF_TOKEN_PATH`, else
/// `HF_HOME/token`).
fn token() -> Option<String> {
    if let Some(token) = env_value("HF_TOKEN") {
        return Some(token.trim().to_string());
    }
    let path = env_value("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        env_value("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| env_value("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
            .map(|home| home.join("token"))
    })?;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// Downloads what the conversion needs of `repo_id` at `revision` into `cache_dir`.
pub fn run(
    repo_id: &str,
    revision: &str,
    cache_dir: &Path,
    progress: bool,
    stall: Duration,
) -> Result<PathBuf> {
    let fail = |message: String| Error::Source {
        input: repo_id.into(),
        message,
    };
    let client = Client::new(&endpoint(), token(), stall).map_err(&fail)?;
    let listing = list(&client, repo_id, revision).map_err(|e| {
        fail(format!(
            "cannot list revision `{revision}` on the Hugging Face hub: {e}{}",
            access_hint(&e)
        ))
    })?;
    client.allow_files(listing.files.len());
    let store = Store::new(cache_dir, repo_id, &listing.commit);
    let repo = Repo {
        client: &client,
        store: &store,
        id: repo_id,
        listing: &listing,
        show: progress && std::io::stderr().is_terminal(),
    };
    if !listing.files.iter().any(|f| f == CONFIG_FILE) {
        return Err(fail(format!(
            "the repo has no {CONFIG_FILE} at revision `{revision}`"
        )));
    }
    repo.fetch(CONFIG_FILE, MAX_CONFIG_BYTES)?;
    for name in weight_files(&repo)? {
        repo.fetch(&name, MAX_WEIGHT_BYTES)?;
    }
    for name in other_files(&listing) {
        repo.fetch_optional(name, progress)?;
    }
    if revision != listing.commit {
        store
            .write_ref(revision)
            .map_err(|e| Error::io(cache_dir, e))?;
    }
    Ok(store.snapshot())
}

/// The listing of `revision`.
fn list(client: &Client, repo_id: &str, revision: &str) -> std::result::Result<Listing, String> {
    let url = format!(
        "{}/api/models/{repo_id}/revision/{}",
        client.endpoint(),
        url_encode(revision, false)
    );
    let answer = client.get(&url, None, Follow::SameOrigin)?;
    let status = answer.status();
    if !status.is_success() {
        return Err(format!("http status: {}", status.as_u16()));
    }
    let body = answer
        .response
        .into_body()
        .into_with_config()
        .limit(MAX_LISTING_BYTES)
        .read_to_vec()
        .map_err(|e| client.transport(e))?;
    Listing::parse(&body)
}

/// The weight files: the index and the shards it names, or `model.safetensors`.
fn weight_files(repo: &Repo) -> Result<Vec<String>> {
    if !repo.listing.files.iter().any(|f| f == INDEX_FILE) {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let index = repo.fetch(INDEX_FILE, MAX_INDEX_BYTES)?;
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.clone(),
        source,
    })?;
    let mut shards: Vec<String> = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|map| {
            map.values()
                .filter_map(|v| v.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    for shard in &shards {
        let invalid = |message: String| Error::Invalid {
            path: index.clone(),
            message,
        };
        check_file_name(shard)
            .map_err(|e| invalid(e.replace("the hub listed", "the index names")))?;
        if !repo.listing.files.contains(shard) {
            return Err(invalid(format!(
                "names shard `{}`, which the repo does not hold",
                shown(shard)
            )));
        }
    }
    Ok(shards)
}

/// The other files worth carrying: not hidden, not another weight format, not the ones above.
fn other_files(listing: &Listing) -> impl Iterator<Item = &str> {
    listing.files.iter().map(String::as_str).filter(|name| {
        let ext = Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        !name.starts_with('.')
            && !crate::input::checkpoint::is_foreign_weight_extension(ext)
            && *name != CONFIG_FILE
            && *name != INDEX_FILE
            && !name.ends_with(".safetensors")
    })
}

/// One download's context.
struct Repo<'a> {
    client: &'a Client,
    store: &'a Store,
    id: &'a str,
    listing: &'a Listing,
    show: bool,
}

impl Repo<'_> {
    fn fail(&self, name: &str, message: String) -> Error {
        Error::Source {
            input: self.id.into(),
            message: format!(
                "cannot download {}: {message}{}",
                shown(name),
                access_hint(&message)
            ),
        }
    }

    /// The resolve URL of `name` at the listing's commit.
    fn url(&self, name: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.client.endpoint(),
            self.id,
            self.listing.commit,
            url_encode(name, true)
        )
    }

    /// `name`'s metadata, refused over `limit`.
    fn remote(&self, name: &str, limit: u64) -> Result<Remote> {
        let remote = blob::metadata(self.client, &self.url(name), &self.listing.commit)
            .map_err(|e| self.fail(name, e))?;
        if remote.size > limit {
            return Err(self.fail(
                name,
                format!(
                    "the hub says it is {} bytes, over the {} accepted for this kind of file; nothing was written",
                    remote.size, limit
                ),
            ));
        }
        Ok(remote)
    }

    /// Puts `name` (at most `limit` bytes) in the snapshot; returns its path there.
    fn fetch(&self, name: &str, limit: u64) -> Result<PathBuf> {
        if !self.store.has(name) {
            let remote = self.remote(name, limit)?;
            self.store_blob(name, &remote)?;
        }
        Ok(self.store.file(name))
    }

    /// Like [`Repo::fetch`] for a file the conversion can do without: one over the limit is
    /// skipped, with a warning when `warn`. Returns whether it is there.
    fn fetch_optional(&self, name: &str, warn: bool) -> Result<bool> {
        if self.store.has(name) {
            return Ok(true);
        }
        let remote = blob::metadata(self.client, &self.url(name), &self.listing.commit)
            .map_err(|e| self.fail(name, e))?;
        if remote.size > MAX_OTHER_BYTES {
            if warn {
                eprintln!(
                    "surgery-convert: warning: --in {}: skipped {} ({} bytes, over the {MAX_OTHER_BYTES} accepted for a file the conversion does not read)",
                    self.id,
                    shown(name),
                    remote.size
                );
            }
            return Ok(false);
        }
        self.store_blob(name, &remote)?;
        Ok(true)
    }

    /// Downloads (unless whole already) and links the blob of `remote`.
    fn store_blob(&self, name: &str, remote: &Remote) -> Result<()> {
        let blob = self.store.blob(&remote.etag);
        if !blob::blob_is_whole(&blob, remote) {
            if blob.exists() {
                std::fs::remove_file(&blob).map_err(|e| Error::io(&blob, e))?;
            }
            blob::download(self.client, self.store, name, remote, self.show)
                .map_err(|f| self.fail(name, f.message))?;
        }
        self.store
            .link(name, &remote.etag)
            .map_err(|e| Error::io(self.store.file(name), e))
    }
}
