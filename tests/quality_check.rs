//! The quality check printed after a conversion: its figures equal `eval` on the same tokens (the
//! built-in held-out sample is also what `eval` scores without `--text`), when it runs by default,
//! `--check-text`, and what is refused before anything is written.

mod common;

use common::eval_json as eval;
use common::*;
use std::path::Path;

const TEXT: &str = "fixtures/eval/text.txt";

/// Converts `fixture` into `out` with `args`; returns stderr.
fn convert(fixture_name: &str, out: &Path, args: &[&str]) -> String {
    let input = fixture(fixture_name);
    let mut all = vec![
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend(args);
    run_ok(&all)
}

#[test]
fn check_figures_equal_eval_on_the_builtin_sample() {
    let tmp = tempfile::tempdir().unwrap();
    for (fixture_name, args) in [
        ("tiny-f32-gqa", vec!["--shared-kv", "0.5", "--check"]),
        (
            "tiny-bf16-sharded",
            vec![
                "--shared-kv",
                "rank:4",
                "--fit",
                "act",
                "--emit",
                "factored",
            ],
        ),
        ("tiny-tied", vec!["--k", "0.6", "--fit", "act"]),
    ] {
        let out = tmp.path().join(fixture_name);
        let stderr = convert(fixture_name, &out, &args);
        let r = report(&out);
        let check = &r["check"];
        assert_eq!(check["text"], "built-in:check", "{fixture_name}");
        assert_eq!(
            (check["ctx"].as_u64(), check["windows"].as_u64()),
            (Some(512), Some(2))
        );
        let base = eval(&fixture(fixture_name), &[]);
        let after = eval(&out, &[]);
        assert_eq!(base["text"], "built-in:check");
        assert_eq!(base["tokens"], check["tokens"]);
        assert_eq!(base["tokens"], 2 * 511);
        assert_eq!(base["text_sha256"], check["text_sha256"]);
        // The same forward pass on the same tokens: equal to the last bit.
        assert_eq!(
            base["perplexity"], check["input_perplexity"],
            "{fixture_name}"
        );
        assert_eq!(
            after["perplexity"], check["output_perplexity"],
            "{fixture_name}"
        );
        let ratio = check["ratio"].as_f64().unwrap();
        let want = after["perplexity"].as_f64().unwrap() / base["perplexity"].as_f64().unwrap();
        assert!((ratio - want).abs() <= 1e-12 * want, "{ratio} vs {want}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("perplexity on the built-in sample (1,022 tokens): "))
            .unwrap_or_else(|| panic!("no check line in:\n{stderr}"));
        assert!(
            line.contains(" -> ") && line.contains("(checked in "),
            "{line}"
        );
        // Re-running gives the same surgery.json, check included.
        let again = tmp.path().join(format!("{fixture_name}-again"));
        convert(fixture_name, &again, &args);
        assert_eq!(
            std::fs::read(out.join("surgery.json")).unwrap(),
            std::fs::read(again.join("surgery.json")).unwrap()
        );
    }
}

#[test]
fn the_check_is_on_for_act_and_off_for_weight_only_fits_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], bool, &str); 5] = [
        (&["--shared-kv", "0.5"], false, "perplexity not checked"),
        (&["--shared-kv", "0.5", "--fit", "svd", "--check"], true, ""),
        (&["--shared-kv", "0.5", "--fit", "act"], true, ""),
        (
            &["--shared-kv", "0.5", "--fit", "act", "--no-check"],
            false,
            "",
        ),
        // The later of --check / --no-check wins, as with clap's overrides everywhere.
        (&["--shared-kv", "0.5", "--no-check", "--check"], true, ""),
    ];
    for (i, (args, checked, note)) in cases.into_iter().enumerate() {
        let out = tmp.path().join(format!("o{i}"));
        let stderr = convert("tiny-f32-gqa", &out, args);
        let r = report(&out);
        assert_eq!(r.get("check").is_some(), checked, "{args:?}");
        assert_eq!(
            stderr.contains("perplexity on "),
            checked,
            "{args:?}: {stderr}"
        );
        if !note.is_empty() {
            assert!(stderr.contains(note), "{args:?}: {stderr}");
        } else {
            assert!(!stderr.contains("perplexity not checked"), "{stderr}");
        }
        // The recorded command reproduces the choice.
        let command = r["command"].as_str().unwrap();
        let reproduced = tmp.path().join(format!("r{i}"));
        let words: Vec<&str> = command.split(' ').skip(1).collect();
        let mut all = words.clone();
        all.extend(["--out", reproduced.to_str().unwrap(), "--quiet"]);
        run_ok(&all);
        assert_eq!(
            std::fs::read(out.join("surgery.json")).unwrap(),
            std::fs::read(reproduced.join("surgery.json")).unwrap(),
            "{command}"
        );
    }
}

#[test]
fn check_text_is_scored_like_eval_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let stderr = convert(
        "tiny-f32-gqa",
        &out,
        &["--shared-kv", "0.5", "--check-text", TEXT],
    );
    let r = report(&out);
    assert_eq!(r["check"]["text"], TEXT);
    let base = eval(
        &fixture("tiny-f32-gqa"),
        &["--text", TEXT, "--tokens", "1024", "--ctx", "512"],
    );
    assert_eq!(base["perplexity"], r["check"]["input_perplexity"]);
    assert!(r["command"]
        .as_str()
        .unwrap()
        .ends_with("--check-text fixtures/eval/text.txt"));
    assert!(
        stderr.contains(&format!("perplexity on {TEXT} (1,022 tokens)")),
        "{stderr}"
    );
}

#[test]
fn bad_check_requests_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let short = tmp.path().join("short.txt");
    std::fs::write(
        &short,
        "A sentence far shorter than one window of the check.",
    )
    .unwrap();
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec!["--check-text", "missing.txt"],
            "--check-text: cannot read missing.txt",
        ),
        (
            vec!["--check-text", short.to_str().unwrap()],
            "--check-text: ",
        ),
        (
            vec!["--fit", "act", "--calibrate", TEXT, "--check-text", TEXT],
            "--check-text: fixtures/eval/text.txt is the calibration text",
        ),
        (vec!["--check", "--dry-run"], "--dry-run"),
        (vec!["--check-text", TEXT, "--no-check"], "--no-check"),
    ];
    for (args, needle) in cases {
        let input = fixture("tiny-f32-gqa");
        let mut all = vec![
            "--in",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.5",
        ];
        all.extend(&args);
        let r = run(&all);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists(), "{args:?} left {out:?}");
        assert_eq!(
            entries(tmp.path()),
            vec!["short.txt".to_string()],
            "{args:?}"
        );
    }
}
