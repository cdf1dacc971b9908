//! Helpers shared by the binary-level tests: running the real executable, reading safetensors
//! outputs, and comparing directories.
#![allow(dead_code)]

pub mod runs;

use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use surgery_convert::model::dtype::FloatType;

/// Path of a bundled fixture.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Runs the binary with `args` from the crate root (so relative fixture paths are stable).
pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// Runs the binary with extra environment variables.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surgery-convert"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run surgery-convert")
}

/// Runs and asserts success, returning stderr.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "surgery-convert {args:?} failed:\n{stderr}"
    );
    stderr
}

/// `surgery-convert eval MODEL ARGS...`, which must succeed; its JSON record.
pub fn eval_json(model: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", model.to_str().unwrap()];
    all.extend(args);
    let out = run(&all);
    assert!(
        out.status.success(),
        "surgery-convert {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("eval prints JSON")
}

/// A tensor read back: dtype, shape and raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// Values as f64.
    pub fn values(&self) -> Vec<f64> {
        FloatType::from_dtype(self.dtype)
            .expect("float tensor")
            .decode(&self.bytes)
    }
}

/// Every tensor of every `*.safetensors` file in `dir`, by name (panics on duplicates).
pub fn read_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let t = Tensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            };
            assert!(
                out.insert(name.clone(), t).is_none(),
                "duplicate tensor {name}"
            );
        }
    }
    out
}

/// Relative path to contents of every file under `dir`.
pub fn read_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel_path = rel.join(entry.file_name());
            if entry.path().is_dir() {
                stack.push(rel_path);
            } else {
                out.insert(
                    rel_path.to_string_lossy().into_owned(),
                    std::fs::read(entry.path()).unwrap(),
                );
            }
        }
    }
    out
}

/// `surgery.json` of an output.
pub fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("surgery.json")).unwrap()).unwrap()
}

/// Unit roundoff of a dtype (half the distance between 1 and the next value).
pub fn roundoff(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2f64.powi(-24),
        Dtype::F16 => 2f64.powi(-11),
        Dtype::BF16 => 2f64.powi(-8),
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// Asserts `got` equals `want` within rounding to `dtype` (plus `slack` times the largest magnitude).
pub fn assert_close(name: &str, dtype: Dtype, got: &[f64], want: &[f64], slack: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let u = roundoff(dtype);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 2.0 * u * w.abs() + slack * scale + 1e-30;
        assert!(
            (g - w).abs() <= tol,
            "{name}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}

/// Entries of a directory (names), for checking that nothing was left behind.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Copies a directory tree (files only).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for (rel, bytes) in read_files(src) {
        let path = dst.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// Mounts a tmpfs with `options` on `dir` (needs root); false where this user may not mount.
pub fn mount_tmpfs(dir: &Path, options: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts what [`mount_tmpfs`] mounted.
pub fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

/// Gives the tokenizer in `dir` a post-processor that puts the BOS `<s>` (id 1 in every fixture's
/// vocabulary) in front of a text, as Llama, Mistral and Gemma tokenizers do.
pub fn add_bos_template(dir: &Path) {
    let path = dir.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let single = serde_json::json!([
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}}
    ]);
    tokenizer["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": single,
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    });
    std::fs::write(&path, serde_json::to_vec(&tokenizer).unwrap()).unwrap();
}
