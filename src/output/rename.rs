//! The renames a commit is made of, none of which can replace what is at its target:
//! [`rename_noreplace`] (`renameat2(RENAME_NOREPLACE)`) and [`exchange`] (`RENAME_EXCHANGE`), and
//! the identity (device, inode) by which a commit recognises the directory it was allowed to
//! replace.
//!
//! Where the file system refuses `RENAME_NOREPLACE` (`EINVAL`: NFS, CIFS, some FUSE file systems;
//! `ENOSYS`: a kernel before 3.15), the fallback claims the target with `mkdir` (which fails if
//! anything is there) and then renames the staging directory onto that empty directory: plain
//! `rename(2)` replaces a directory only when it is empty and never replaces a file or a non-empty
//! directory. So the fallback can at worst replace an *empty* directory that someone created in the
//! instant between removing the claim and the rename; it never loses a file.

use rustix::fs::{RenameFlags, CWD};
use rustix::io::Errno;
use std::io::{Error, ErrorKind, Result};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A directory entry's identity: device and inode (stable across renames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
}

/// The identity of what is at `path` (symlinks not followed); `None` when nothing is.
pub fn identity(path: &Path) -> Result<Option<Identity>> {
    match path.symlink_metadata() {
        Ok(m) => Ok(Some(Identity {
            dev: m.dev(),
            ino: m.ino(),
        })),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the file system (or kernel) does not support a `renameat2` flag.
fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
}

/// Renames the directory `from` to `to`, failing with [`ErrorKind::AlreadyExists`] when anything
/// is at `to` (a file, a directory, empty or not, a symlink).
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST | Errno::NOTEMPTY) => Err(taken()),
        Err(e) if unsupported(e) => claim_then_rename(from, to),
        Err(e) => Err(e.into()),
    }
}

/// The fallback of [`rename_noreplace`]: `mkdir(to)`, then `rename(from, to)` onto that empty
/// directory (see the module doc for the one window it leaves).
fn claim_then_rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => taken(),
        _ => e,
    })?;
    std::fs::rename(from, to).map_err(|e| {
        // Removes the claim only while it is empty: files someone put there stay.
        let _ = std::fs::remove_dir(to);
        match Errno::from_io_error(&e) {
            Some(Errno::EXIST | Errno::NOTEMPTY) => taken(),
            _ => e,
        }
    })
}

fn taken() -> Error {
    Error::from(ErrorKind::AlreadyExists)
}

/// Swaps `a` and `b` atomically (both must exist); `Ok(false)` when the file system cannot.
pub fn exchange(a: &Path, b: &Path) -> Result<bool> {
    match rustix::fs::renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Rename = fn(&Path, &Path) -> Result<()>;
    const RENAMES: [Rename; 2] = [rename_noreplace, claim_then_rename];

    #[test]
    fn nothing_at_the_target_is_ever_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
        std::fs::create_dir(&from).unwrap();
        std::fs::write(from.join("a"), "new").unwrap();
        // An empty directory, which plain rename(2) would replace, a file, and a full directory.
        let setups: [fn(&Path); 3] = [
            |to: &Path| std::fs::create_dir(to).unwrap(),
            |to: &Path| std::fs::write(to, "theirs").unwrap(),
            |to: &Path| {
                std::fs::create_dir(to).unwrap();
                std::fs::write(to.join("b"), "theirs").unwrap();
            },
        ];
        for setup in setups {
            setup(&to);
            let before = identity(&to).unwrap();
            for rename in RENAMES {
                let e = rename(&from, &to).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::AlreadyExists);
                assert_eq!(identity(&to).unwrap(), before);
                assert_eq!(std::fs::read(from.join("a")).unwrap(), b"new");
            }
            if to.is_dir() {
                std::fs::remove_dir_all(&to).unwrap();
            } else {
                std::fs::remove_file(&to).unwrap();
            }
        }
        for rename in RENAMES {
            let id = identity(&from).unwrap();
            rename(&from, &to).unwrap();
            assert_eq!(identity(&to).unwrap(), id);
            assert_eq!(identity(&from).unwrap(), None);
            std::fs::rename(&to, &from).unwrap();
        }
    }

    #[test]
    fn exchange_swaps_two_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let (ia, ib) = (identity(&a).unwrap(), identity(&b).unwrap());
        if exchange(&a, &b).unwrap() {
            assert_eq!(identity(&a).unwrap(), ib);
            assert_eq!(identity(&b).unwrap(), ia);
        }
        let gone = tmp.path().join("gone");
        assert_eq!(exchange(&a, &gone).unwrap_err().kind(), ErrorKind::NotFound);
    }
}
