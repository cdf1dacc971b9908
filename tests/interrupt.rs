//! Fail-safe output: SIGINT and SIGTERM sent to the real binary at several points of a conversion,
//! and a full disk, leave no output and no staging directory, and never touch an existing output;
//! a successful `--force` replaces the old output only once the new one is complete.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_surgery-convert");

/// A synthetic SmolLM2-135M-shaped checkpoint (270 MB), made once and kept in cargo's test
/// scratch directory: big enough that a conversion takes seconds, so signals land mid-run.
fn big_input() -> PathBuf {
    // The tests of this file run in parallel; one of them makes the input.
    static MADE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interrupt-input");
    let dir = base.join("smollm2");
    let done = base.join("complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // The developer tools' generator (the `dev` feature is on for tests).
        let shape = surgery_convert::dev::synth::shape("smollm2-135m").unwrap();
        surgery_convert::dev::synth::write(shape, 0, &dir, false).unwrap();
        std::fs::write(&done, "").unwrap();
    }
    dir
}

fn start(input: &Path, out: &Path, extra: &[&str]) -> Child {
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

/// The staging directory of a run writing `out`, once it exists.
fn staging(parent: &Path) -> Option<PathBuf> {
    std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".surgery-tmp-"))
        })
}

/// Bytes written so far to the staging directory's weight files.
fn staged_weight_bytes(dir: &Path) -> u64 {
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

/// When to send the signal.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// As soon as the staging directory exists.
    StagingCreated,
    /// Once this many weight bytes are staged.
    WeightBytes(u64),
}

fn wait_for(child: &mut Child, parent: &Path, point: Point) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the conversion ended before {point:?}"
        );
        if let Some(dir) = staging(parent) {
            match point {
                Point::StagingCreated => return,
                Point::WeightBytes(n) if staged_weight_bytes(&dir) >= n => return,
                Point::WeightBytes(_) => {}
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {point:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn send(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn finish(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn signals_mid_run_leave_nothing_behind() {
    let input = big_input();
    let cases = [
        ("INT", Point::StagingCreated, 130),
        ("INT", Point::WeightBytes(1 << 20), 130),
        // Past the 56.6 MB embedding: the writer is consuming fitted layers.
        ("TERM", Point::WeightBytes(64 << 20), 143),
    ];
    for (signal, point, code) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut child = start(&input, &out, &[]);
        wait_for(&mut child, tmp.path(), point);
        send(&child, signal);
        let (status, stderr) = finish(child);
        assert_eq!(status, Some(code), "SIG{signal} at {point:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("surgery-convert: error: interrupted by SIG"),
            "{stderr}"
        );
        assert!(
            entries(tmp.path()).is_empty(),
            "SIG{signal} at {point:?} left {:?}",
            entries(tmp.path())
        );
    }
}

#[test]
fn a_signal_leaves_an_existing_output_untouched() {
    let input = big_input();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let mut child = start(&input, &out, &["--force"]);
    wait_for(&mut child, tmp.path(), Point::WeightBytes(8 << 20));
    send(&child, "TERM");
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(143), "{stderr}");
    assert_eq!(entries(tmp.path()), vec!["out".to_string()]);
    assert_eq!(entries(&out), vec!["keep.txt".to_string()]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
}

#[test]
fn a_second_signal_exits_at_once_and_still_cleans_up() {
    let input = big_input();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut child = start(&input, &out, &[]);
    wait_for(&mut child, tmp.path(), Point::WeightBytes(4 << 20));
    send(&child, "INT");
    send(&child, "INT");
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(130), "{stderr}");
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

#[test]
fn force_replaces_the_old_output_only_when_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    run_ok(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
        "--force",
    ]);
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("surgery.json").exists() && out.join("SHA256SUMS").exists());
    assert_eq!(
        entries(tmp.path()),
        vec!["out".to_string()],
        "no staging left"
    );
}

fn assert_no_space(status: Option<i32>, stderr: &str, parent: &Path, left: &[&str]) {
    assert_eq!(status, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("surgery-convert: error: ") && stderr.contains("no space left"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<String> = left.iter().map(|s| s.to_string()).collect();
    assert_eq!(entries(parent), left, "leftovers");
}

#[test]
fn file_size_limit_is_a_clear_no_space_error() {
    // `ulimit -f 64`: no file may grow past 64 KiB; the 450 KB weight file cannot be written.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = Command::new("bash")
        .args(["-c", "ulimit -f 64 && exec \"$0\" \"$@\"", BIN])
        .args([
            "--in",
            "fixtures/tiny-f32-gqa",
            "--shared-kv",
            "0.3",
            "--out",
        ])
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_no_space(o.status.code(), &stderr, tmp.path(), &[]);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}

#[test]
fn full_filesystem_is_a_clear_no_space_error() {
    // A 256 KiB tmpfs, mounted by the test (needs root, as in CI; elsewhere the test says so and
    // the file size limit test above covers the same path).
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    if !mount_tmpfs(&mount, "size=256k") {
        eprintln!("full_filesystem_is_a_clear_no_space_error: cannot mount a tmpfs here (not root); covered by file_size_limit_is_a_clear_no_space_error");
        return;
    }
    std::fs::write(mount.join("keep.txt"), "other data").unwrap();
    let out = mount.join("out");
    let o = run(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let left = entries(&mount);
    unmount(&mount);
    assert_no_space(o.status.code(), &stderr, tmp.path(), &["small"]);
    assert_eq!(
        left,
        vec!["keep.txt".to_string()],
        "leftovers on the full filesystem"
    );
}
