//! Bad input: every case of the corpus in `fixtures/bad/` (written by `fixtures/bad/generate.py`)
//! runs the real binary on a copy of the case, and must exit with the status the case names, print
//! one line naming the file, tensor or option and the cause, never panic, leave no output or staging
//! directory, and leave the input (checksummed before and after) untouched. The few cases that must
//! succeed (a tensor in a type that is only copied; a rank clamped with a note) check their output.
//!
//! `cargo test --test bad_input -- --nocapture` prints each case's error line.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Cases the corpus must hold (the list); a case missing from `fixtures/bad/` fails the test.
const REQUIRED: &[&str] = &[
    "truncated-shard",
    "header-length-beyond-file",
    "header-length-zero",
    "header-length-huge",
    "header-not-json",
    "header-duplicate-tensor",
    "offsets-out-of-bounds",
    "offsets-overlapping",
    "offsets-not-contiguous",
    "offsets-not-covering",
    "byte-length-mismatch",
    "shape-zero",
    "shape-overflow",
    "dtype-i8-decomposed",
    "dtype-f8-e4m3-decomposed",
    "dtype-i8-f8-copied",
    "index-missing-shard",
    "index-tensor-not-in-shard",
    "shard-tensor-not-in-index",
    "index-absolute-shard-name",
    "index-dotdot-shard-name",
    "symlink-shard-outside",
    "symlink-file-outside",
    "config-missing",
    "config-not-json",
    "config-missing-field",
    "config-unsupported-arch",
    "config-heads-not-dividing",
    "config-shape-disagreement",
    "family-qwen3-no-head-dim",
    "family-gemma2-no-head-dim",
    "family-qwen2-bias-shape",
    "family-qwen2-o-proj-bias",
    "family-phi3-fused-rows",
    "nan-inf-dense",
    "nan-inf-factored",
    "option-threshold-zero",
    "option-threshold-negative",
    "option-threshold-above-one",
    "option-threshold-nan",
    "option-threshold-inf",
    "option-threshold-abc",
    "option-rank-zero",
    "option-rank-negative",
    "option-rank-huge",
    "option-conflict-k-shared",
    "option-out-is-input",
    "option-out-inside-input",
    "option-out-contains-input",
    "option-out-exists",
    "option-out-unwritable",
];

fn corpus() -> PathBuf {
    fixture("bad")
}

/// Copies a tree, recreating symlinks as symlinks.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &to).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// Every entry below `dir` (symlinks not followed): relative path -> contents or link target.
fn digest(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(entry.path()).unwrap();
                out.insert(rel, target.to_string_lossy().as_bytes().to_vec());
            } else if kind.is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                stack.push(entry.path());
            } else {
                out.insert(rel, std::fs::read(entry.path()).unwrap());
            }
        }
    }
    out
}

struct Outcome {
    name: String,
    line: String,
}

fn run_case(case_dir: &Path) -> Outcome {
    let name = case_dir.file_name().unwrap().to_string_lossy().into_owned();
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(case_dir.join("case.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for part in ["input", "outside"] {
        if case_dir.join(part).is_dir() {
            copy_tree(&case_dir.join(part), &scratch.join(part));
        }
    }
    if !scratch.join("input").exists() {
        copy_tree(&corpus().join("_base/input"), &scratch.join("input"));
    }
    let input = scratch.join("input");
    let out = scratch.join("out");
    match spec["setup"].as_str() {
        Some("existing_out") => {
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("keep.txt"), "precious").unwrap();
        }
        Some("file_at_out_parent") => std::fs::write(scratch.join("afile"), "a file").unwrap(),
        Some(other) => panic!("{name}: unknown setup {other}"),
        None => {}
    }
    let before = digest(&scratch);

    let fill = |a: &str| {
        a.replace("{in}", input.to_str().unwrap())
            .replace("{out}", out.to_str().unwrap())
            .replace("{tmp}", scratch.to_str().unwrap())
    };
    let extra: Vec<String> = spec["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| fill(a.as_str().unwrap()))
        .collect();
    let mut args = vec!["--in".to_string(), input.to_str().unwrap().to_string()];
    if !extra.iter().any(|a| a == "--out") {
        args.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    }
    args.extend(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let exit = spec["exit"].as_i64().unwrap() as i32;
    assert_eq!(
        o.status.code(),
        Some(exit),
        "{name}: exit status; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{name}: {stderr}"
    );
    let expect: Vec<&str> = spec["expect"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for needle in &expect {
        assert!(
            stderr.contains(needle),
            "{name}: `{needle}` missing from: {stderr}"
        );
    }

    let line;
    if exit == 0 {
        // Succeeds: the output exists, and tensors that are only copied are byte-identical.
        let input_tensors = read_tensors(&input);
        let output_tensors = read_tensors(&out);
        for t in spec["copied"].as_array().into_iter().flatten() {
            let t = t.as_str().unwrap();
            assert_eq!(
                input_tensors[t], output_tensors[t],
                "{name}: {t} not copied unchanged"
            );
        }
        let copied = spec["copied"].as_array().map_or(0, Vec::len);
        line = if expect.is_empty() {
            format!("(exit 0; {copied} tensors copied byte for byte)")
        } else {
            stderr
                .lines()
                .find(|l| expect.iter().all(|n| l.contains(n)))
                .unwrap_or_default()
                .to_string()
        };
        // Nothing but the output was added.
        let mut after = digest(&scratch);
        after.retain(|k, _| k != "out" && !k.starts_with("out/"));
        assert!(after == before, "{name}: input changed or leftovers");
    } else {
        assert_eq!(
            stderr.lines().count(),
            1,
            "{name}: expected one line, got: {stderr}"
        );
        assert!(
            stderr.starts_with("surgery-convert: error: "),
            "{name}: {stderr}"
        );
        line = stderr.trim_end().to_string();
        // No output, no staging directory, the input and any previous output untouched.
        assert!(
            digest(&scratch) == before,
            "{name}: something was created, removed or modified: {:?} vs {:?}",
            digest(&scratch).keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>()
        );
    }
    Outcome { name, line }
}

#[test]
fn every_bad_input_fails_cleanly() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    let names: Vec<String> = cases
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in REQUIRED {
        assert!(
            names.iter().any(|n| n == required),
            "fixtures/bad lacks case {required} (run fixtures/bad/generate.py)"
        );
    }
    // Every case runs; failures are reported together.
    let mut failed = Vec::new();
    for case in &cases {
        match std::panic::catch_unwind(|| run_case(case)) {
            Ok(outcome) => println!("{}: {}", outcome.name, outcome.line),
            Err(_) => failed.push(case.file_name().unwrap().to_string_lossy().into_owned()),
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

/// An output location the process may not write: a directory without write permission, or (for
/// root, whom permissions do not stop) a read-only tmpfs mounted by the test.
#[test]
fn unwritable_output_location_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("locked");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut mounted = false;
    if std::fs::write(parent.join("probe"), "").is_ok() {
        // Permissions do not apply (root): use a read-only filesystem instead.
        std::fs::remove_file(parent.join("probe")).unwrap();
        mounted = mount_tmpfs(&parent, "ro,size=64k");
        if !mounted {
            eprintln!("unwritable_output_location_is_refused: neither permissions nor a read-only mount can stop this user; skipped");
            return;
        }
    }
    let out = parent.join("out");
    let o = run(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
    ]);
    let left = entries(&parent);
    if mounted {
        unmount(&parent);
    }
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("unwritable location: {}", stderr.trim_end());
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--out") && stderr.contains("cannot create the output"),
        "{stderr}"
    );
    assert!(left.is_empty(), "{left:?}");
}
