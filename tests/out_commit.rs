//! `--out` is never someone else's folder: the commit replaces only what the run verified it may
//! replace. A folder created at `--out` during a run is left alone; of two runs to one `--out`
//! exactly one wins; `--force` replaces only an earlier output or an empty folder; a killed run's
//! staging folder is removed by the next run; a missing or full `TMPDIR` is named as such.
//!
//! Every test lists every path under its sandbox afterwards: nothing but `--out` (and, where a run
//! lost its `--out`, the finished output it kept and named) may be there.

mod common;

use common::runs::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};

/// Every path below `root`, relative, sorted (hidden ones included).
fn paths_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel_path = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                stack.push(rel_path.clone());
            }
            out.push(rel_path.to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Asserts that the top level of `root` is exactly `names` and that no staging folder is left
/// anywhere below it.
fn assert_only(root: &Path, names: &[&str]) {
    let all = paths_under(root);
    let top: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|p| !p.contains('/'))
        .collect();
    let mut names = names.to_vec();
    names.sort();
    assert_eq!(top, names, "{all:#?}");
    let staging = |p: &String| p.contains(".surgery-tmp-") || p.contains(".surgery-old-");
    assert!(!all.iter().any(staging), "{all:#?}");
}

/// A conversion of the tiny fixture into `out`, with `extra` options.
fn convert(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.5",
        "--quiet",
    ];
    args.extend(extra);
    run(&args)
}

/// The one line of a failed run: `(exit code, line)`.
fn failure(o: &Output) -> (Option<i32>, String) {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "succeeded: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    (o.status.code(), stderr)
}

/// The folder a losing run kept its finished output in, as its error line names it; it holds a
/// complete output.
fn kept_by(line: &str, parent: &Path) -> String {
    let path = line
        .trim_end()
        .rsplit_once("kept the finished output in ")
        .map(|(_, p)| PathBuf::from(p))
        .unwrap_or_else(|| panic!("no kept output named: {line}"));
    assert_eq!(path.parent(), Some(parent), "{line}");
    assert!(path.join("surgery.json").is_file() && path.join("SHA256SUMS").is_file());
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// An output of a complete conversion: its SHA256SUMS lists every other file.
fn assert_complete(out: &Path) {
    let files = read_files(out);
    let sums = String::from_utf8(files["SHA256SUMS"].clone()).unwrap();
    assert_eq!(sums.lines().count(), files.len() - 1, "{sums}");
    assert!(files.contains_key("surgery.json"));
}

/// Starts a conversion of the tiny fixture into `out` with the quality check, which runs on the
/// staging folder for seconds before the commit.
fn start_checked(out: &Path, extra: &[&str]) -> Child {
    std::process::Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--in",
            "fixtures/tiny-f32-gqa",
            "--shared-kv",
            "0.5",
            "--check",
        ])
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `child` has its staging folder (it has checked `--out` and is writing or checking,
/// seconds before its commit), then stops it (SIGSTOP).
fn stop_before_commit(mut child: Child, out: &Path) -> Child {
    let staging = wait_for(&mut child, out.parent().unwrap(), Point::StagingCreated);
    send(&child, "STOP");
    assert!(
        child.try_wait().unwrap().is_none(),
        "it ended before its commit"
    );
    assert!(staging.exists(), "it committed before it was stopped");
    child
}

#[test]
fn a_folder_created_at_out_during_the_run_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let child = stop_before_commit(start_checked(&out, &[]), &out);
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "precious").unwrap();
    send(&child, "CONT");
    let (status, line) = finish(child);
    assert_eq!(status, Some(1), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains("--out") && line.contains("appeared there during the run"),
        "{line}"
    );
    assert_eq!(entries(&out), ["mine.txt"]);
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "precious"
    );
    let kept = kept_by(&line, tmp.path());
    assert_only(tmp.path(), &["out", &kept]);
}

/// Two runs into `out` that both pass the start's check (the first is stopped until the second
/// is writing): exactly one wins; the loser's line and kept folder are returned.
fn race(out: &Path, extra: &[&str]) -> (String, String) {
    let first = stop_before_commit(start_checked(out, extra), out);
    let mut second = start_checked(out, extra);
    wait_for(&mut second, out.parent().unwrap(), Point::StagingCreated);
    send(&first, "CONT");
    let results = [finish(first), finish(second)];
    let won: Vec<_> = results.iter().filter(|(s, _)| *s == Some(0)).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    let (status, line) = results.into_iter().find(|(s, _)| *s != Some(0)).unwrap();
    assert_eq!(status, Some(1), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
    let kept = kept_by(&line, out.parent().unwrap());
    assert_complete(out);
    (line, kept)
}

#[test]
fn of_two_runs_to_one_out_exactly_one_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (line, kept) = race(&out, &[]);
    assert!(line.contains("appeared there during the run"), "{line}");
    assert_only(tmp.path(), &["out", &kept]);

    // Small runs started together, a few times: whichever checks --out last loses, at its start
    // (exit 2) or at its commit (exit 1, its output kept).
    for _ in 0..4 {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let runs: Vec<Child> = (0..2)
            .map(|_| {
                std::process::Command::new(BIN)
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .args([
                        "--in",
                        "fixtures/tiny-f32-gqa",
                        "--shared-kv",
                        "0.5",
                        "--quiet",
                    ])
                    .arg("--out")
                    .arg(&out)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let results: Vec<(Option<i32>, String)> = runs.into_iter().map(finish).collect();
        assert_eq!(
            results.iter().filter(|(s, _)| *s == Some(0)).count(),
            1,
            "{results:?}"
        );
        let (status, line) = results.into_iter().find(|(s, _)| *s != Some(0)).unwrap();
        assert_eq!(line.lines().count(), 1, "{line}");
        let mut left = vec!["out".to_string()];
        match status {
            Some(2) => assert!(line.contains("already exists"), "{line}"),
            _ => {
                assert_eq!(status, Some(1), "{line}");
                left.push(kept_by(&line, tmp.path()));
            }
        }
        assert_complete(&out);
        let left: Vec<&str> = left.iter().map(String::as_str).collect();
        assert_only(tmp.path(), &left);
    }
}

#[test]
fn of_two_force_runs_over_one_output_exactly_one_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert!(convert(&out, &[]).status.success());
    let (line, kept) = race(&out, &["--force"]);
    assert!(line.contains("was replaced during the run"), "{line}");
    assert_only(tmp.path(), &["out", &kept]);
}

#[test]
fn force_replaces_only_an_earlier_output_or_an_empty_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert!(convert(&out, &[]).status.success());
    let before = read_files(&out);
    assert!(convert(&out, &["--q", "0.9", "--force"]).status.success());
    let after = read_files(&out);
    assert_ne!(before["surgery.json"], after["surgery.json"]);
    assert_complete(&out);
    assert_only(tmp.path(), &["out"]);

    // An earlier output holding a file of the user's, a user's folder, a file: refused, untouched.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("data.bin"), "mine").unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, "mine").unwrap();
    for (target, why) in [
        (&out, "`notes.txt` is not listed in its SHA256SUMS"),
        (&mine, "it holds `data.bin` and no SHA256SUMS"),
        (&file, "it is not a directory"),
    ] {
        let before = paths_under(tmp.path());
        let (status, line) = failure(&convert(target, &["--force"]));
        assert_eq!(status, Some(2), "{line}");
        assert!(
            line.starts_with("surgery-convert: error: --out: "),
            "{line}"
        );
        assert!(
            line.contains(why) && line.contains("remove it yourself"),
            "{line}"
        );
        assert_eq!(paths_under(tmp.path()), before);
    }
    assert_eq!(
        std::fs::read_to_string(mine.join("data.bin")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(convert(&empty, &["--force"]).status.success());
    assert_complete(&empty);
    assert_only(tmp.path(), &["empty", "file", "mine", "out"]);
}

/// A PID no process has: a child that has exited and been waited for.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_killed_runs_staging_folder_is_removed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let stale = tmp.path().join(format!(".out.surgery-tmp-{}", dead_pid()));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), "partial").unwrap();
    // This test's own process is alive: its folder is not stale, whatever it holds.
    let live = format!(".out.surgery-tmp-{}", std::process::id());
    std::fs::create_dir(tmp.path().join(&live)).unwrap();
    // Another --out's folder is not this run's to judge.
    let other = format!(".other.surgery-tmp-{}", dead_pid());
    std::fs::create_dir(tmp.path().join(&other)).unwrap();
    assert!(convert(&out, &[]).status.success());
    assert!(!stale.exists());
    let all = paths_under(tmp.path());
    let top: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|p| !p.contains('/'))
        .collect();
    let mut expected = vec![live.as_str(), other.as_str(), "out"];
    expected.sort();
    assert_eq!(top, expected);

    // A run really killed (SIGKILL: no clean-up) before its commit.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut child = start_checked(&out, &[]);
    let staging = wait_for(&mut child, tmp.path(), Point::StagingCreated);
    send(&child, "KILL");
    let (status, _) = finish(child);
    assert_eq!(status, None, "killed by a signal");
    assert!(staging.exists(), "SIGKILL leaves the staging folder");
    assert!(convert(&out, &[]).status.success());
    assert_only(tmp.path(), &["out"]);
}

/// A run that needs the scratch file (calibration statistics, `--fit act`) with `TMPDIR` set.
fn convert_with_tmpdir(out: &Path, tmpdir: &Path) -> Output {
    run_env(
        &[
            "--in",
            "fixtures/tiny-f32-gqa",
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.5",
            "--fit",
            "act",
            "--calib-tokens",
            "64",
            "--quiet",
        ],
        &[("TMPDIR", tmpdir.to_str().unwrap())],
    )
}

#[test]
fn a_missing_tmpdir_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = tmp.path().join("no-such-dir");
    let (status, line) = failure(&convert_with_tmpdir(&out, &missing));
    assert_eq!(status, Some(1), "{line}");
    assert_eq!(
        line.trim_end(),
        format!(
            "surgery-convert: error: TMPDIR={}: no such directory; set TMPDIR to an existing directory",
            missing.display()
        )
    );
    assert_only(tmp.path(), &[]);
}

#[test]
fn a_full_tmpdir_is_named_not_out() {
    // A 16 KiB tmpfs as TMPDIR, mounted by the test (needs root, as in CI; elsewhere the unit test
    // `scratch::tests::a_full_temporary_directory_is_named_not_out` covers the mapping).
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    if !mount_tmpfs(&small, "size=16k") {
        eprintln!("a_full_tmpdir_is_named_not_out: cannot mount a tmpfs here (not root)");
        return;
    }
    let out = tmp.path().join("out");
    let o = convert_with_tmpdir(&out, &small);
    let left = entries(&small);
    unmount(&small);
    let (status, line) = failure(&o);
    assert_eq!(status, Some(1), "{line}");
    assert!(
        line.starts_with(&format!(
            "surgery-convert: error: TMPDIR={}: no space left",
            small.display()
        )),
        "{line}"
    );
    assert!(!line.contains("--out"), "{line}");
    assert!(left.is_empty(), "{left:?}");
    assert_only(tmp.path(), &["small"]);
}
