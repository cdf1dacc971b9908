//! What `--force` may replace: an earlier output of this tool, recognised by what the tool writes,
//! or an empty directory. Anything else at `--out` (a user's folder, a file, a symlink) is never
//! replaced: the user removes it.
//!
//! An earlier output is a directory holding only regular files (in subdirectories too) and either
//! - a `SHA256SUMS` that lists `surgery.json` (present) and every other file (what a conversion and
//!   `expand` write), or
//! - exactly the three files of a sweep, [`SWEEP_FILES`].
//!
//! Files are not hashed: the question is whose directory it is, not whether it is intact. A file the
//! tool did not write (a note a user left inside, an editor's backup) makes it someone else's.

use crate::output::checksums;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The files of a `sweep` output (it has no `SHA256SUMS`).
pub const SWEEP_FILES: [&str; 3] = ["sweep.json", "sweep.md", "sweep.svg"];

/// Entries examined at most before a directory is called someone else's.
const MAX_ENTRIES: usize = 100_000;

/// The largest `SHA256SUMS` read (one line per file: far above any checkpoint's).
const MAX_SUMS_BYTES: u64 = 16 << 20;

/// What a path holds, as far as replacing it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An empty directory.
    Empty,
    /// An earlier output of this tool.
    Output,
    /// Anything else; why, in words ("`notes.txt` is not listed in its SHA256SUMS").
    Foreign(String),
}

/// Examines `path` (symlinks not followed). Any failure to read it makes it [`Verdict::Foreign`]:
/// what cannot be read is not replaced.
pub fn examine(path: &Path) -> Verdict {
    match path.symlink_metadata() {
        Err(e) => return Verdict::Foreign(format!("cannot be examined ({e})")),
        Ok(m) if m.file_type().is_symlink() => {
            return Verdict::Foreign("it is a symbolic link".into())
        }
        Ok(m) if !m.is_dir() => return Verdict::Foreign("it is not a directory".into()),
        Ok(_) => {}
    }
    let files = match files(path) {
        Ok(files) => files,
        Err(why) => return Verdict::Foreign(why),
    };
    if files.is_empty() {
        return Verdict::Empty;
    }
    if files.contains(checksums::FILE_NAME) {
        return listed(path, &files);
    }
    let sweep: BTreeSet<String> = SWEEP_FILES.iter().map(|s| s.to_string()).collect();
    if files == sweep {
        return Verdict::Output;
    }
    let first = files.iter().next().cloned().unwrap_or_default();
    Verdict::Foreign(format!("it holds `{first}` and no SHA256SUMS"))
}

/// Every regular file below `dir`, relative; `Err` names the first entry the tool never writes
/// (a symlink, a device, an empty directory, a name that is not UTF-8).
fn files(dir: &Path) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    let mut seen = 0usize;
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        let entries = std::fs::read_dir(&full)
            .map_err(|e| format!("`{}` cannot be read ({e})", full.display()))?;
        let mut empty = true;
        for entry in entries {
            empty = false;
            seen += 1;
            if seen > MAX_ENTRIES {
                return Err(format!("it holds more than {MAX_ENTRIES} entries"));
            }
            let entry = entry.map_err(|e| format!("`{}` cannot be read ({e})", full.display()))?;
            let rel_path = rel.join(entry.file_name());
            let shown = rel_path.display().to_string();
            let Some(name) = rel_path.to_str().map(str::to_owned) else {
                return Err(format!("`{shown}` is not a name the tool writes"));
            };
            let kind = entry
                .file_type()
                .map_err(|e| format!("`{shown}` cannot be examined ({e})"))?;
            if kind.is_dir() {
                stack.push(rel_path);
            } else if kind.is_file() {
                out.insert(name);
            } else {
                return Err(format!("`{shown}` is not a regular file"));
            }
        }
        if empty && !rel.as_os_str().is_empty() {
            return Err(format!("`{}` is an empty directory", rel.display()));
        }
    }
    Ok(out)
}

/// [`Verdict::Output`] when `SHA256SUMS` lists `surgery.json` and every other file of `files`.
fn listed(dir: &Path, files: &BTreeSet<String>) -> Verdict {
    let path = dir.join(checksums::FILE_NAME);
    let entries = crate::input::files::read_limited(&path, MAX_SUMS_BYTES)
        .and_then(|text| checksums::parse(&text, &path));
    let Ok(entries) = entries else {
        return Verdict::Foreign("its SHA256SUMS is not one surgery-convert writes".into());
    };
    let names: BTreeSet<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
    if !names.contains("surgery.json") || !files.contains("surgery.json") {
        return Verdict::Foreign("it has no surgery.json".into());
    }
    match files
        .iter()
        .find(|f| f.as_str() != checksums::FILE_NAME && !names.contains(f.as_str()))
    {
        Some(extra) => Verdict::Foreign(format!("`{extra}` is not listed in its SHA256SUMS")),
        None => Verdict::Output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Verdict {
        fn replaceable(&self) -> bool {
            !matches!(self, Verdict::Foreign(_))
        }
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    fn sums(names: &[&str]) -> String {
        names
            .iter()
            .map(|n| format!("{}  {n}\n", "0".repeat(64)))
            .collect()
    }

    #[test]
    fn earlier_outputs_and_empty_directories_are_replaceable() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(examine(&empty), Verdict::Empty);

        let converted = tmp.path().join("converted");
        let listing = sums(&["config.json", "original/params.json", "surgery.json"]);
        write(
            &converted,
            &[
                ("config.json", "{}"),
                ("original/params.json", "{}"),
                ("surgery.json", "{}"),
                ("SHA256SUMS", &listing),
            ],
        );
        assert_eq!(examine(&converted), Verdict::Output);

        let sweep = tmp.path().join("sweep");
        write(&sweep, &SWEEP_FILES.map(|f| (f, "x")));
        assert_eq!(examine(&sweep), Verdict::Output);
    }

    #[test]
    fn anything_else_is_someone_elses() {
        let tmp = tempfile::tempdir().unwrap();
        let foreign = |name: &str, files: &[(&str, &str)]| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            write(&dir, files);
            let verdict = examine(&dir);
            assert!(!verdict.replaceable(), "{name}: {verdict:?}");
            verdict
        };
        let listing = sums(&["config.json", "surgery.json"]);
        let v = foreign(
            "extra",
            &[
                ("config.json", "{}"),
                ("surgery.json", "{}"),
                ("SHA256SUMS", &listing),
                ("notes.txt", "mine"),
            ],
        );
        assert_eq!(
            v,
            Verdict::Foreign("`notes.txt` is not listed in its SHA256SUMS".into())
        );
        foreign("user", &[("notes.txt", "mine")]);
        foreign("no-report", &[("SHA256SUMS", &sums(&["a"])), ("a", "")]);
        foreign("bad-sums", &[("SHA256SUMS", "hello"), ("surgery.json", "")]);
        foreign(
            "sweep-plus",
            &[
                ("sweep.json", ""),
                ("sweep.md", ""),
                ("sweep.svg", ""),
                ("x", ""),
            ],
        );
        foreign("sweep-part", &[("sweep.json", "")]);
        std::fs::create_dir_all(tmp.path().join("nested-empty/sub")).unwrap();
        assert!(!examine(&tmp.path().join("nested-empty")).replaceable());

        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(!examine(&file).replaceable());
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("extra"), &link).unwrap();
        assert_eq!(
            examine(&link),
            Verdict::Foreign("it is a symbolic link".into())
        );
    }
}
