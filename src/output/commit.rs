//! The commit's steps (see [`super::staging`]'s module doc): the staging directory renamed to a
//! free `--out`, or swapped with the earlier output `--force` may replace, which is examined again
//! where it then lies and removed only if it is still that output; when `--out` was taken during
//! the run, the finished output kept beside it and the error that says where.

use super::previous::{self, Verdict};
use super::rename::{self, Identity};
use super::staging::{beside, sibling, Staging, ASIDE};
use crate::error::{Error, Result};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The tag of a finished output kept beside an `--out` that was taken during the run.
const KEPT: &str = "surgery-kept";
/// The tag of what was at `--out`, changed during the run, where it could not be put back.
const MOVED: &str = "surgery-moved";

impl Staging {
    /// Renames the staging directory to `--out`, which must be free.
    pub(super) fn place(&mut self) -> Result<()> {
        match rename::rename_noreplace(&self.tmp, &self.target.path) {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(self.keep(APPEARED.into())),
            Err(e) => Err(Error::io(&self.target.path, e)),
        }
    }

    /// Replaces the directory `id` at `--out`; returns where the replaced one now lies, to remove.
    pub(super) fn replace(&mut self, id: Identity) -> Result<Option<PathBuf>> {
        let out = self.target.path.clone();
        match rename::identity(&out) {
            Ok(None) => return self.place().map(|()| None),
            Ok(Some(now)) if now != id => return Err(self.keep(REPLACED.into())),
            Ok(Some(_)) => {}
            Err(e) => return Err(Error::io(&out, e)),
        }
        match rename::exchange(&self.tmp, &out) {
            Ok(true) => self.check_swapped(id).map(Some),
            Ok(false) => self.replace_by_renames(id).map(Some),
            // Gone between the look and the swap: nothing to replace.
            Err(e) if e.kind() == ErrorKind::NotFound => self.place().map(|()| None),
            Err(e) => Err(Error::io(&out, e)),
        }
    }

    /// After the swap the staging path holds what was at `--out`: it is removed only if it is
    /// still the directory `id` and still replaceable; otherwise it is swapped back.
    fn check_swapped(&mut self, id: Identity) -> Result<PathBuf> {
        let Some(why) = unreplaceable(&self.tmp, id) else {
            self.settled = true;
            return Ok(self.tmp.clone());
        };
        let out = self.target.path.clone();
        let what = format!("what is there changed during the run ({why})");
        match rename::exchange(&self.tmp, &out) {
            Ok(true) => Err(self.keep(what)),
            back => {
                // The new output is in place and what was there lies at the staging path.
                self.settled = true;
                let cause = back.err().map(|e| e.to_string()).unwrap_or_default();
                let moved = self.rescue(&self.tmp);
                Err(Error::OutChanged {
                    what: format!(
                        "{what} and could not be put back ({cause}): it is now in {}",
                        moved.display()
                    ),
                    kept: out.clone(),
                    out,
                })
            }
        }
    }

    /// [`Staging::check_swapped`] where the file system cannot swap: `--out` is moved aside,
    /// examined, and the staging directory renamed in as [`Staging::place`] does.
    pub(super) fn replace_by_renames(&mut self, id: Identity) -> Result<PathBuf> {
        let out = self.target.path.clone();
        let aside = sibling(&out, ASIDE);
        std::fs::rename(&out, &aside).map_err(|e| Error::io(&out, e))?;
        if let Some(why) = unreplaceable(&aside, id) {
            // Plain rename(2) replaces at most an empty directory that appeared meanwhile.
            let back = std::fs::rename(&aside, &out);
            let mut what = format!("what is there changed during the run ({why})");
            if let Err(e) = back {
                let moved = self.rescue(&aside);
                what = format!(
                    "{what} and could not be put back ({e}): it is now in {}",
                    moved.display()
                );
            }
            return Err(self.keep(what));
        }
        match rename::rename_noreplace(&self.tmp, &out) {
            Ok(()) => {
                self.settled = true;
                Ok(aside)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // --out was taken meanwhile; the earlier output was examined and --force asked
                // for it to go.
                let _ = std::fs::remove_dir_all(&aside);
                Err(self.keep(APPEARED.into()))
            }
            Err(e) => {
                let _ = rename::rename_noreplace(&aside, &out);
                Err(Error::io(&out, e))
            }
        }
    }

    /// Keeps the finished output as `NAME.surgery-kept-PID` beside `--out` (or, failing that, where
    /// it is) and returns the error saying `what` happened at `--out` and where the output is.
    fn keep(&mut self, what: String) -> Error {
        self.settled = true;
        let kept = beside(&self.target.path, KEPT);
        let kept = match rename::rename_noreplace(&self.tmp, &kept) {
            Ok(()) => kept,
            Err(_) => self.tmp.clone(),
        };
        Error::OutChanged {
            out: self.target.path.clone(),
            what,
            kept,
        }
    }

    /// Moves `path`, which holds what this run may not remove, away from the staging names a next
    /// run cleans up, to `NAME.surgery-moved-PID` beside `--out`; returns where it is.
    fn rescue(&self, path: &Path) -> PathBuf {
        let moved = beside(&self.target.path, MOVED);
        match rename::rename_noreplace(path, &moved) {
            Ok(()) => moved,
            Err(_) => path.to_path_buf(),
        }
    }
}

/// What happened when `--out` was free at the start and is not now.
const APPEARED: &str =
    "something appeared there during the run (another run or a program created it)";
/// What happened when the directory `--force` was to replace is no longer the one at `--out`.
const REPLACED: &str =
    "what was there when the run started was replaced during the run (by another run or a program)";

/// `None` when `path` is still the directory `id` and an earlier output or empty; else why not.
fn unreplaceable(path: &Path, id: Identity) -> Option<String> {
    match rename::identity(path) {
        Ok(Some(now)) if now == id => {}
        _ => return Some("it is not the directory that was there when the run started".into()),
    }
    match previous::examine(path) {
        Verdict::Foreign(why) => Some(why),
        Verdict::Empty | Verdict::Output => None,
    }
}
