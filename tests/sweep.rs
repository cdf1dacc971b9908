//! `surgery-convert sweep` and `inspect` on the bundled fixtures: the three files with a row per
//! configuration in order, full rank equal to the base, figures and perplexities equal to real
//! conversions scored by `eval`, budgets hit, the SVGs well-formed with a line per fit, inspect's
//! counts equal to a conversion's ranks, determinism, and bad input failing with one line.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use surgery_convert::commands::sweep::plot::{BASE_COLOR, PALETTE};

const MODEL: &str = "fixtures/tiny-f32-gqa";
const TEXT: &str = "fixtures/eval/text.txt";
const LAYERS: u64 = 2;
/// 256 tokens in windows of 64, from token 7.
const WINDOWS: [&str; 6] = ["--tokens", "256", "--ctx", "64", "--offset", "7"];

/// Runs `sweep` into `out` and returns sweep.json.
fn sweep(out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["sweep", "--in", MODEL, "--text", TEXT, "--quiet"];
    args.extend_from_slice(&WINDOWS);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    run_ok(&args);
    serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The document without its `seconds` fields (the only ones that may differ between runs).
fn without_seconds(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "seconds")
                .map(|(k, v)| (k.clone(), without_seconds(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_seconds).collect()),
        other => other.clone(),
    }
}

fn hex(c: plotters::style::RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// The table rows of sweep.md (header and separator excluded).
fn table_rows(md: &str) -> Vec<&str> {
    md.lines().filter(|l| l.starts_with("| ")).skip(1).collect()
}

#[test]
fn writes_three_files_with_a_row_per_config_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let report = sweep(
        &out,
        &["--shared-kv", "1.0,0.5,budget:0.25", "--fit", "pca,svd"],
    );
    assert_eq!(entries(&out), ["sweep.json", "sweep.md", "sweep.svg"]);
    assert_eq!(entries(tmp.path()), ["sweep"], "no staging left behind");

    let labels: Vec<&str> = report["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    let expected = [
        "--shared-kv 1 --fit pca",
        "--shared-kv 1 --fit svd",
        "--shared-kv 0.5 --fit pca",
        "--shared-kv 0.5 --fit svd",
        "--shared-kv budget:0.25 --fit pca",
        "--shared-kv budget:0.25 --fit svd",
    ];
    assert_eq!(labels, expected);
    assert_eq!(report["text"]["tokens"], 4 * 63);
    assert_eq!(report["text"]["offset"], 7);
    assert_eq!(report["text"]["windows"], 4);
    assert!(report.get("calibration").is_none());

    // The base row first, then one row per configuration in sweep order.
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    let rows = table_rows(&md);
    assert_eq!(rows.len(), 1 + expected.len(), "{md}");
    assert!(rows[0].starts_with("| base |"), "{}", rows[0]);
    for (row, label) in rows[1..].iter().zip(expected) {
        assert!(row.starts_with(&format!("| `{label}` |")), "{row}");
    }

    // Full rank with the mean restored is the model itself, to rounding.
    let base = num(&report["base"]["perplexity"]);
    let configs = report["configs"].as_array().unwrap();
    let full = num(&configs[0]["perplexity"]);
    assert!(
        ((full - base) / base).abs() < 1e-3,
        "full rank {full} vs base {base}"
    );
    assert!((num(&configs[0]["ratio_to_base"]) - full / base).abs() < 1e-12);
    // A real truncation changes the model.
    assert!((num(&configs[2]["perplexity"]) - base).abs() > 1e-6 * base);

    // budget:0.25 keeps a quarter of the K/V cache, within one rank per layer.
    for c in &configs[4..] {
        let kv = &c["kv_cache_values_per_token"];
        let (before, after) = (
            kv["before"].as_u64().unwrap(),
            kv["after"].as_u64().unwrap(),
        );
        assert_eq!(before, LAYERS * 2 * 32);
        let target = 0.25 * before as f64;
        assert!(
            (after as f64 - target).abs() <= LAYERS as f64,
            "{}: {after} values vs budget {target}",
            c["label"]
        );
        let ranks = c["ranks"]["shared_kv"]["per_layer"].as_array().unwrap();
        assert_eq!(ranks.len() as u64, LAYERS);
    }

    // The SVG: well-formed, one line (and a legend entry) per fit, the base line dashed in grey.
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("sweep.svg is XML");
    let polylines: Vec<(String, usize)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| {
            (
                n.attribute("stroke").unwrap_or("").to_string(),
                n.attribute("points")
                    .unwrap_or("")
                    .split_whitespace()
                    .count(),
            )
        })
        .collect();
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect();
    for (i, fit) in ["pca", "svd"].iter().enumerate() {
        let color = hex(PALETTE[i]);
        // Three configurations per fit: a line through three points (plus the legend sample).
        assert!(
            polylines.iter().any(|(s, n)| *s == color && *n == 3),
            "no 3-point line in {color} for {fit}"
        );
        assert!(texts.iter().any(|t| t == fit), "no legend entry {fit}");
    }
    assert!(polylines.iter().any(|(s, _)| *s == hex(BASE_COLOR)));
    assert!(texts.iter().any(|t| t.starts_with("base (unmodified)")));
    assert!(texts
        .iter()
        .any(|t| t.starts_with("K/V cache values per token")));
    assert!(texts
        .iter()
        .any(|t| t.starts_with("perplexity (log scale)")));

    // Deterministic apart from the timings; --force replaces the directory.
    let again = sweep(
        &out,
        &[
            "--shared-kv",
            "1.0,0.5,budget:0.25",
            "--fit",
            "pca,svd",
            "--force",
        ],
    );
    assert_eq!(without_seconds(&again), without_seconds(&report));
    assert_eq!(std::fs::read_to_string(out.join("sweep.md")).unwrap(), md);
    assert_eq!(std::fs::read_to_string(out.join("sweep.svg")).unwrap(), svg);
}

#[test]
fn configs_match_real_conversions_scored_by_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = [
        "--calibrate",
        TEXT,
        "--calib-tokens",
        "256",
        "--calib-offset",
        "300",
        "--calib-ctx",
        "64",
    ];
    let report = sweep(
        &tmp.path().join("sweep"),
        &[
            &[
                "--shared-kv",
                "0.5,budget:0.5",
                "--q",
                "0.9",
                "--fit",
                "svd,act",
            ][..],
            &calibration,
        ]
        .concat(),
    );
    assert_eq!(report["calibration"]["tokens"], 256);
    assert_eq!(report["calibration"]["offset"], 300);
    let configs = report["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 4);
    for (i, c) in configs.iter().enumerate() {
        let label = c["label"].as_str().unwrap();
        let converted = tmp.path().join(format!("conversion-{i}"));
        let mut args = vec![
            "--in",
            MODEL,
            "--out",
            converted.to_str().unwrap(),
            "--quiet",
        ];
        args.extend(label.split(' '));
        if c["fit"] == "act" {
            args.extend_from_slice(&calibration);
        }
        run_ok(&args);
        let surgery = common::report(&converted);
        let totals = &surgery["totals"];
        assert_eq!(
            c["kv_cache_values_per_token"], totals["kv_cache_values_per_token"],
            "{label}: K/V values per token"
        );
        assert_eq!(c["params"], totals["params"], "{label}: parameters");
        for kind in ["q", "shared_kv"] {
            let ranks: Vec<Value> = surgery["layers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|l| l["groups"].as_array().unwrap().iter())
                .filter(|g| g["kind"] == kind)
                .map(|g| g["rank"].clone())
                .collect();
            assert_eq!(
                c["ranks"][kind]["per_layer"],
                Value::from(ranks),
                "{label}: {kind} ranks"
            );
        }

        // The in-memory pass scores exactly what eval scores on the written checkpoint.
        let mut eval_args = vec!["eval", converted.to_str().unwrap(), "--text", TEXT];
        eval_args.extend_from_slice(&WINDOWS);
        let out = run(&eval_args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let eval: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (got, want) = (num(&c["perplexity"]), num(&eval["perplexity"]));
        assert!(
            ((got - want) / want).abs() < 1e-9,
            "{label}: sweep {got} vs eval of the conversion {want}"
        );
    }
}

#[test]
fn inspect_counts_equal_conversion_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let svg_path = tmp.path().join("spectra.svg");
    let out = run(&[
        "inspect",
        MODEL,
        "--svg",
        svg_path.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = counts["layers"].as_array().unwrap();
    assert_eq!(layers.len() as u64, LAYERS);

    let convert = |args: &[&str]| -> Value {
        let dir = tmp.path().join(args.join("_").replace('-', ""));
        let mut all = vec!["--in", MODEL, "--out", dir.to_str().unwrap(), "--quiet"];
        all.extend_from_slice(args);
        run_ok(&all);
        report(&dir)
    };
    let ranks = |surgery: &Value, kind: &str| -> Vec<u64> {
        surgery["layers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["groups"].as_array().unwrap().clone())
            .filter(|g| g["kind"] == kind)
            .map(|g| g["rank"].as_u64().unwrap())
            .collect()
    };
    let column = |kind: &str, share: &str| -> Vec<u64> {
        layers
            .iter()
            .map(|l| l[kind][share].as_u64().unwrap())
            .collect()
    };
    for share in ["0.5", "0.9", "0.99"] {
        let shared = convert(&["--shared-kv", share]);
        assert_eq!(
            column("shared_kv", share),
            ranks(&shared, "shared_kv"),
            "{share}"
        );
    }
    let separate = convert(&["--k", "0.9", "--v", "0.9"]);
    assert_eq!(column("k", "0.9"), ranks(&separate, "k"));
    assert_eq!(column("v", "0.9"), ranks(&separate, "v"));
    for l in layers {
        let sum = l["k"]["0.9"].as_u64().unwrap() + l["v"]["0.9"].as_u64().unwrap();
        assert_eq!(l["separate"]["0.9"].as_u64().unwrap(), sum);
        assert_eq!(l["full_rank"]["shared_kv"], 64);
    }
    let total: u64 = column("shared_kv", "0.99").iter().sum();
    assert_eq!(
        counts["totals"]["shared_kv"]["0.99"].as_u64().unwrap(),
        total
    );

    // One panel per layer, captioned with its 90% counts.
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("spectra.svg is XML");
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect();
    for l in layers {
        let caption = format!(
            "layer {}: 90% at K {} + V {} = {} | shared {}",
            l["layer"], l["k"]["0.9"], l["v"]["0.9"], l["separate"]["0.9"], l["shared_kv"]["0.9"]
        );
        assert!(texts.contains(&caption), "no caption {caption:?}");
    }
    assert!(doc.descendants().any(|n| n.has_tag_name("polyline")));

    // Without --json: the table on stderr, nothing on stdout.
    let out = run(&["inspect", MODEL]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let table = String::from_utf8(out.stderr).unwrap();
    assert!(table.contains("K/V shared"), "{table}");
    assert!(table.lines().any(|l| l.trim_start().starts_with("total")));
    assert!(table.contains("90%: separate K+V"), "{table}");
}

#[test]
fn inspect_counts_one_basis_per_group_of_layers() {
    for fixture_name in ["tiny-f32-gqa", "tiny-bf16-sharded", "tiny-tied"] {
        let model = format!("fixtures/{fixture_name}");
        let out = run(&["inspect", &model, "--json", "--share-layers", "1,2,9"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let layers = r["layers"].as_array().unwrap();
        let n = layers.len();
        let sizes = r["shared_across_layers"].as_array().unwrap();
        assert_eq!(sizes.len(), 3);
        // G = 1: exactly the per-layer shared K/V counts, by another path.
        let one = &sizes[0];
        assert_eq!(one["size"], 1);
        for (g, l) in one["groups"].as_array().unwrap().iter().zip(layers) {
            assert_eq!(g["layers"], serde_json::json!([l["layer"]]));
            assert_eq!(g["shared_kv"], l["shared_kv"], "{fixture_name}");
            assert_eq!(g["full_rank"], l["full_rank"]["shared_kv"]);
        }
        assert_eq!(one["shared_kv"], r["totals"]["shared_kv"]);
        // G = 2: adjacent pairs, the last one shorter when the count is odd.
        let two = one_size(&sizes[1], 2, n.div_ceil(2));
        let hidden = r["layers"][0]["full_rank"]["shared_kv"].as_u64().unwrap() / 2;
        assert_eq!(two[0]["layers"], serde_json::json!([0, 1]));
        // G larger than the model: one group of every layer, its rank capped by the hidden size.
        let all = one_size(&sizes[2], 9, 1);
        assert_eq!(all[0]["layers"].as_array().unwrap().len(), n);
        assert!(all[0]["full_rank"].as_u64().unwrap() >= hidden);
        // Every group's own per-layer sum adds up to the model's total, for every size.
        for size in sizes {
            assert_eq!(size["per_layer_sum"], r["totals"]["shared_kv"]);
        }
    }
    // The table says the same in one line per size; a size given twice is refused.
    let out = run(&["inspect", MODEL, "--share-layers", "2"]);
    let table = String::from_utf8(out.stderr).unwrap();
    assert!(
        table.contains("groups of 2 layers (1 group), one K/V basis each: "),
        "{table}"
    );
    let out = run(&["inspect", MODEL, "--share-layers", "2,2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--share-layers"));
    let out = run(&["inspect", MODEL, "--share-layers", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The groups of one `--share-layers` size, checked for their size and count.
fn one_size(size: &Value, g: u64, groups: usize) -> Vec<Value> {
    assert_eq!(size["size"], g);
    let all = size["groups"].as_array().unwrap().clone();
    assert_eq!(all.len(), groups);
    all
}

#[test]
fn bad_input_fails_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["sweep", "--in", MODEL, "--text", TEXT, "--out", out_s]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            base(&["--shared-kv", "0.5", "--fit", "pca,foo"]),
            2,
            "unknown fit `foo`",
        ),
        (base(&["--shared-kv", ""]), 2, "an empty entry"),
        (base(&["--shared-kv", "0.5,,0.9"]), 2, "an empty entry"),
        (
            base(&["--shared-kv", "0.5", "--fit", ""]),
            2,
            "an empty entry",
        ),
        (base(&["--fit", "pca"]), 2, "no surgery requested"),
        (
            base(&["--shared-kv", "0.5", "--calibrate", TEXT]),
            2,
            "--calibrate: only --fit act",
        ),
        (
            base(&["--shared-kv", "0.5", "--fit", "act", "--calibrate", TEXT]),
            2,
            "--text: fixtures/eval/text.txt: the tokens scored overlap the calibration tokens",
        ),
        (base(&["--shared-kv", "0.5,0.5"]), 2, "listed twice"),
        (base(&["--shared-kv", "1.5"]), 2, "--shared-kv"),
        (
            base(&["--shared-kv", "0.5", "--tokens", "10", "--ctx", "64"]),
            2,
            "--tokens",
        ),
        (
            base(&["--shared-kv", "0.5", "--text", "fixtures/no-such.txt"]),
            2,
            "--text",
        ),
        (
            vec![
                "sweep".into(),
                "--in".into(),
                MODEL.into(),
                "--text".into(),
                TEXT.into(),
                "--shared-kv".into(),
                "0.5".into(),
                "--out".into(),
                existing.to_str().unwrap().into(),
            ],
            2,
            "already exists",
        ),
        (
            vec!["inspect".into(), "fixtures/no-such-model".into()],
            1,
            "no-such-model",
        ),
    ];
    for (args, code, expect) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = run(&argv);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(code), "{argv:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{argv:?}: not one line: {stderr}"
        );
        assert!(
            stderr.starts_with("surgery-convert: error: ") && stderr.contains(expect),
            "{argv:?}: {stderr}"
        );
        assert!(!out.exists(), "{argv:?} left an output");
        assert_eq!(entries(tmp.path()), ["existing"], "{argv:?} left files");
    }
}
