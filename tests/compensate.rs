//! `o_proj` compensation (`--compensate o_proj`) on the bundled fixtures: with exact K/V the
//! refit leaves `o_proj` unchanged within rounding; with compressed K/V only `o_proj` moves (the
//! K/V fits are the one-shot ones; o_proj is the default), every layer's is reported with a lower calibration error, the
//! factored form carries the same bytes, the option is recorded and reproduced, the output does
//! not depend on `--threads`; `sweep` combines it and scores what a conversion writes; refusals.

mod common;

use common::*;
use std::path::Path;

const TEXT: &str = "fixtures/eval/text.txt";

fn convert(fixture_name: &str, out: &Path, extra: &[&str]) {
    let input = fixture(fixture_name);
    let mut a = vec![
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--fit",
        "act",
        "--calibrate",
        TEXT,
        "--calib-tokens",
        "400",
        "--no-check",
    ];
    a.extend_from_slice(extra);
    run_ok(&a);
}

fn is_o_proj(name: &str) -> bool {
    name.ends_with("self_attn.o_proj.weight")
}

#[test]
fn exact_kv_leaves_o_proj_unchanged_within_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-f32-gqa", "tiny-bf16-sharded"] {
        let out = tmp.path().join(name);
        // A rank above the maximum is clamped to it: the K/V fits are exact.
        convert(
            name,
            &out,
            &["--shared-kv", "rank:100000", "--compensate", "o_proj"],
        );
        let (input, output) = (read_tensors(&fixture(name)), read_tensors(&out));
        let mut seen = 0;
        for (tensor, t) in output.iter().filter(|(n, _)| is_o_proj(n)) {
            let original = &input[tensor];
            assert_close(tensor, t.dtype, &t.values(), &original.values(), 4.0);
            seen += 1;
        }
        let compensated = report(&out)["compensated"].as_array().unwrap().clone();
        assert_eq!(compensated.len(), seen, "{name}: one report per o_proj");
        for c in &compensated {
            let change = c["relative_change"].as_f64().unwrap();
            assert!(change < 1e-2, "{name}: {c}");
        }
    }
}

#[test]
fn only_o_proj_moves_and_the_calibration_error_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, comp) = (tmp.path().join("plain"), tmp.path().join("comp"));
    let fixture_name = "tiny-f32-gqa";
    convert(
        fixture_name,
        &plain,
        &["--shared-kv", "rank:3", "--compensate", "none"],
    );
    // o_proj is the default.
    convert(fixture_name, &comp, &["--shared-kv", "rank:3"]);
    let (a, b) = (read_tensors(&plain), read_tensors(&comp));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut moved = 0;
    for (name, t) in &a {
        if is_o_proj(name) {
            assert!(t.bytes != b[name].bytes, "{name} not refitted");
            moved += 1;
        } else {
            assert!(t.bytes == b[name].bytes, "{name} moved");
        }
    }
    let r = report(&comp);
    let compensated = r["compensated"].as_array().unwrap();
    assert_eq!(compensated.len(), moved);
    for (layer, c) in compensated.iter().enumerate() {
        assert_eq!(c["layer"], layer as u64);
        assert!(is_o_proj(c["tensor"].as_str().unwrap()), "{c}");
        let (before, after) = (
            c["calibration_error_before"].as_f64().unwrap(),
            c["calibration_error_after"].as_f64().unwrap(),
        );
        assert!(before > 0.0 && after < before, "{c}");
        assert!(c["relative_change"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(r["options"]["compensate"], "o_proj");
    assert!(report(&plain).get("compensated").is_none());
    // The reproduce command names what differs from the default.
    let command = r["command"].as_str().unwrap();
    assert!(!command.contains("--compensate"), "{command}");
    let plain_command = report(&plain)["command"].as_str().unwrap().to_string();
    assert!(
        plain_command.contains("--compensate none"),
        "{plain_command}"
    );
    // The factored form carries the same refitted o_proj.
    let factored = tmp.path().join("factored");
    convert(
        fixture_name,
        &factored,
        &[
            "--shared-kv",
            "rank:3",
            "--compensate",
            "o_proj",
            "--emit",
            "factored",
        ],
    );
    let f = read_tensors(&factored);
    for (name, t) in b.iter().filter(|(n, _)| is_o_proj(n)) {
        assert!(
            f[name].bytes == t.bytes,
            "{name} differs in the factored form"
        );
    }
}

#[test]
fn sequential_compensation_does_not_depend_on_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("t{threads}"));
        convert(
            "tiny-f32-gqa",
            &out,
            &[
                "--shared-kv",
                "budget:0.5",
                "--calibrate-mode",
                "sequential",
                "--compensate",
                "o_proj",
                "--threads",
                threads,
            ],
        );
        outputs.push(read_files(&out));
    }
    assert!(outputs[0] == outputs[1], "output depends on --threads");
}

#[test]
fn refusals_name_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture("tiny-f32-gqa");
    let out = tmp.path().join("out");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    let base = ["--in", i, "--out", o, "--shared-kv", "rank:3"];
    let cases: [(&[&str], &str); 3] = [
        (
            &["--compensate", "o_proj"],
            "--compensate: only --fit act uses calibration",
        ),
        (
            &["--fit", "act", "--compensate", "o_proj,none"],
            "--compensate: a conversion takes one value",
        ),
        (&["--fit", "act", "--compensate", "q_proj"], "--compensate"),
    ];
    for (extra, needle) in cases {
        let a = [&base[..], extra].concat();
        let r = run(&a);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_ne!(r.status.code(), Some(0), "{a:?}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn sweep_combines_compensation_and_scores_what_a_conversion_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture("tiny-f32-gqa");
    let sweep_out = tmp.path().join("sweep");
    let scored = [
        "--text", TEXT, "--offset", "1000", "--tokens", "256", "--ctx", "64",
    ];
    let mut a = vec![
        "sweep",
        "--in",
        input.to_str().unwrap(),
        "--out",
        sweep_out.to_str().unwrap(),
        "--shared-kv",
        "rank:3",
        "--fit",
        "act",
        "--calibrate",
        TEXT,
        "--calib-tokens",
        "400",
        "--compensate",
        "none,o_proj",
    ];
    a.extend_from_slice(&scored);
    run_ok(&a);
    let sweep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sweep_out.join("sweep.json")).unwrap()).unwrap();
    let configs = sweep["configs"].as_array().unwrap();
    let labels: Vec<&str> = configs
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "--shared-kv rank:3 --fit act --compensate none",
            "--shared-kv rank:3 --fit act"
        ]
    );
    let command = sweep["command"].as_str().unwrap();
    assert!(command.contains("--compensate none,o_proj"), "{command}");
    let out = tmp.path().join("comp");
    convert("tiny-f32-gqa", &out, &["--shared-kv", "rank:3"]);
    let eval = run(&[&["eval", out.to_str().unwrap()][..], &scored].concat());
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let (got, want) = (
        e["perplexity"].as_f64().unwrap(),
        configs[1]["perplexity"].as_f64().unwrap(),
    );
    assert!(
        ((got - want) / want).abs() < 1e-9,
        "eval {got} vs sweep {want}"
    );
    let plain = configs[0]["perplexity"].as_f64().unwrap();
    assert!(plain != want, "compensation scored as none: {plain}");
}
