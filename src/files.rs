//! Walking a directory tree: every regular file (symlinks followed) as a path relative to the root,
//! sorted, so listings are deterministic.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Every file below `dir`, relative to it and sorted. Entries whose name starts with `.` (files and
/// whole directories) are left out unless `include_hidden`.
pub fn walk(dir: &Path, include_hidden: bool) -> Result<Vec<PathBuf>> {
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
            if entry.path().is_dir() {
                stack.push(rel_path);
            } else {
                out.push(rel_path);
            }
        }
    }
    out.sort();
    Ok(out)
}
