//! Bad input: every case exits non-zero with one line naming the file, tensor or option and the
//! cause, never panics, leaves no output or staging directory, and does not touch the input.

mod common;

use common::*;
use std::path::{Path, PathBuf};

struct Case {
    name: &'static str,
    /// Builds the input directory inside `tmp` (a damaged copy of a fixture) and returns it.
    input: fn(&Path) -> PathBuf,
    args: &'static [&'static str],
    exit: i32,
    /// Substrings the error line must contain.
    expect: &'static [&'static str],
}

fn copy_of(tmp: &Path, fixture_name: &str) -> PathBuf {
    let dir = tmp.join("input");
    copy_dir(&fixture(fixture_name), &dir);
    dir
}

fn intact(tmp: &Path) -> PathBuf {
    copy_of(tmp, "tiny-f32-gqa")
}

fn truncated_shard(tmp: &Path) -> PathBuf {
    let dir = intact(tmp);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    dir
}

fn header_not_json(tmp: &Path) -> PathBuf {
    let dir = intact(tmp);
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"this is not json");
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

fn missing_k_proj(tmp: &Path) -> PathBuf {
    let dir = intact(tmp);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.self_attn.k_proj.weight")
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out).unwrap();
    dir
}

fn missing_config(tmp: &Path) -> PathBuf {
    let dir = intact(tmp);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    dir
}

/// Writes NaN and infinities over the first values of a decomposed matrix (F32 fixture).
fn non_finite_k_proj(tmp: &Path) -> PathBuf {
    let dir = intact(tmp);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let (start, _) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let name = "model.layers.1.self_attn.k_proj.weight";
        let view = st.tensor(name).unwrap();
        let data_start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        (data_start, view.data().len())
    };
    for (k, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .iter()
        .enumerate()
    {
        bytes[start + 4 * k..start + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    dir
}

const CASES: &[Case] = &[
    Case {
        name: "NaN and Inf in a matrix to decompose (dense, fits run ahead of the writer)",
        input: non_finite_k_proj,
        args: &["--shared-kv", "0.3", "--q", "0.9"],
        exit: 1,
        expect: &[
            "model.safetensors",
            "model.layers.1.self_attn.k_proj.weight",
            "layer 1",
            "3",
        ],
    },
    Case {
        name: "NaN and Inf in a matrix to decompose (factored, one thread)",
        input: non_finite_k_proj,
        args: &["--shared-kv", "0.3", "--emit", "factored", "--threads", "1"],
        exit: 1,
        expect: &[
            "model.safetensors",
            "model.layers.1.self_attn.k_proj.weight",
            "layer 1",
        ],
    },
    Case {
        name: "truncated shard",
        input: truncated_shard,
        args: &["--shared-kv", "0.3"],
        exit: 1,
        expect: &["model.safetensors", "invalid safetensors"],
    },
    Case {
        name: "header not JSON",
        input: header_not_json,
        args: &["--shared-kv", "0.3"],
        exit: 1,
        expect: &["model.safetensors", "JSON"],
    },
    Case {
        name: "missing k_proj",
        input: missing_k_proj,
        args: &["--shared-kv", "0.3"],
        exit: 1,
        expect: &[
            "model.safetensors",
            "model.layers.1.self_attn.k_proj.weight",
            "missing",
        ],
    },
    Case {
        name: "missing config",
        input: missing_config,
        args: &["--shared-kv", "0.3"],
        exit: 1,
        expect: &["config.json", "not found"],
    },
    Case {
        name: "threshold 0",
        input: intact,
        args: &["--shared-kv", "0"],
        exit: 2,
        expect: &["--shared-kv", "(0, 1]"],
    },
    Case {
        name: "threshold 1.5",
        input: intact,
        args: &["--q", "1.5"],
        exit: 2,
        expect: &["--q", "(0, 1]"],
    },
    Case {
        name: "threshold nan",
        input: intact,
        args: &["--shared-kv", "nan"],
        exit: 2,
        expect: &["--shared-kv", "(0, 1]"],
    },
    Case {
        name: "threshold abc",
        input: intact,
        args: &["--separate", "abc"],
        exit: 2,
        expect: &["--separate", "abc"],
    },
    Case {
        name: "rank:0",
        input: intact,
        args: &["--shared-kv", "rank:0"],
        exit: 2,
        expect: &["--shared-kv", "at least 1"],
    },
    Case {
        name: "no method",
        input: intact,
        args: &[],
        exit: 2,
        expect: &["--shared-kv", "--separate", "no surgery"],
    },
    Case {
        name: "k with shared-kv",
        input: intact,
        args: &["--shared-kv", "0.3", "--k", "0.5"],
        exit: 2,
        expect: &["--k", "--shared-kv"],
    },
];

fn tree_digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    read_files(dir).into_iter().collect()
}

#[test]
fn every_bad_input_fails_cleanly() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let input = (case.input)(tmp.path());
        let before = tree_digest(&input);
        let out = tmp.path().join("out");
        let mut args = vec![
            "--in",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(case.args);
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(case.exit),
            "{}: exit code; stderr: {stderr}",
            case.name
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{}: expected one line, got: {stderr}",
            case.name
        );
        assert!(
            stderr.starts_with("surgery-convert: error: "),
            "{}: {stderr}",
            case.name
        );
        for needle in case.expect {
            assert!(
                stderr.contains(needle),
                "{}: `{needle}` missing from: {stderr}",
                case.name
            );
        }
        assert!(!stderr.contains("panicked"), "{}: {stderr}", case.name);
        assert!(!out.exists(), "{}: output directory created", case.name);
        assert_eq!(
            entries(tmp.path()),
            vec!["input".to_string()],
            "{}: something left behind",
            case.name
        );
        assert!(
            tree_digest(&input) == before,
            "{}: input modified",
            case.name
        );
    }
}

#[test]
fn existing_output_needs_force_and_survives_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let o = run(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--out") && stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );

    // A failing --force run leaves the old output alone.
    let o = run(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
        "--q",
        "rank:0",
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );

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
    assert!(out.join("surgery.json").exists());
    assert_eq!(
        entries(tmp.path()),
        vec!["out".to_string()],
        "no staging directory left"
    );
}

#[test]
fn output_inside_or_containing_the_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = intact(tmp.path());
    let before = tree_digest(&input);
    for (out, force) in [
        (input.join("sub"), false),
        (input.clone(), true),
        (tmp.path().to_path_buf(), true),
    ] {
        let mut args = vec![
            "--in",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.3",
        ];
        if force {
            args.push("--force");
        }
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--out") && stderr.contains("input"),
            "{stderr}"
        );
    }
    assert!(tree_digest(&input) == before);
    assert!(!input.join("sub").exists());
}
