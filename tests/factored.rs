//! Binary-level tests of the factored form (`--emit factored`) and `expand` on the bundled fixtures:
//! `b @ a` equals the dense output, shapes and ranks match the report and `config.json`, bytes are
//! deterministic, `expand` gives back the dense output, the files shrink by the expected amount, and
//! bad factored input fails cleanly.

mod common;

use common::*;
use safetensors::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FIXTURES: &[&str] = &["tiny-f32-gqa", "tiny-bf16-sharded", "tiny-tied"];
const FITS: &[&str] = &["pca", "seed", "svd"];
/// Shared K/V with a factored query, and K and V factored separately.
const METHODS: &[&[&str]] = &[
    &["--shared-kv", "0.5", "--q", "0.9"],
    &["--k", "0.5", "--v", "rank:3"],
];

fn convert(input: &str, out: &Path, extra: &[&str]) {
    let mut args = vec!["--in", input, "--out", out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    run_ok(&args);
}

/// Converts `fixture` with `args` into `<tmp>/<label>-dense` and `<tmp>/<label>-factored`.
fn dense_and_factored(tmp: &Path, fixture_name: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let label = format!("{fixture_name}{}", args.join("_")).replace([':', '.'], "");
    let dense = tmp.join(format!("{label}-dense"));
    let factored = tmp.join(format!("{label}-factored"));
    let input = format!("fixtures/{fixture_name}");
    convert(&input, &dense, args);
    let mut f = args.to_vec();
    f.extend(["--emit", "factored"]);
    convert(&input, &factored, &f);
    (dense, factored)
}

/// A row-major matrix read from a tensor.
struct Matrix {
    rows: usize,
    cols: usize,
    values: Vec<f64>,
}

fn matrix(t: &Tensor) -> Matrix {
    assert_eq!(t.shape.len(), 2);
    Matrix {
        rows: t.shape[0],
        cols: t.shape[1],
        values: t.values(),
    }
}

/// `b @ a` and, entry by entry, `|b| @ |a|` and `sum_k (|b_ik| + |a_kj|)` (for error bounds).
fn product_with_bounds(b: &Matrix, a: &Matrix) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert_eq!(b.cols, a.rows, "inner dimensions");
    let (m, n, r) = (b.rows, a.cols, a.rows);
    let (mut p, mut abs, mut sum) = (vec![0.0; m * n], vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for k in 0..r {
            let bik = b.values[i * r + k];
            for j in 0..n {
                let akj = a.values[k * n + j];
                p[i * n + j] += bik * akj;
                abs[i * n + j] += (bik * akj).abs();
                sum[i * n + j] += bik.abs() + akj.abs();
            }
        }
    }
    (p, abs, sum)
}

/// Asserts `got` (a value derived from the factors) equals `want` (the dense output) within the
/// rounding of the factors and of both outputs to `dtype`: with `u` the unit roundoff,
/// `|b^ a^ - W'| <= 2u |b^||a^| + u|W'|` (+ `u|got|` when `got` was itself rounded), plus for F16 the
/// absolute error of subnormals (`2^-25` per stored value).
fn assert_within_factor_rounding(
    name: &str,
    dtype: Dtype,
    got: &[f64],
    want: &[f64],
    bounds: &(Vec<f64>, Vec<f64>, Vec<f64>),
    got_rounded: bool,
) {
    let u = roundoff(dtype);
    let tiny = if dtype == Dtype::F16 {
        2f64.powi(-25)
    } else {
        0.0
    };
    let (_, abs, sum) = bounds;
    let mut worst = 0.0f64;
    for i in 0..want.len() {
        let tol = 2.01 * u * abs[i]
            + 1.01 * u * want[i].abs()
            + if got_rounded {
                1.01 * u * got[i].abs()
            } else {
                0.0
            }
            + tiny * (sum[i] + 2.0)
            + 1e-300;
        let err = (got[i] - want[i]).abs();
        worst = worst.max(err / tol);
        assert!(
            err <= tol,
            "{name}[{i}]: {} vs dense {} (difference {err:e} > bound {tol:e})",
            got[i],
            want[i]
        );
    }
    assert!(worst.is_finite(), "{name}");
}

/// One group of the report: `(layer, kind, rank, latent, member names, [rows, cols])`.
type GroupRow = (usize, String, usize, usize, Vec<String>, [usize; 2]);

/// The report's groups.
fn groups(report: &Value) -> Vec<GroupRow> {
    let mut out = Vec::new();
    for layer in report["layers"].as_array().unwrap() {
        for g in layer["groups"].as_array().unwrap() {
            out.push((
                g["layer"].as_u64().unwrap() as usize,
                g["kind"].as_str().unwrap().to_string(),
                g["rank"].as_u64().unwrap() as usize,
                g["latent"].as_u64().unwrap() as usize,
                g["tensors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect(),
                [
                    g["shape"][0].as_u64().unwrap() as usize,
                    g["shape"][1].as_u64().unwrap() as usize,
                ],
            ));
        }
    }
    out
}

/// Factor names of a group: `(down, [up per member])`.
fn factor_names(layer: usize, kind: &str) -> (String, Vec<String>) {
    let n = |s: &str| format!("model.layers.{layer}.self_attn.{s}.weight");
    match kind {
        "q" => (n("q_a_proj"), vec![n("q_b_proj")]),
        "k" => (n("k_a_proj"), vec![n("k_b_proj")]),
        "v" => (n("v_a_proj"), vec![n("v_b_proj")]),
        "shared_kv" => (n("kv_a_proj"), vec![n("k_b_proj"), n("v_b_proj")]),
        other => panic!("unknown group kind {other}"),
    }
}

#[test]
fn factors_multiply_to_the_dense_output_for_every_fit() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture_name in FIXTURES {
        for fit in FITS {
            for method in METHODS {
                let mut args = method.to_vec();
                args.extend(["--fit", fit]);
                let (dense_dir, factored_dir) = dense_and_factored(tmp.path(), fixture_name, &args);
                let dense = read_tensors(&dense_dir);
                let factored = read_tensors(&factored_dir);
                let report = report(&factored_dir);
                let dense_report = report_of(&dense_dir);
                assert_eq!(
                    groups(&report).iter().map(|g| g.2).collect::<Vec<_>>(),
                    groups(&dense_report)
                        .iter()
                        .map(|g| g.2)
                        .collect::<Vec<_>>(),
                    "{fixture_name} {args:?}: dense and factored ranks differ"
                );
                for (layer, kind, _, _, members, _) in groups(&report) {
                    let (down, ups) = factor_names(layer, &kind);
                    let a = matrix(&factored[&down]);
                    for (member, up) in members.iter().zip(&ups) {
                        let b = matrix(&factored[up]);
                        let bounds = product_with_bounds(&b, &a);
                        let want = &dense[member];
                        assert_eq!(want.shape, vec![b.rows, a.cols], "{member}");
                        assert_eq!(factored[up].dtype, want.dtype, "{up}: dtype");
                        assert_within_factor_rounding(
                            &format!("{fixture_name} {args:?} {up} @ {down}"),
                            want.dtype,
                            &bounds.0,
                            &want.values(),
                            &bounds,
                            false,
                        );
                        assert!(
                            !factored.contains_key(member),
                            "{member} must be absent from the factored output"
                        );
                    }
                }
                // Everything else is the same tensor, byte for byte.
                for (name, t) in &factored {
                    if !name.contains("_a_proj") && !name.contains("_b_proj") {
                        assert!(dense[name] == *t, "{name} differs");
                    }
                }
            }
        }
    }
}

fn report_of(dir: &Path) -> Value {
    report(dir)
}

#[test]
fn ranks_and_shapes_match_the_report_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture_name in FIXTURES {
        for (method, fit) in METHODS.iter().zip(["pca", "svd"]) {
            let mut args = method.to_vec();
            args.extend(["--fit", fit]);
            let (_, dir) = dense_and_factored(tmp.path(), fixture_name, &args);
            let tensors = read_tensors(&dir);
            let report = report(&dir);
            let config: Value =
                serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
            assert_eq!(config["architectures"][0], "SurgeryLlamaForCausalLM");
            assert_eq!(config["model_type"], "surgery_llama");
            assert_eq!(
                config["auto_map"]["AutoModelForCausalLM"],
                "modeling_surgery_llama.SurgeryLlamaForCausalLM"
            );
            assert!(dir.join("modeling_surgery_llama.py").is_file());
            let la = &config["latent_attention"];
            assert_eq!(la["format_version"], 1);
            assert_eq!(la["fit"], *fit);
            assert_eq!(la["original_architectures"][0], "LlamaForCausalLM");
            assert_eq!(report["output"]["emit"], "factored");
            let mut kv_after = 0u64;
            let mut seen = 0;
            for (layer, kind, rank, latent, members, [_, cols]) in groups(&report) {
                assert_eq!(latent, rank + usize::from(fit == "pca"), "latent width");
                let key = match kind.as_str() {
                    "shared_kv" => "kv_rank",
                    "q" => "q_rank",
                    "k" => "k_rank",
                    _ => "v_rank",
                };
                assert_eq!(la[key][layer], latent, "{key}[{layer}]");
                let (down, ups) = factor_names(layer, &kind);
                assert_eq!(tensors[&down].shape, vec![latent, cols], "{down}");
                for (member, up) in members.iter().zip(&ups) {
                    let rows = report["model"]["num_kv_heads"].as_u64().unwrap() as usize
                        * report["model"]["head_dim"].as_u64().unwrap() as usize;
                    let rows = if member.contains("q_proj") {
                        report["model"]["num_heads"].as_u64().unwrap() as usize
                            * report["model"]["head_dim"].as_u64().unwrap() as usize
                    } else {
                        rows
                    };
                    assert_eq!(tensors[up].shape, vec![rows, latent], "{up}");
                }
                if kind != "q" {
                    kv_after += latent as u64;
                }
                seen += 1;
            }
            assert_eq!(
                seen,
                report["totals"]["decompositions"].as_u64().unwrap() as usize
            );
            assert_eq!(
                report["totals"]["kv_cache_values_per_token"]["after"], kv_after,
                "{fixture_name} {args:?}: KV cache per token"
            );
            // The output verifies and holds exactly the planned tensors.
            run_ok(&["verify", dir.to_str().unwrap()]);
            for (_, _, _, _, members, _) in groups(&report) {
                for m in members {
                    assert!(!tensors.contains_key(&m), "{m} must be absent");
                }
            }
        }
    }
}

#[test]
fn summary_prints_the_kv_cache_saving() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f");
    let stderr = run_ok(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
        "--emit",
        "factored",
    ]);
    let report = report(&out);
    let kv = &report["totals"]["kv_cache_values_per_token"];
    let (before, after) = (
        kv["before"].as_u64().unwrap(),
        kv["after"].as_u64().unwrap(),
    );
    let line = format!(
        "KV cache per token: {before} -> {after} values ({:+.1}%)",
        100.0 * (after as f64 - before as f64) / before as f64
    );
    assert!(stderr.contains(&line), "`{line}` missing from:\n{stderr}");
    assert!(after < before);
}

#[test]
fn factored_bytes_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (i, threads) in ["1", "2", "2"].into_iter().enumerate() {
        let out = tmp.path().join(format!("run{i}"));
        convert(
            "fixtures/tiny-bf16-sharded",
            &out,
            &[
                "--shared-kv",
                "0.5",
                "--q",
                "0.9",
                "--emit",
                "factored",
                "--threads",
                threads,
            ],
        );
        outputs.push(read_files(&out));
    }
    assert!(outputs[0] == outputs[1] && outputs[1] == outputs[2]);
}

#[test]
fn expand_gives_back_the_dense_output() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture_name in FIXTURES {
        for (method, fit) in METHODS.iter().zip(["pca", "seed"]) {
            let mut args = method.to_vec();
            args.extend(["--fit", fit]);
            let (dense_dir, factored_dir) = dense_and_factored(tmp.path(), fixture_name, &args);
            let expanded_dir = tmp.path().join(format!(
                "{}-expanded",
                factored_dir.file_name().unwrap().to_string_lossy()
            ));
            run_ok(&[
                "expand",
                factored_dir.to_str().unwrap(),
                "--out",
                expanded_dir.to_str().unwrap(),
                "--quiet",
            ]);
            run_ok(&["verify", expanded_dir.to_str().unwrap()]);
            let dense = read_tensors(&dense_dir);
            let factored = read_tensors(&factored_dir);
            let expanded = read_tensors(&expanded_dir);
            assert_eq!(
                dense.keys().collect::<Vec<_>>(),
                expanded.keys().collect::<Vec<_>>(),
                "tensor names"
            );
            for (layer, kind, _, _, members, _) in groups(&report(&factored_dir)) {
                let (down, ups) = factor_names(layer, &kind);
                let a = matrix(&factored[&down]);
                for (member, up) in members.iter().zip(&ups) {
                    let bounds = product_with_bounds(&matrix(&factored[up]), &a);
                    let (want, got) = (&dense[member], &expanded[member]);
                    assert_eq!(
                        (got.dtype, &got.shape),
                        (want.dtype, &want.shape),
                        "{member}"
                    );
                    assert_within_factor_rounding(
                        &format!("{fixture_name} {args:?} expanded {member}"),
                        want.dtype,
                        &got.values(),
                        &want.values(),
                        &bounds,
                        true,
                    );
                }
            }
            for (name, t) in &dense {
                if !name.contains("_proj.weight") || name.contains("o_proj") || name.contains("mlp")
                {
                    assert!(expanded[name] == *t, "{name} differs");
                }
            }
            // Same files, same shards and index, same config (as JSON); no factored module.
            let names = |d: &Path| {
                entries(d)
                    .into_iter()
                    .filter(|n| n != "surgery.json" && n != "SHA256SUMS")
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&dense_dir), names(&expanded_dir));
            let json = |d: &Path, f: &str| -> Value {
                serde_json::from_slice(&std::fs::read(d.join(f)).unwrap()).unwrap()
            };
            assert_eq!(
                json(&dense_dir, "config.json"),
                json(&expanded_dir, "config.json")
            );
            if dense_dir.join("model.safetensors.index.json").exists() {
                assert_eq!(
                    json(&dense_dir, "model.safetensors.index.json"),
                    json(&expanded_dir, "model.safetensors.index.json")
                );
            }
            let r = report(&expanded_dir);
            assert_eq!(r["operation"], "expand");
            assert_eq!(r["source_report"]["output"]["emit"], "factored");
        }
    }
}

/// `(header bytes, data bytes)` of every safetensors file in `dir`.
fn file_layout(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for name in entries(dir) {
        if !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        out.insert(name, (header, bytes.len() as u64 - header));
    }
    out
}

#[test]
fn factored_files_are_smaller_by_the_expected_amount() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture_name in FIXTURES {
        for method in METHODS {
            let (dense_dir, factored_dir) = dense_and_factored(tmp.path(), fixture_name, method);
            let report = report(&factored_dir);
            let saved: u64 = report["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    l["bytes"]["before"].as_u64().unwrap() - l["bytes"]["after"].as_u64().unwrap()
                })
                .sum();
            // The expected saving, independently: every decomposed matrix [m, n] of element size s
            // becomes [L, n] + [m, L].
            let elem = |dtype: Dtype| if dtype == Dtype::F32 { 4 } else { 2 };
            let dense = read_tensors(&dense_dir);
            let mut expected = 0u64;
            for (_, _, _, latent, members, [_, cols]) in groups(&report) {
                let s = elem(dense[&members[0]].dtype) as u64;
                let rows: usize = members.iter().map(|m| dense[m].shape[0]).sum();
                expected += s * (rows * cols) as u64 - s * (latent * (rows + cols)) as u64;
            }
            assert_eq!(saved, expected, "{fixture_name} {method:?}: report");
            let (d, f) = (file_layout(&dense_dir), file_layout(&factored_dir));
            assert_eq!(d.keys().collect::<Vec<_>>(), f.keys().collect::<Vec<_>>());
            let data = |m: &BTreeMap<String, (u64, u64)>| m.values().map(|v| v.1).sum::<u64>();
            let total =
                |m: &BTreeMap<String, (u64, u64)>| m.values().map(|v| v.0 + v.1).sum::<u64>();
            assert_eq!(
                data(&d) - data(&f),
                expected,
                "{fixture_name} {method:?}: data bytes"
            );
            assert!(
                total(&f) < total(&d),
                "{fixture_name} {method:?}: file sizes"
            );
            assert_eq!(
                report["totals"]["model_bytes"]["before"].as_u64().unwrap()
                    - report["totals"]["model_bytes"]["after"].as_u64().unwrap(),
                expected
            );
        }
    }
}

#[test]
fn dry_run_lists_the_factors_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let stderr = run_ok(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.5",
        "--emit",
        "factored",
        "--dry-run",
    ]);
    assert!(
        stderr.contains("model.layers.0.self_attn.kv_a_proj.weight"),
        "{stderr}"
    );
    assert!(stderr.contains("modeling_surgery_llama.py"), "{stderr}");
    assert!(!stderr.contains("self_attn.k_proj.weight"), "{stderr}");
    assert!(!out.exists());
}

/// Runs the binary, expecting exit 1 with one error line containing every needle and nothing left
/// in `tmp` besides `keep`.
fn assert_fails(args: &[&str], needles: &[&str], tmp: &Path, keep: &[&str]) {
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` missing from: {stderr}");
    }
    let mut keep: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    keep.sort();
    assert_eq!(entries(tmp), keep, "{args:?}: something left behind");
}

#[test]
fn bad_factored_input_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let factored = t.join("factored");
    convert(
        "fixtures/tiny-f32-gqa",
        &factored,
        &["--shared-kv", "0.5", "--emit", "factored"],
    );
    let f = factored.to_str().unwrap();
    let out = t.join("out");
    let o = out.to_str().unwrap();
    // A factored checkpoint cannot be converted again without expanding it.
    assert_fails(
        &["--in", f, "--out", o, "--shared-kv", "0.3"],
        &[
            "config.json",
            "factored checkpoint",
            "surgery-convert expand",
        ],
        t,
        &["factored"],
    );
    // Only a factored checkpoint can be expanded.
    assert_fails(
        &["expand", "fixtures/tiny-f32-gqa", "--out", o],
        &["config.json", "not a factored checkpoint"],
        t,
        &["factored"],
    );
    // A latent width in config.json that disagrees with the tensors.
    let broken = t.join("broken");
    copy_dir(&factored, &broken);
    let config_path = broken.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let width = config["latent_attention"]["kv_rank"][1].as_u64().unwrap();
    config["latent_attention"]["kv_rank"][1] = (width + 1).into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_fails(
        &["expand", broken.to_str().unwrap(), "--out", o],
        &[
            "model.safetensors",
            "model.layers.1.self_attn.kv_a_proj.weight",
            "disagrees with config.json",
        ],
        t,
        &["broken", "factored"],
    );
    // An inconsistent description.
    config["latent_attention"]["kv_rank"][1] = width.into();
    config["latent_attention"]["kv"] = "separate".into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_fails(
        &["expand", broken.to_str().unwrap(), "--out", o],
        &["config.json", "neither k_rank nor v_rank"],
        t,
        &["broken", "factored"],
    );
    config["latent_attention"]["kv"] = "shared".into();
    config["latent_attention"]
        .as_object_mut()
        .unwrap()
        .remove("kv_rank");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_fails(
        &["expand", broken.to_str().unwrap(), "--out", o],
        &["config.json", "kv_rank is missing"],
        t,
        &["broken", "factored"],
    );
    // An unknown format version.
    config["latent_attention"]["kv_rank"] = serde_json::json!([width, width]);
    config["latent_attention"]["format_version"] = 99.into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_fails(
        &["expand", broken.to_str().unwrap(), "--out", o],
        &["config.json", "format_version 99"],
        t,
        &["broken", "factored"],
    );
}
