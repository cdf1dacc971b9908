//! Staging directories left by runs that could not clean up (`SIGKILL`, a crash, a power cut) are
//! removed by the next run to the same `--out`.
//!
//! A run holds an exclusive `flock` on its staging directory for as long as it lives ([`hold`]);
//! the kernel drops it when the process ends, however it ends. A directory beside `--out` is
//! stale, and removed, only when all of these hold:
//! - its name is exactly `.NAME.TAG-PID` for this `--out`'s NAME, one of the run's tags, and a PID
//!   of decimal digits, and it is a directory (not a symlink);
//! - no process has that PID (`kill(PID, 0)` fails with `ESRCH`), or the PID is this process's own
//!   (a dead run whose PID was reused by this one);
//! - nobody holds its lock (a live run in another PID namespace or on another NFS client holds
//!   it, whatever its PID looks like from here).
//!
//! A PID that is alive is left alone even when it belongs to an unrelated process now (PID reuse):
//! keeping a stale directory a while longer is the safe mistake.

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::Pid;
use std::os::fd::OwnedFd;
use std::path::Path;

/// Opens `dir` (not following a symlink) and takes its exclusive lock without waiting: `Some` while
/// held; `None` when another process holds it. Where the file system has no locks, the directory
/// is returned unlocked (`Some`): the PID alone then decides.
fn lock(dir: &Path) -> Option<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::open(dir, flags, Mode::empty()).ok()?;
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Err(Errno::WOULDBLOCK) => None,
        _ => Some(fd),
    }
}

/// The lock a run holds on its staging directory `dir` until it ends (drop the handle to release
/// it earlier). Best effort: `None` where the file system has no locks.
pub fn hold(dir: &Path) -> Option<OwnedFd> {
    lock(dir)
}

/// Whether process `pid` is gone (or is this one, which cannot have a stale directory of its own).
fn gone(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    matches!(rustix::process::test_kill_process(pid), Err(Errno::SRCH))
}

/// The PID of a directory named `.NAME.TAG-PID`, for one of `tags`.
fn pid_of(entry: &str, name: &str, tags: &[&str]) -> Option<u32> {
    let rest = entry
        .strip_prefix('.')?
        .strip_prefix(name)?
        .strip_prefix('.')?;
    let digits = tags
        .iter()
        .find_map(|tag| rest.strip_prefix(tag)?.strip_prefix('-'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes the stale staging directories `.NAME.TAG-PID` beside `out` (see the module doc); best
/// effort: one that cannot be removed is left.
pub fn remove_stale(out: &Path, tags: &[&str]) {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name().and_then(|n| n.to_str()))
    else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|n| pid_of(n, name, tags)) else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !gone(pid) {
            continue;
        }
        let path = entry.path();
        if let Some(_held) = lock(&path) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAGS: [&str; 2] = ["surgery-tmp", "surgery-old"];

    #[test]
    fn names_are_matched_exactly() {
        assert_eq!(pid_of(".out.surgery-tmp-123", "out", &TAGS), Some(123));
        assert_eq!(pid_of(".out.surgery-old-7", "out", &TAGS), Some(7));
        for other in [
            ".out.surgery-tmp-",
            ".out.surgery-tmp-12a",
            ".out.surgery-tmp-+12",
            ".out.surgery-tmp-1-2",
            ".out2.surgery-tmp-12",
            ".ou.surgery-tmp-12",
            "out.surgery-tmp-12",
            ".out.surgery-kept-12",
            ".out.surgery-tmp-99999999999999999999",
        ] {
            assert_eq!(pid_of(other, "out", &TAGS), None, "{other}");
        }
    }

    /// A PID no process has: a child that has exited and been waited for.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn only_unlocked_directories_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let dead = dead_pid();
        let make = |name: String| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("model.safetensors"), "partial").unwrap();
            dir
        };
        let stale = make(format!(".out.surgery-tmp-{dead}"));
        let stale_old = make(format!(".out.surgery-old-{dead}"));
        // The parent of this process is alive.
        let alive = make(format!(
            ".out.surgery-tmp-{}",
            std::os::unix::process::parent_id()
        ));
        let other_out = make(format!(".other.surgery-tmp-{dead}"));
        let file = tmp.path().join(format!(".out.surgery-tmp-{}", dead_pid()));
        std::fs::write(&file, "not a directory").unwrap();
        // Locked by a live run, whatever its PID says.
        let locked = make(format!(".out.surgery-tmp-{}", dead_pid()));
        let _held = hold(&locked).unwrap();

        remove_stale(&out, &TAGS);
        assert!(!stale.exists() && !stale_old.exists());
        for kept in [&alive, &other_out, &file, &locked] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }
}
