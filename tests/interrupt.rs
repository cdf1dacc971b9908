//! Fail-safe output: SIGINT and SIGTERM sent to the real binary at several points of a conversion,
//! and a full disk, leave no output and no staging directory, and never touch an existing output;
//! a successful `--force` replaces the old output only once the new one is complete.

mod common;

use common::runs::*;
use common::*;
use std::path::Path;
use std::process::Command;

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
    earlier_output(&out);
    let before = read_files(&out);
    let mut child = start(&input, &out, &["--force"]);
    wait_for(&mut child, tmp.path(), Point::WeightBytes(8 << 20));
    send(&child, "TERM");
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(143), "{stderr}");
    assert_eq!(entries(tmp.path()), vec!["out".to_string()]);
    assert_eq!(read_files(&out), before);
}

/// An earlier output at `out`: a conversion of the tiny fixture at `--shared-kv 0.5`.
fn earlier_output(out: &Path) {
    run_ok(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.5",
        "--quiet",
    ]);
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
    earlier_output(&out);
    let before = read_files(&out);
    run_ok(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
        "--force",
    ]);
    let after = read_files(&out);
    assert_ne!(after["surgery.json"], before["surgery.json"]);
    assert!(after.contains_key("SHA256SUMS"));
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
