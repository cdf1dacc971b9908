//! Cross-layer sharing (`--share-layers G --share latent|basis`) on the bundled fixtures and a
//! three-layer variant of one (so the last group is shorter): the factored layout (format version
//! 2) and its shapes, ranks and cache accounting in `surgery.json`, budgets counting what is
//! cached, refusals, determinism across `--threads`, group size 1 byte-identical to no sharing,
//! and the forward pass: `eval` of a written checkpoint scores what `sweep` computed in memory.

mod common;

use common::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TEXT: &str = "fixtures/eval/text.txt";
const CALIBRATION: &[&str] = &["--fit", "act", "--calibrate", TEXT, "--calib-tokens", "400"];
/// Scored after the calibration tokens (0..400).
const SCORED: &[&str] = &[
    "--text", TEXT, "--offset", "1000", "--tokens", "256", "--ctx", "64",
];

/// Writes `tensors` (F32) as `dir/model.safetensors` and applies `edit` to `dir/config.json`.
fn rewrite(
    dir: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<u8>)>,
    edit: impl Fn(&mut Value),
) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            let view =
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data).unwrap();
            (n.clone(), view)
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// `tiny-f32-gqa` with zero attention biases (`attention_bias: true`).
fn with_attention_biases(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny-biased");
    copy_dir(&fixture("tiny-f32-gqa"), &dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    for l in 0..2 {
        for (p, n) in [
            ("q_proj", 64),
            ("k_proj", 32),
            ("v_proj", 32),
            ("o_proj", 64),
        ] {
            let name = format!("model.layers.{l}.self_attn.{p}.bias");
            tensors.insert(name, (vec![n], vec![0u8; 4 * n]));
        }
    }
    rewrite(&dir, &tensors, |c| c["attention_bias"] = json!(true));
    dir
}

/// `tiny-f32-gqa` with a third layer: layer 1's tensors, its projections scaled by 0.7.
fn three_layers(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny-3-layers");
    copy_dir(&fixture("tiny-f32-gqa"), &dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32);
        tensors.insert(name.clone(), (view.shape().to_vec(), view.data().to_vec()));
        if let Some(rest) = name.strip_prefix("model.layers.1.") {
            let scale = if rest.ends_with("norm.weight") {
                1.0
            } else {
                0.7f32
            };
            let data: Vec<u8> = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * scale).to_le_bytes())
                .collect();
            tensors.insert(
                format!("model.layers.2.{rest}"),
                (view.shape().to_vec(), data),
            );
        }
    }
    rewrite(&dir, &tensors, |c| c["num_hidden_layers"] = json!(3));
    dir
}

fn convert(input: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--no-check",
    ];
    args.extend_from_slice(extra);
    run_ok(&args)
}

fn with_calibration(extra: &[&str]) -> Vec<String> {
    CALIBRATION
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn groups(report: &Value) -> Vec<Value> {
    report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["groups"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn latent_groups_are_laid_out_and_accounted_as_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let input = three_layers(tmp.path());
    let out = tmp.path().join("latent");
    let args = with_calibration(&[
        "--shared-kv",
        "rank:5",
        "--share-layers",
        "2",
        "--emit",
        "factored",
    ]);
    let summary = convert(&input, &out, &strs(&args));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let la = &config["latent_attention"];
    assert_eq!(la["format_version"], 2);
    assert_eq!(la["kv_share"], "latent");
    assert_eq!(la["kv_groups"], json!([[0, 1], [2]]));
    assert_eq!(la["kv_rank"], json!([5, 5, 5]));
    let t = read_tensors(&out);
    let name = |l: usize, n: &str| format!("model.layers.{l}.self_attn.{n}.weight");
    // hidden 64, kv_dim 2 * 16: the down-projection only where a group starts.
    assert_eq!(t[&name(0, "kv_a_proj")].shape, [5, 64]);
    assert!(!t.contains_key(&name(1, "kv_a_proj")));
    assert_eq!(t[&name(2, "kv_a_proj")].shape, [5, 64]);
    for l in 0..3 {
        assert_eq!(t[&name(l, "k_b_proj")].shape, [32, 5]);
        assert_eq!(t[&name(l, "v_b_proj")].shape, [32, 5]);
        assert!(!t.contains_key(&name(l, "k_proj")));
    }
    let r = report(&out);
    let g = groups(&r);
    assert_eq!(g.len(), 2);
    assert_eq!(
        (g[0]["layers"].clone(), g[0]["share"].clone()),
        (json!([0, 1]), json!("latent"))
    );
    assert_eq!(g[0]["shape"], json!([128, 64]));
    assert_eq!(g[0]["layer_energy_kept"].as_array().unwrap().len(), 2);
    assert!(
        g[1].get("layers").is_none(),
        "a one-layer group lists no layers"
    );
    // One latent for layers 0-1 (cached by layer 0), one for layer 2.
    let per_layer: Vec<u64> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kv_cache_values_per_token"]["after"].as_u64().unwrap())
        .collect();
    assert_eq!(per_layer, [5, 0, 5]);
    assert_eq!(r["totals"]["kv_cache_values_per_token"]["after"], 10);
    assert!(
        summary.contains("KV cache per token: 192 -> 10 values"),
        "{summary}"
    );
    assert!(r["command"]
        .as_str()
        .unwrap()
        .contains("--share-layers 2 --share latent"));
    // The forward pass runs it.
    let scored = run_ok(&[&["eval", out.to_str().unwrap()], SCORED].concat());
    assert!(scored.is_empty() || !scored.contains("error"), "{scored}");
}

#[test]
fn budgets_count_one_latent_per_group_and_a_basis_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let input = three_layers(tmp.path());
    // 25% of 3 layers x 64 cached values = 48.
    for (share, emit) in [("latent", "factored"), ("basis", "dense")] {
        let out = tmp.path().join(share);
        let args = with_calibration(&[
            "--shared-kv",
            "budget:0.25",
            "--share-layers",
            "2",
            "--share",
            share,
            "--emit",
            emit,
        ]);
        convert(&input, &out, &strs(&args));
        let r = report(&out);
        let cached = r["totals"]["kv_cache_values_per_token"]["after"]
            .as_u64()
            .unwrap();
        let g = groups(&r);
        let ranks: Vec<u64> = g.iter().map(|g| g["latent"].as_u64().unwrap()).collect();
        match share {
            "latent" => assert_eq!(cached, 48, "{ranks:?}"),
            // The two-layer basis is cached by both layers: its components cost 2 each.
            _ => {
                assert_eq!(cached, 2 * ranks[0] + ranks[1]);
                assert!((47..=48).contains(&cached), "{cached} {ranks:?}");
            }
        }
    }
}

#[test]
fn basis_dense_output_is_a_standard_checkpoint_sharing_one_row_space() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture("tiny-f32-gqa");
    for fit in ["pca", "act"] {
        let out = tmp.path().join(fit);
        let mut args = vec![
            "--shared-kv",
            "rank:6",
            "--share-layers",
            "2",
            "--share",
            "basis",
        ];
        if fit == "act" {
            args.extend_from_slice(CALIBRATION);
        } else {
            args.extend(["--fit", "pca"]);
        }
        convert(&input, &out, &args);
        let t = read_tensors(&out);
        // Every row of both layers' K and V lies in one space of rank 6 (7 with pca's mean).
        let mut rows: Vec<Vec<f64>> = Vec::new();
        for l in 0..2 {
            for n in ["k_proj", "v_proj"] {
                let m = &t[&format!("model.layers.{l}.self_attn.{n}.weight")];
                assert_eq!(m.shape, [32, 64]);
                rows.extend(m.values().chunks(64).map(<[f64]>::to_vec));
            }
        }
        let rank = numerical_rank(&rows, 1e-4);
        assert_eq!(rank, if fit == "pca" { 7 } else { 6 }, "{fit}");
        run_ok(&[&["eval", out.to_str().unwrap()], SCORED].concat());
    }
    // The factored basis expands back into a standard checkpoint that scores like it.
    let factored = tmp.path().join("factored");
    let expanded = tmp.path().join("expanded");
    let mut args = vec![
        "--shared-kv",
        "rank:6",
        "--share-layers",
        "2",
        "--share",
        "basis",
    ];
    args.extend_from_slice(CALIBRATION);
    args.extend(["--emit", "factored"]);
    convert(&input, &factored, &args);
    run_ok(&[
        "expand",
        factored.to_str().unwrap(),
        "--out",
        expanded.to_str().unwrap(),
    ]);
    let t = read_tensors(&expanded);
    assert_eq!(t["model.layers.1.self_attn.k_proj.weight"].shape, [32, 64]);
    assert!(!t
        .keys()
        .any(|n| n.contains("_a_proj") || n.contains("_b_proj")));
    let score = |dir: &Path| -> f64 {
        let out = run(&[&["eval", dir.to_str().unwrap()], SCORED].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let (f, e) = (score(&factored), score(&expanded));
    assert!(((f - e) / f).abs() < 1e-4, "factored {f} vs expanded {e}");
}

/// The rank of `rows` by Gram-Schmidt with a relative tolerance.
fn numerical_rank(rows: &[Vec<f64>], tolerance: f64) -> usize {
    let scale = rows
        .iter()
        .map(|r| r.iter().map(|v| v * v).sum::<f64>())
        .fold(0.0, f64::max)
        .sqrt();
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for row in rows {
        let mut v = row.clone();
        for b in &basis {
            let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > tolerance * scale {
            basis.push(v.iter().map(|x| x / norm).collect());
        }
    }
    basis.len()
}

#[test]
fn refusals_name_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = out.to_str().unwrap();
    let act = with_calibration(&[]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--q", "0.5", "--share-layers", "2"],
            "--share-layers: layers share the --shared-kv fit",
        ),
        (
            vec!["--shared-kv", "0.5", "--share", "basis"],
            "--share: only with --share-layers",
        ),
        (
            vec!["--shared-kv", "0.5", "--share-layers", "2"],
            "--share: latent computes",
        ),
        (
            [
                &["--shared-kv", "0.5", "--share-layers", "2"],
                strs(&act).as_slice(),
            ]
            .concat(),
            "--share: latent cannot be written as a standard checkpoint",
        ),
        (
            vec!["--shared-kv", "0.5", "--share-layers", "0"],
            "--share-layers",
        ),
    ];
    for (args, needle) in cases {
        let r = run(&[
            &["--in", "fixtures/tiny-f32-gqa", "--out", o],
            args.as_slice(),
        ]
        .concat());
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists());
    }
    // A shared latent cannot be expanded to a standard checkpoint.
    let latent = tmp.path().join("latent");
    let args = with_calibration(&[
        "--shared-kv",
        "rank:4",
        "--share-layers",
        "2",
        "--emit",
        "factored",
    ]);
    convert(&fixture("tiny-f32-gqa"), &latent, &strs(&args));
    let expanded = tmp.path().join("expanded");
    let r = run(&[
        "expand",
        latent.to_str().unwrap(),
        "--out",
        expanded.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_ne!(r.status.code(), Some(0));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("kv_share \"latent\" cannot be expanded"),
        "{stderr}"
    );
    assert!(!expanded.exists());
    // Attention biases: the shared factored form has none, so a factored conversion and a sweep
    // (which scores a shared group in its factored form) refuse them.
    let biased = with_attention_biases(tmp.path());
    let b = biased.to_str().unwrap();
    let sweep_out = tmp.path().join("sweep");
    let sweep_dir = sweep_out.to_str().unwrap();
    let shared = [
        "--shared-kv",
        "rank:4",
        "--share-layers",
        "2",
        "--share",
        "basis",
    ];
    for (args, needle) in [
        (
            [&["--in", b, "--out", o, "--emit", "factored"][..], &shared].concat(),
            "the factored form has no bias terms",
        ),
        (
            [
                &["sweep", "--in", b, "--out", sweep_dir, "--text", TEXT][..],
                &shared,
            ]
            .concat(),
            "--share-layers: the factored form of a group shared across layers has no bias terms",
        ),
    ] {
        let r = run(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_ne!(r.status.code(), Some(0), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists() && !sweep_out.exists());
    }
}

#[test]
fn output_does_not_depend_on_threads_and_one_layer_groups_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = three_layers(tmp.path());
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("t{threads}"));
        let args = with_calibration(&[
            "--shared-kv",
            "0.9",
            "--share-layers",
            "3",
            "--emit",
            "factored",
            "--threads",
            threads,
        ]);
        convert(&input, &out, &strs(&args));
        outputs.push(read_files(&out));
    }
    assert!(
        outputs[0] == outputs[1],
        "shared latent output depends on --threads"
    );
    let plain = tmp.path().join("plain");
    let one = tmp.path().join("one");
    let args = with_calibration(&["--shared-kv", "budget:0.5", "--emit", "factored"]);
    convert(&input, &plain, &strs(&args));
    let mut with_one = args.clone();
    with_one.extend(["--share-layers", "1", "--share", "basis"].map(String::from));
    convert(&input, &one, &strs(&with_one));
    assert!(
        read_files(&plain) == read_files(&one),
        "--share-layers 1 changed the output"
    );
}

#[test]
fn eval_of_a_written_checkpoint_scores_what_sweep_computed() {
    let tmp = tempfile::tempdir().unwrap();
    let input = three_layers(tmp.path());
    let sweep_out = tmp.path().join("sweep");
    let calibration = with_calibration(&[]);
    let mut args = vec![
        "sweep",
        "--in",
        input.to_str().unwrap(),
        "--out",
        sweep_out.to_str().unwrap(),
    ];
    args.extend_from_slice(SCORED);
    args.extend([
        "--shared-kv",
        "rank:5",
        "--share-layers",
        "1,2",
        "--share",
        "latent,basis",
    ]);
    args.extend(strs(&calibration));
    run_ok(&args);
    let sweep: Value =
        serde_json::from_slice(&std::fs::read(sweep_out.join("sweep.json")).unwrap()).unwrap();
    let configs = sweep["configs"].as_array().unwrap();
    let labels: Vec<&str> = configs
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "--shared-kv rank:5 --fit act",
            "--shared-kv rank:5 --fit act --share-layers 2 --share latent",
            "--shared-kv rank:5 --fit act --share-layers 2 --share basis",
        ]
    );
    for (config, share) in configs[1..].iter().zip(["latent", "basis"]) {
        let out = tmp.path().join(share);
        let a = with_calibration(&[
            "--shared-kv",
            "rank:5",
            "--share-layers",
            "2",
            "--share",
            share,
            "--emit",
            "factored",
        ]);
        convert(&input, &out, &strs(&a));
        let eval = run(&[&["eval", out.to_str().unwrap()], SCORED].concat());
        assert!(
            eval.status.success(),
            "{}",
            String::from_utf8_lossy(&eval.stderr)
        );
        let e: Value = serde_json::from_slice(&eval.stdout).unwrap();
        // As for per-layer fits (tests/sweep.rs): equal to the f32 products' blocking (the
        // refitted o_proj, read from the file, is multiplied in another memory layout).
        let (got, want) = (
            e["perplexity"].as_f64().unwrap(),
            config["perplexity"].as_f64().unwrap(),
        );
        assert!(
            ((got - want) / want).abs() < 1e-8,
            "{share}: eval {got} vs sweep {want}"
        );
        assert_eq!(
            config["kv_cache_values_per_token"]["after"],
            report(&out)["totals"]["kv_cache_values_per_token"]["after"]
        );
    }
    // Sharing changes what is computed: the configurations differ.
    let p: Vec<f64> = configs
        .iter()
        .map(|c| c["perplexity"].as_f64().unwrap())
        .collect();
    assert!(p[0] != p[1] && p[1] != p[2], "{p:?}");
}
