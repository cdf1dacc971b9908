//! Runs of the real binary watched from outside: a conversion of a checkpoint big enough to last
//! seconds, started in the background, waited for at a point of its write (its staging directory,
//! bytes written), signalled (SIGINT, SIGTERM, SIGSTOP/SIGCONT, SIGKILL) and finished.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The product's executable.
pub const BIN: &str = env!("CARGO_BIN_EXE_surgery-convert");

/// A synthetic SmolLM2-135M-shaped checkpoint (270 MB), made once and kept in cargo's test
/// scratch directory: big enough that a conversion takes seconds, so signals land mid-run.
pub fn big_input() -> PathBuf {
    // The tests of one file run in parallel; one of them makes the input.
    static MADE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interrupt-input");
    let dir = base.join("smollm2");
    if !dir.exists() {
        std::fs::create_dir_all(&base).unwrap();
        // Written beside and renamed into place: another test binary may be making it too.
        let made = base.join(format!("smollm2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&made);
        // The developer tools' generator (the `dev` feature is on for tests).
        let shape = surgery_convert::dev::synth::shape("smollm2-135m").unwrap();
        surgery_convert::dev::synth::write(shape, 0, &made, false).unwrap();
        if std::fs::rename(&made, &dir).is_err() {
            std::fs::remove_dir_all(&made).unwrap();
        }
    }
    dir
}

/// Starts a conversion of `input` into `out` (stderr piped, one thread).
pub fn start(input: &Path, out: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .arg("--in")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(["--shared-kv", "0.3", "--q", "0.9", "--threads", "1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The staging directory of process `pid` in `parent`, once it exists.
pub fn staging_of(parent: &Path, pid: u32) -> Option<PathBuf> {
    let suffix = format!(".surgery-tmp-{pid}");
    std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(&suffix))
        })
}

/// Bytes written so far to the staging directory's weight files.
pub fn staged_weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A point of a run's write.
#[derive(Debug, Clone, Copy)]
pub enum Point {
    /// As soon as the staging directory exists.
    StagingCreated,
    /// Once this many weight bytes are staged.
    WeightBytes(u64),
}

/// Waits until `child`, writing beside `parent`, reaches `point`; returns its staging directory.
pub fn wait_for(child: &mut Child, parent: &Path, point: Point) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the conversion ended before {point:?}"
        );
        if let Some(dir) = staging_of(parent, child.id()) {
            match point {
                Point::StagingCreated => return dir,
                Point::WeightBytes(n) if staged_weight_bytes(&dir) >= n => return dir,
                Point::WeightBytes(_) => {}
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {point:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends `signal` (`INT`, `STOP`, ...) to `child`.
pub fn send(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for `child`: its exit code and stderr.
pub fn finish(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
