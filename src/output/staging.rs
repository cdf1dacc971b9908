//! The output directory appears atomically, and never in place of what this run did not verify it
//! may replace.
//!
//! Everything is written into a hidden sibling staging directory, `.NAME.surgery-tmp-PID`, renamed
//! into place only when complete; on any failure it is removed. `--out` is checked when the run
//! starts ([`check_out_path`]: what is there, if anything, is recorded as an [`OutTarget`]) and again
//! by the commit ([`Staging::commit`]), which replaces only that:
//! - Nothing was there: the staging directory is renamed with `renameat2(RENAME_NOREPLACE)`
//!   ([`super::rename`]), which fails if anything appeared at `--out` meanwhile.
//! - With `--force`, an earlier output of this tool or an empty directory ([`super::previous`]) was
//!   there: the very same directory (device and inode) must still be there; it is swapped with the
//!   staging directory in one `renameat2(RENAME_EXCHANGE)`, examined again where it now lies (the
//!   staging path, which only this run uses), and only then removed. If it changed (someone put a
//!   file in it, replaced it) it is swapped back and left as it is. Where the file system cannot
//!   swap, it is renamed aside (`.NAME.surgery-old-PID`), examined there, and put back the same
//!   way if it changed.
//!
//! The steps are in `commit.rs`; where the file system refuses `RENAME_NOREPLACE`,
//! [`super::rename`] says what the fallback does and the one harmless window it leaves.
//!
//! When `--out` is taken during the run (another run finished first, a user or a program created
//! it), what is there is left untouched, the run fails with [`Error::OutChanged`], and the finished
//! output is kept beside it as `NAME.surgery-kept-PID` (named in the error) instead of being
//! thrown away. So of two runs to the same `--out`, with or without `--force`, the first to commit
//! wins and the other fails; a `--force` run replaces only the output that was there when it
//! started, never one that another run wrote since.
//!
//! Staging directories of killed runs are removed by the next run to the same `--out`
//! ([`super::stale`]).

use super::previous::{self, Verdict};
use super::rename::{self, Identity};
use super::stale;
use crate::error::{Error, Result};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The tag of a staging directory's name.
const STAGING: &str = "surgery-tmp";
/// The tag of an earlier output moved aside, where the file system cannot swap two directories.
pub(super) const ASIDE: &str = "surgery-old";

/// What `--out` held when the run started: what its commit may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing: the commit replaces nothing.
    Nothing,
    /// With `--force`, an earlier output or an empty directory: this very directory.
    Replaceable(Identity),
}

/// `--out` checked: its absolute path, and what was there.
#[derive(Debug, Clone)]
pub struct OutTarget {
    /// The absolute path (its parent canonical).
    pub path: PathBuf,
    /// What was there when it was checked.
    pub existing: Existing,
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(path, e))
}

/// Resolves `--out` to an absolute path whose parent exists, refusing an output that would overwrite,
/// sit inside, or contain the input, an existing `--out` without `force`, and with it one that is
/// neither an earlier output nor an empty directory.
pub fn check_out_path(input_dir: &Path, out: &Path, force: bool) -> Result<OutTarget> {
    let out_abs = absolute(out)?;
    let name = out_abs
        .file_name()
        .ok_or_else(|| {
            Error::usage(
                "--out",
                format!("`{}` does not name a directory", out.display()),
            )
        })?
        .to_owned();
    let parent = out_abs.parent().unwrap_or(Path::new("/"));
    let parent = parent.canonicalize().map_err(|e| {
        Error::usage(
            "--out",
            format!("parent directory of `{}` is not usable: {e}", out.display()),
        )
    })?;
    if !parent.is_dir() {
        return Err(Error::usage(
            "--out",
            format!(
                "parent of `{}` is not a directory (`{}` is a file)",
                out.display(),
                parent.display()
            ),
        ));
    }
    let out_abs = parent.join(name);
    let input = input_dir
        .canonicalize()
        .map_err(|e| Error::io(input_dir, e))?;
    let out_resolved = out_abs.canonicalize().unwrap_or_else(|_| out_abs.clone());
    if out_resolved == input || out_resolved.starts_with(&input) {
        return Err(Error::usage(
            "--out",
            format!(
                "`{}` is the input or inside it; choose a directory outside the input",
                out.display()
            ),
        ));
    }
    if input.starts_with(&out_resolved) {
        return Err(Error::usage(
            "--out",
            format!(
                "`{}` contains the input; choose a directory outside the input",
                out.display()
            ),
        ));
    }
    let existing = existing_at(&out_abs, out, force)?;
    Ok(OutTarget {
        path: out_abs,
        existing,
    })
}

/// What is at `out_abs` (`shown` as the user wrote it): nothing, or with `force` a directory the
/// commit may replace; anything else is refused.
pub fn existing_at(out_abs: &Path, shown: &Path, force: bool) -> Result<Existing> {
    let Some(id) = rename::identity(out_abs).map_err(|e| Error::io(out_abs, e))? else {
        return Ok(Existing::Nothing);
    };
    if !force {
        return Err(Error::usage(
            "--out",
            format!(
                "`{}` already exists; pass --force to replace it",
                shown.display()
            ),
        ));
    }
    match previous::examine(out_abs) {
        Verdict::Foreign(why) => Err(Error::usage(
            "--out",
            format!(
                "`{}` is not an output of surgery-convert ({why}); --force replaces only an \
                 earlier output or an empty directory: remove it yourself if it should go",
                shown.display()
            ),
        )),
        Verdict::Empty | Verdict::Output => Ok(Existing::Replaceable(id)),
    }
}

/// A staging directory that becomes the output on [`Staging::commit`], or vanishes if dropped.
pub struct Staging {
    pub(super) tmp: PathBuf,
    pub(super) target: OutTarget,
    /// Set once the staging path is no longer this run's to remove on drop.
    pub(super) settled: bool,
    /// The lock that tells other runs this staging directory is alive ([`stale`]).
    _lock: Option<OwnedFd>,
}

impl Staging {
    /// Removes stale staging directories of `target` and creates `.<name>.surgery-tmp-<pid>`
    /// beside it.
    pub fn create(target: &OutTarget) -> Result<Self> {
        let out = &target.path;
        stale::remove_stale(out, &[STAGING, ASIDE]);
        let tmp = sibling(out, STAGING);
        std::fs::create_dir(&tmp).map_err(|e| {
            Error::usage(
                "--out",
                format!(
                    "cannot create the output beside `{}`: {e}; choose a writable location",
                    out.display()
                ),
            )
        })?;
        crate::interrupt::register_staging(tmp.clone());
        let lock = stale::hold(&tmp);
        Ok(Staging {
            tmp,
            target: target.clone(),
            settled: false,
            _lock: lock,
        })
    }

    /// Where files are written until commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the staging directory into place, replacing only what [`OutTarget::existing`]
    /// allows, and only now (see the module doc).
    pub fn commit(mut self) -> Result<()> {
        crate::interrupt::check()?;
        sync_dir(&self.tmp)?;
        // From here a second signal leaves the staging path alone (the next run removes it): after
        // a swap it holds the earlier output, which only this code may remove, once examined.
        crate::interrupt::unregister_staging(&self.tmp);
        let replaced = match self.target.existing {
            Existing::Nothing => self.place().map(|()| None)?,
            Existing::Replaceable(id) => self.replace(id)?,
        };
        if let Some(old) = replaced {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        if let Some(parent) = self.target.path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.settled {
            let _ = std::fs::remove_dir_all(&self.tmp);
            crate::interrupt::unregister_staging(&self.tmp);
        }
    }
}

/// The hidden sibling `.NAME.TAG-PID` of `out` (this run's staging names).
pub(super) fn sibling(out: &Path, tag: &str) -> PathBuf {
    out.with_file_name(format!(".{}", name_tag_pid(out, tag)))
}

/// The visible sibling `NAME.TAG-PID` of `out` (what this run leaves for the user).
pub(super) fn beside(out: &Path, tag: &str) -> PathBuf {
    out.with_file_name(name_tag_pid(out, tag))
}

fn name_tag_pid(out: &Path, tag: &str) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name}.{tag}-{}", std::process::id())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished staging directory for `out` (`force` as the option), holding `new.txt`.
    fn staged(out: &Path, force: bool) -> Staging {
        let target = OutTarget {
            path: out.to_path_buf(),
            existing: existing_at(out, out, force).unwrap(),
        };
        let staging = Staging::create(&target).unwrap();
        std::fs::write(staging.path().join("new.txt"), "new").unwrap();
        staging
    }

    /// An earlier output: its files listed in SHA256SUMS.
    fn earlier_output(dir: &Path) {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("surgery.json"), "{}").unwrap();
        let sums = format!("{}  surgery.json\n", "0".repeat(64));
        std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Asserts `e` is the one-line [`Error::OutChanged`] and the output was kept where it says.
    fn assert_kept(e: Error, out: &Path) {
        let Error::OutChanged { kept, .. } = &e else {
            panic!("{e}");
        };
        let line = e.to_line();
        assert!(
            line.starts_with(&format!("--out {}: ", out.display())),
            "{line}"
        );
        let name = out.file_name().unwrap().to_string_lossy();
        let expected = format!("{name}.surgery-kept-{}", std::process::id());
        assert_eq!(kept, &out.with_file_name(expected), "{line}");
        assert_eq!(
            std::fs::read_to_string(kept.join("new.txt")).unwrap(),
            "new"
        );
    }

    #[test]
    fn a_directory_that_appears_during_the_run_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let staging = staged(&out, false);
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("mine.txt"), "mine").unwrap();
        let e = staging.commit().unwrap_err();
        assert!(e.to_line().contains("appeared there during the run"), "{e}");
        assert_kept(e, &out);
        assert_eq!(names(&out), ["mine.txt"]);
        assert_eq!(
            names(tmp.path()),
            ["out", &format!("out.surgery-kept-{}", std::process::id())]
        );
        // Even an empty directory, which plain rename(2) would have replaced.
        let out = tmp.path().join("out2");
        let staging = staged(&out, false);
        std::fs::create_dir(&out).unwrap();
        assert_kept(staging.commit().unwrap_err(), &out);
        assert!(names(&out).is_empty());
    }

    #[test]
    fn force_replaces_an_earlier_output_or_an_empty_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        earlier_output(&out);
        staged(&out, true).commit().unwrap();
        assert_eq!(names(&out), ["new.txt"]);
        let out = tmp.path().join("empty");
        std::fs::create_dir(&out).unwrap();
        staged(&out, true).commit().unwrap();
        assert_eq!(names(&out), ["new.txt"]);
        // Gone during the run: nothing to replace.
        let out = tmp.path().join("gone");
        earlier_output(&out);
        let staging = staged(&out, true);
        std::fs::remove_dir_all(&out).unwrap();
        staging.commit().unwrap();
        assert_eq!(names(&out), ["new.txt"]);
    }

    #[test]
    fn force_refuses_what_is_not_an_earlier_output() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, make) in [
            (
                "dir",
                (|p: &Path| {
                    std::fs::create_dir(p).unwrap();
                    std::fs::write(p.join("notes.txt"), "mine").unwrap();
                }) as fn(&Path),
            ),
            ("file", |p: &Path| std::fs::write(p, "mine").unwrap()),
        ] {
            let out = tmp.path().join(name);
            make(&out);
            let e = existing_at(&out, &out, true).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_line().contains("remove it yourself"), "{e}");
        }
        let e = existing_at(&tmp.path().join("dir"), Path::new("d"), false).unwrap_err();
        assert!(e.to_line().contains("already exists; pass --force"), "{e}");
    }

    #[test]
    fn force_replaces_only_what_was_there_when_the_run_started() {
        let tmp = tempfile::tempdir().unwrap();
        // A file added to the earlier output during the run: swapped back, untouched.
        let out = tmp.path().join("out");
        earlier_output(&out);
        let staging = staged(&out, true);
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = staging.commit().unwrap_err();
        assert!(e.to_line().contains("`notes.txt` is not listed"), "{e}");
        assert_kept(e, &out);
        assert_eq!(names(&out), ["SHA256SUMS", "notes.txt", "surgery.json"]);

        // Another run's output committed meanwhile (its staging directory renamed in; a directory
        // made after the old one was removed could reuse its inode, and is examined anyway).
        let out = tmp.path().join("raced");
        earlier_output(&out);
        let staging = staged(&out, true);
        let winner = tmp.path().join("winner");
        earlier_output(&winner);
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::rename(&winner, &out).unwrap();
        let e = staging.commit().unwrap_err();
        assert!(e.to_line().contains("was replaced during the run"), "{e}");
        assert_kept(e, &out);
        assert_eq!(names(&out), ["SHA256SUMS", "surgery.json"]);
    }

    #[test]
    fn without_an_exchange_the_replacement_is_as_careful() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        earlier_output(&out);
        let mut staging = staged(&out, true);
        let Existing::Replaceable(id) = staging.target.existing else {
            panic!("an earlier output");
        };
        let aside = staging.replace_by_renames(id).unwrap();
        assert_eq!(names(&out), ["new.txt"]);
        assert_eq!(names(&aside), ["SHA256SUMS", "surgery.json"]);

        let out = tmp.path().join("changed");
        earlier_output(&out);
        let mut staging = staged(&out, true);
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = staging.replace_by_renames(id).unwrap_err();
        assert_kept(e, &out);
        assert_eq!(names(&out), ["SHA256SUMS", "notes.txt", "surgery.json"]);
    }

    #[test]
    fn a_killed_runs_staging_directory_is_removed_by_the_next_run() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tmp.path().join(format!(".out.surgery-tmp-{dead}"));
        std::fs::create_dir(&stale).unwrap();
        let live = tmp.path().join(format!(
            ".out.surgery-tmp-{}",
            std::os::unix::process::parent_id()
        ));
        std::fs::create_dir(&live).unwrap();
        staged(&out, false).commit().unwrap();
        assert!(!stale.exists() && live.exists());
    }
}
