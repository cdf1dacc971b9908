//! The cache a download fills, laid out as `huggingface_hub` writes and reads it:
//! `models--{org}--{name}/blobs/{etag}` (written as `{etag}.incomplete` and renamed only once its
//! size and hash are checked), `snapshots/{commit}/{file}` a relative symlink to the blob, and
//! `refs/{revision}` holding the commit. Every name joined here was checked first (`listing`), so
//! nothing is created outside the repo's folder.

use super::listing::Etag;
use hf_hub::Repo;
use std::io;
use std::path::{Path, PathBuf};

/// One repo's folder in the cache, at one commit.
pub struct Store {
    repo_dir: PathBuf,
    commit: String,
}

impl Store {
    /// The folder of `repo_id` under `cache_dir`, for `commit` (a checked commit hash).
    pub fn new(cache_dir: &Path, repo_id: &str, commit: &str) -> Store {
        Store {
            repo_dir: cache_dir.join(Repo::model(repo_id.to_string()).folder_name()),
            commit: commit.to_string(),
        }
    }

    /// The snapshot folder.
    pub fn snapshot(&self) -> PathBuf {
        self.repo_dir.join("snapshots").join(&self.commit)
    }

    /// Where `name` (a checked file name) sits in the snapshot.
    pub fn file(&self, name: &str) -> PathBuf {
        self.snapshot().join(name)
    }

    /// Whether the snapshot already holds `name` (a link to a blob that is there).
    pub fn has(&self, name: &str) -> bool {
        self.file(name).is_file()
    }

    /// The blobs folder.
    pub fn blobs(&self) -> PathBuf {
        self.repo_dir.join("blobs")
    }

    /// A verified blob's path.
    pub fn blob(&self, etag: &Etag) -> PathBuf {
        self.blobs().join(etag.as_str())
    }

    /// Where a blob is written before it is verified.
    pub fn incomplete(&self, etag: &Etag) -> PathBuf {
        self.blobs().join(format!("{}.incomplete", etag.as_str()))
    }

    /// Links `name` in the snapshot to the blob of `etag` (relative, as `huggingface_hub` does).
    pub fn link(&self, name: &str, etag: &Etag) -> io::Result<()> {
        let path = self.file(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let depth = name.matches('/').count() + 2;
        let target: PathBuf = std::iter::repeat_n(Path::new(".."), depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(etag.as_str());
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path)?;
        }
        std::os::unix::fs::symlink(target, &path)
    }

    /// Records that `revision` (a checked name, not the commit itself) is at this commit.
    pub fn write_ref(&self, revision: &str) -> io::Result<()> {
        let path = self.repo_dir.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension(format!("surgery-tmp-{}", std::process::id()));
        std::fs::write(&tmp, &self.commit)?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::hub::listing::check_etag;

    #[test]
    fn links_are_relative_and_resolve_at_any_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "c0ffee0123456789abcdef0123456789abcdef01";
        let store = Store::new(tmp.path(), "org/name", commit);
        let etag = check_etag(&"ab".repeat(32)).unwrap();
        std::fs::create_dir_all(store.blobs()).unwrap();
        std::fs::write(store.blob(&etag), b"x").unwrap();
        for name in ["config.json", "a/b/c.json"] {
            store.link(name, &etag).unwrap();
            assert_eq!(std::fs::read(store.file(name)).unwrap(), b"x");
            assert!(store.has(name));
            assert!(std::fs::read_link(store.file(name)).unwrap().is_relative());
        }
        // Linking again replaces the link.
        store.link("config.json", &etag).unwrap();
        store.write_ref("refs/pr/1").unwrap();
        let r = tmp.path().join("models--org--name/refs/refs/pr/1");
        assert_eq!(std::fs::read_to_string(r).unwrap(), commit);
    }
}
