//! The token-window convention of a model whose tokenizer adds a BOS: calibration, the quality
//! check and `eval` put it in front of every window (a copy of a fixture given a BOS template in
//! its `tokenizer.json`), record it, agree with each other to the last bit, and `--bos` overrides
//! it reproducibly; text the tokenizer cannot represent is warned about.

mod common;

use common::eval_json as eval;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const TEXT: &str = "fixtures/eval/text.txt";

/// A copy of `tiny-f32-gqa` whose tokenizer puts `<s>` in front of a text.
fn bos_fixture(tmp: &Path) -> PathBuf {
    let dir = tmp.join("bos-model");
    copy_dir(&fixture("tiny-f32-gqa"), &dir);
    add_bos_template(&dir);
    dir
}

/// Converts `input` into `out` with a calibrated fit checked on held-out tokens of the same text
/// (calibration from token 1,100 on; the check scores tokens 0..1,024), plus `extra`; stderr.
fn convert(input: &Path, out: &Path, extra: &[&str]) -> String {
    let mut all = vec![
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "rank:4",
        "--fit",
        "act",
        "--calibrate",
        TEXT,
        "--calib-offset",
        "1100",
        "--calib-tokens",
        "300",
        "--calib-ctx",
        "64",
        "--check-text",
        TEXT,
    ];
    all.extend(extra);
    run_ok(&all)
}

fn bos_record() -> Value {
    serde_json::json!({"token": "<s>", "id": 1, "source": "tokenizer.json post_processor"})
}

#[test]
fn calibration_check_and_eval_lead_every_window_with_the_bos() {
    let tmp = tempfile::tempdir().unwrap();
    let input = bos_fixture(tmp.path());
    let out = tmp.path().join("out");
    let stderr = convert(&input, &out, &[]);
    let r = report(&out);
    let calibration = &r["options"]["calibration"];
    assert_eq!(calibration["bos"], bos_record());
    // 300 text tokens in windows of 63 after the BOS: the record counts text tokens.
    assert_eq!(calibration["tokens"], 300);
    assert_eq!(calibration["ctx"], 64);
    let check = &r["check"];
    assert_eq!(check["bos"], bos_record());
    // Two windows of 512 positions: 511 text tokens each, every one scored.
    assert_eq!(
        (check["windows"].as_u64(), check["tokens"].as_u64()),
        (Some(2), Some(1022))
    );
    assert!(
        stderr.contains("(1,022 tokens, each window after <s>)"),
        "{stderr}"
    );
    // The check's figures are eval's, to the last bit, on both models.
    for (model, key) in [(&input, "input_perplexity"), (&out, "output_perplexity")] {
        let e = eval(model, &["--text", TEXT, "--tokens", "1024"]);
        assert_eq!(e["bos"], bos_record());
        assert_eq!(e["tokens"], check["tokens"]);
        assert_eq!(
            e["perplexity"].as_f64().map(f64::to_bits),
            check[key].as_f64().map(f64::to_bits),
            "{key}"
        );
    }
}

#[test]
fn bos_never_is_recorded_and_reproduced() {
    let tmp = tempfile::tempdir().unwrap();
    let input = bos_fixture(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    convert(&input, &a, &["--bos", "never"]);
    let r = report(&a);
    assert_eq!(r["options"]["calibration"]["bos"], Value::Null);
    assert_eq!(r["check"]["bos"], Value::Null);
    let command = r["command"].as_str().unwrap();
    assert!(command.contains("--bos never"), "{command}");
    // The recorded command, run again, writes the same bytes.
    let words: Vec<&str> = command.split(' ').skip(1).collect();
    let mut again = words.clone();
    again.extend(["--out", b.to_str().unwrap()]);
    run_ok(&again);
    assert_eq!(
        std::fs::read(a.join("SHA256SUMS")).unwrap(),
        std::fs::read(b.join("SHA256SUMS")).unwrap()
    );
    // The BOS changes what calibration sees: auto writes other weights.
    let auto = tmp.path().join("auto");
    convert(&input, &auto, &[]);
    assert_ne!(
        read_tensors(&a)["model.layers.0.self_attn.k_proj.weight"],
        read_tensors(&auto)["model.layers.0.self_attn.k_proj.weight"]
    );
}

#[test]
fn bos_always_uses_the_named_bos_and_eval_scores_windows_after_it() {
    let plain = fixture("tiny-f32-gqa");
    let auto = eval(&plain, &["--text", TEXT, "--tokens", "300", "--ctx", "64"]);
    assert_eq!(auto["bos"], Value::Null);
    assert_eq!(
        (auto["windows"].as_u64(), auto["tokens"].as_u64()),
        (Some(4), Some(252))
    );
    let always = eval(
        &plain,
        &[
            "--text", TEXT, "--tokens", "300", "--ctx", "64", "--bos", "always",
        ],
    );
    assert_eq!(
        always["bos"],
        serde_json::json!({"token": "<s>", "id": 1, "source": "--bos always"})
    );
    // 300 text tokens make 4 windows of 63 after the BOS; 252 predictions either way.
    assert_eq!(
        (always["windows"].as_u64(), always["tokens"].as_u64()),
        (Some(4), Some(252))
    );
    assert_ne!(always["perplexity"], auto["perplexity"]);
}

#[test]
fn text_the_tokenizer_cannot_represent_is_warned_about() {
    // The fixture's word-level vocabulary knows none of the built-in sample's words.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = fixture("tiny-f32-gqa");
    let stderr = run_ok(&[
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "rank:4",
        "--check",
    ]);
    assert!(
        stderr.contains("warning: 1,024 of 1,024 tokens of the held-out text (100.0%) are the tokenizer's unknown token"),
        "{stderr}"
    );
    assert!(
        stderr.contains("not meaningful: 100% of the text is unknown to the tokenizer"),
        "{stderr}"
    );
    assert!(!stderr.contains("within 5%"), "{stderr}");
    assert_eq!(report(&out)["check"]["unknown_tokens"], 1024);
    // The fixture's own text is mostly known: no warning.
    let e = eval(&input, &["--text", TEXT, "--tokens", "300", "--ctx", "64"]);
    let unknown = e["unknown_tokens"].as_u64().unwrap();
    assert!(unknown > 0 && unknown < 30, "{unknown}");
}

#[test]
fn bos_without_text_to_read_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = fixture("tiny-f32-gqa");
    let r = run(&[
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.5",
        "--bos",
        "never",
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--bos: only calibration"), "{stderr}");
    assert!(!out.exists());
}
