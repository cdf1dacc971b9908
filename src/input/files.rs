//! Reading a checkpoint directory safely: walking it deterministically, keeping every opened path
//! inside it (symlinks resolved), and reading small JSON files with a size limit.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The directory no file of the checkpoint in `dir` may leave once symlinks are resolved: `dir`
/// itself, or for a Hugging Face cache snapshot (`models--org--name/snapshots/<commit>`), the repo
/// folder, since a snapshot's files are symlinks into its `blobs/`.
pub fn containment_root(dir: &Path) -> Result<PathBuf> {
    let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let repo = dir.parent().and_then(|snapshots| {
        let is_snapshots = snapshots.file_name().is_some_and(|n| n == "snapshots");
        let repo = snapshots.parent()?;
        let is_repo = repo
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("models--"));
        (is_snapshots && is_repo).then(|| repo.to_path_buf())
    });
    Ok(repo.unwrap_or(dir))
}

/// Refuses `path` unless it resolves (symlinks followed) to a regular file inside `root` (a
/// canonical path from [`containment_root`]).
pub fn check_contained(root: &Path, path: &Path) -> Result<()> {
    let resolved = path.canonicalize().map_err(|e| Error::io(path, e))?;
    if !resolved.starts_with(root) {
        return Err(Error::invalid(
            path,
            format!(
                "resolves to `{}`, outside the checkpoint directory `{}` (refused: nothing outside it is opened; copy the file into the directory instead of linking it)",
                resolved.display(),
                root.display()
            ),
        ));
    }
    if !resolved.is_file() {
        return Err(Error::invalid(path, "not a regular file"));
    }
    Ok(())
}

/// Reads a UTF-8 text file of at most `limit` bytes, refusing a larger one before reading it.
pub fn read_limited(path: &Path, limit: u64) -> Result<String> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > limit {
        return Err(Error::invalid(
            path,
            format!("{len} bytes, more than the {limit}-byte limit for this file"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| Error::invalid(path, format!("not UTF-8 text: {e}")))
}

/// Every file below `dir`, relative to it and sorted. Entries whose name starts with `.` (files and
/// whole directories) are left out unless `include_hidden`. Symlinks to files are followed when they
/// resolve inside `dir`; any other symlink (leaving `dir`, or to a directory) is refused.
pub fn walk(dir: &Path, include_hidden: bool) -> Result<Vec<PathBuf>> {
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    walk_within(dir, include_hidden, &root)
}

/// [`walk`], with symlinks allowed to resolve anywhere inside `root` (canonical).
pub fn walk_within(dir: &Path, include_hidden: bool, root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        for entry in std::fs::read_dir(&full).map_err(|e| Error::io(&full, e))? {
            let entry = entry.map_err(|e| Error::io(&full, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::invalid(entry.path(), "file name is not valid UTF-8"));
            };
            if name.starts_with('.') && !include_hidden {
                continue;
            }
            let rel_path = rel.join(name);
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            if kind.is_symlink() {
                // Followed only to a regular file inside the root: a symlinked directory could
                // loop or lead anywhere.
                check_contained(root, &entry.path())?;
                out.push(rel_path);
            } else if kind.is_dir() {
                stack.push(rel_path);
            } else if kind.is_file() {
                out.push(rel_path);
            } else {
                return Err(Error::invalid(
                    entry.path(),
                    "not a regular file, directory or symlink (refused)",
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}
