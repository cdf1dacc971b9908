//! `--budget-allocation sensitivity` on the bundled fixture: the budget's total is what spectra
//! allocation spends, the option is recorded and reproduced, the output does not depend on
//! `--threads`; `sweep` combines it; refusals name the option.

mod common;

use common::*;
use std::path::Path;

const TEXT: &str = "fixtures/eval/text.txt";
const FIXTURE: &str = "tiny-f32-gqa";

fn convert(out: &Path, extra: &[&str]) {
    let input = fixture(FIXTURE);
    let mut a = vec![
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "budget:0.5",
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

fn ranks(dir: &Path) -> Vec<u64> {
    report(dir)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["groups"].as_array().unwrap().clone())
        .map(|g| g["rank"].as_u64().unwrap())
        .collect()
}

#[test]
fn sensitivity_spends_the_same_budget_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let spectra = tmp.path().join("spectra");
    convert(&spectra, &[]);
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("t{threads}"));
        convert(
            &out,
            &["--budget-allocation", "sensitivity", "--threads", threads],
        );
        assert_eq!(
            ranks(&out).iter().sum::<u64>(),
            ranks(&spectra).iter().sum::<u64>(),
            "the budget's total moved"
        );
        outputs.push(read_files(&out));
    }
    assert!(outputs[0] == outputs[1], "output depends on --threads");
    let r = report(&tmp.path().join("t1"));
    assert_eq!(
        r["options"]["calibration"]["allocation"], "sensitivity",
        "{}",
        r["options"]
    );
    let command = r["command"].as_str().unwrap();
    assert!(
        command.contains("--budget-allocation sensitivity"),
        "{command}"
    );
    assert!(report(&spectra)["options"]["calibration"]
        .get("allocation")
        .is_none());
}

#[test]
fn refusals_name_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture(FIXTURE);
    let out = tmp.path().join("out");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec![
                "--shared-kv",
                "budget:0.5",
                "--budget-allocation",
                "sensitivity",
            ],
            "--budget-allocation: only --fit act uses calibration",
        ),
        (
            vec![
                "--shared-kv",
                "rank:3",
                "--fit",
                "act",
                "--budget-allocation",
                "sensitivity",
            ],
            "--budget-allocation: only budget:F SPECs are allocated",
        ),
        (
            vec![
                "--shared-kv",
                "budget:0.5",
                "--fit",
                "act",
                "--budget-allocation",
                "spectra,sensitivity",
            ],
            "--budget-allocation: a conversion takes one value",
        ),
    ];
    for (extra, needle) in cases {
        let a = [&["--in", i, "--out", o][..], &extra].concat();
        let r = run(&a);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_ne!(r.status.code(), Some(0), "{a:?}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn sweep_combines_the_allocations_with_budgets_only() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture(FIXTURE);
    let out = tmp.path().join("sweep");
    run_ok(&[
        "sweep",
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "budget:0.5,rank:3",
        "--fit",
        "act",
        "--calibrate",
        TEXT,
        "--calib-tokens",
        "400",
        "--budget-allocation",
        "spectra,sensitivity",
        "--text",
        TEXT,
        "--offset",
        "1000",
        "--tokens",
        "256",
        "--ctx",
        "64",
    ]);
    let sweep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    let labels: Vec<&str> = sweep["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "--shared-kv budget:0.5 --fit act",
            "--shared-kv budget:0.5 --fit act --budget-allocation sensitivity",
            "--shared-kv rank:3 --fit act",
        ]
    );
    let command = sweep["command"].as_str().unwrap();
    assert!(
        command.contains("--budget-allocation spectra,sensitivity"),
        "{command}"
    );
}
