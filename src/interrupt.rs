//! Ctrl-C and SIGTERM: the first one asks the run to stop; long loops call [`check`], which turns
//! the request into [`Error::Interrupted`], so the run unwinds normally and the staging directory is
//! removed on the way out (see `output::Staging`). A second signal exits at once, after removing the
//! staging directories still registered. SIGXFSZ (a write past `ulimit -f`) is caught so that the
//! write fails with an error ("no space") instead of killing the process.

use crate::error::{Error, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Set by SIGXFSZ; only its handler matters (the failed write reports the error).
static FILE_SIZE_LIMIT: AtomicBool = AtomicBool::new(false);
/// Staging directories to remove if a second signal forces an exit.
static STAGING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Installs the handlers. Call once, at start-up.
pub fn install() -> Result<()> {
    let fail = |e: std::io::Error| Error::io("<signal handlers>", e);
    signal_hook::flag::register(SIGXFSZ, &FILE_SIZE_LIMIT).map_err(fail)?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(fail)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if SIGNAL
                    .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    // Second signal: do not wait for the run to unwind.
                    let dirs = STAGING.lock().map(|d| d.clone()).unwrap_or_default();
                    for dir in dirs {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    std::process::exit(128 + signal);
                }
            }
        })
        .map_err(fail)?;
    Ok(())
}

/// Fails with [`Error::Interrupted`] once a signal asked the run to stop.
pub fn check() -> Result<()> {
    match SIGNAL.load(Ordering::Relaxed) {
        0 => Ok(()),
        signal => Err(Error::Interrupted { signal }),
    }
}

/// Whether a signal asked the run to stop.
pub fn requested() -> bool {
    SIGNAL.load(Ordering::Relaxed) != 0
}

/// Registers a staging directory for removal on a forced exit.
pub fn register_staging(dir: PathBuf) {
    if let Ok(mut dirs) = STAGING.lock() {
        dirs.push(dir);
    }
}

/// Forgets a staging directory (committed or removed).
pub fn unregister_staging(dir: &std::path::Path) {
    if let Ok(mut dirs) = STAGING.lock() {
        dirs.retain(|d| d != dir);
    }
}
