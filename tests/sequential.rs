//! Sequential calibration (`--calibrate-mode sequential`) on the bundled fixtures: with nothing
//! compressed below a layer its fit is the one-shot fit (bytes equal), above it the fit moves;
//! a shared latent group starting at layer 0 is the one-shot group; budgets resolve to the same
//! ranks; the mode is recorded and reproduced; output independent of `--threads`; refusals.

mod common;

use common::*;
use std::path::Path;

const TEXT: &str = "fixtures/eval/text.txt";
const FIXTURE: &str = "tiny-f32-gqa";

fn args<'a>(extra: &[&'a str], mode: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "--fit",
        "act",
        "--calibrate",
        TEXT,
        "--calib-tokens",
        "400",
        "--no-check",
        "--calibrate-mode",
        mode,
    ];
    a.extend_from_slice(extra);
    a
}

fn convert(out: &Path, extra: &[&str], mode: &str) {
    let input = fixture(FIXTURE);
    let mut a = vec![
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend(args(extra, mode));
    run_ok(&a);
}

fn layer_tensors(dir: &Path, layer: usize) -> Vec<(String, Vec<u8>)> {
    let prefix = format!("model.layers.{layer}.self_attn.");
    read_tensors(dir)
        .into_iter()
        .filter(|(n, _)| n.starts_with(&prefix))
        .map(|(n, t)| (n, t.bytes))
        .collect()
}

#[test]
fn nothing_compressed_below_a_layer_fits_it_as_one_shot_does() {
    let tmp = tempfile::tempdir().unwrap();
    // With o_proj compensation (the default) layer 0, o_proj included, is the same too.
    let (one, seq) = (tmp.path().join("one-o"), tmp.path().join("seq-o"));
    convert(&one, &["--shared-kv", "rank:6"], "one-shot");
    convert(&seq, &["--shared-kv", "rank:6"], "sequential");
    assert!(layer_tensors(&one, 0) == layer_tensors(&seq, 0));
    let spec = ["--shared-kv", "rank:6", "--compensate", "none"];
    let (one, seq) = (tmp.path().join("one"), tmp.path().join("seq"));
    convert(&one, &spec, "one-shot");
    convert(&seq, &spec, "sequential");
    // Layer 0 reads the embeddings in both models: the same moments, the same bytes.
    assert!(layer_tensors(&one, 0) == layer_tensors(&seq, 0));
    // Layer 1 reads what the compressed layer 0 produced: refitted.
    let (a, b) = (layer_tensors(&one, 1), layer_tensors(&seq, 1));
    let kv = |t: &[(String, Vec<u8>)]| {
        t.iter()
            .filter(|(n, _)| n.contains("k_proj") || n.contains("v_proj"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        kv(&a) != kv(&b),
        "sequential calibration left layer 1 as one-shot"
    );
    // Everything but the K/V projections of layer 1 and the report is untouched.
    let (ta, tb) = (read_tensors(&one), read_tensors(&seq));
    for (name, t) in &ta {
        if !(name.starts_with("model.layers.1.")
            && (name.contains("k_proj") || name.contains("v_proj")))
        {
            assert!(t.bytes == tb[name].bytes, "{name} moved");
        }
    }
    let r = report(&seq);
    assert_eq!(r["options"]["calibration"]["mode"], "sequential");
    assert!(report(&one)["options"]["calibration"].get("mode").is_none());
    let command = r["command"].as_str().unwrap();
    assert!(command.contains("--calibrate-mode sequential"), "{command}");
}

#[test]
fn a_shared_latent_group_from_layer_0_is_the_one_shot_group() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = [
        "--shared-kv",
        "rank:5",
        "--share-layers",
        "2",
        "--emit",
        "factored",
    ];
    let (one, seq) = (tmp.path().join("one"), tmp.path().join("seq"));
    convert(&one, &spec, "one-shot");
    convert(&seq, &spec, "sequential");
    assert!(read_tensors(&one) == read_tensors(&seq));
}

#[test]
fn budgets_resolve_alike_and_output_does_not_depend_on_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    convert(&one, &["--shared-kv", "budget:0.5"], "one-shot");
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("t{threads}"));
        convert(
            &out,
            &["--shared-kv", "budget:0.5", "--threads", threads],
            "sequential",
        );
        outputs.push(read_tensors(&out));
        let ranks = |dir: &Path| -> Vec<u64> {
            report(dir)["layers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|l| l["groups"].as_array().unwrap().clone())
                .map(|g| g["rank"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(
            ranks(&one),
            ranks(&out),
            "the budget's ranks come from one-shot spectra"
        );
    }
    assert!(
        outputs[0] == outputs[1],
        "sequential output depends on --threads"
    );
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
                "--in",
                i,
                "--out",
                o,
                "--shared-kv",
                "0.9",
                "--calibrate-mode",
                "sequential",
            ],
            "--calibrate-mode: only --fit act uses calibration",
        ),
        (
            [
                &["--in", i, "--out", o][..],
                &args(
                    &[
                        "--shared-kv",
                        "rank:4",
                        "--share-layers",
                        "2",
                        "--share",
                        "basis",
                        "--emit",
                        "factored",
                    ],
                    "sequential",
                ),
            ]
            .concat(),
            "--calibrate-mode: sequential calibration does not fit --share basis",
        ),
        (
            vec![
                "--in",
                i,
                "--out",
                o,
                "--shared-kv",
                "0.9",
                "--fit",
                "act",
                "--calibrate-mode",
                "later",
            ],
            "--calibrate-mode",
        ),
    ];
    for (a, needle) in cases {
        let r = run(&a);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_ne!(r.status.code(), Some(0), "{a:?}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn sweep_combines_the_modes_and_scores_what_a_conversion_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture(FIXTURE);
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
        "rank:5",
        "--share-layers",
        "1,2",
        "--share",
        "latent,basis",
        "--fit",
        "act",
        "--calibrate",
        TEXT,
        "--calib-tokens",
        "400",
        "--calibrate-mode",
        "one-shot,sequential",
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
    // Sequential calibration is not combined with a shared basis.
    assert_eq!(
        labels,
        [
            "--shared-kv rank:5 --fit act",
            "--shared-kv rank:5 --fit act --calibrate-mode sequential",
            "--shared-kv rank:5 --fit act --share-layers 2 --share latent",
            "--shared-kv rank:5 --fit act --share-layers 2 --share latent --calibrate-mode sequential",
            "--shared-kv rank:5 --fit act --share-layers 2 --share basis",
        ]
    );
    let command = sweep["command"].as_str().unwrap();
    assert!(
        command.contains("--calibrate-mode one-shot,sequential"),
        "{command}"
    );
    // The sequential per-layer configuration scores what its conversion's `eval` gives.
    let out = tmp.path().join("seq");
    convert(&out, &["--shared-kv", "rank:5"], "sequential");
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
    let one_shot = configs[0]["perplexity"].as_f64().unwrap();
    assert!(one_shot != want, "the modes scored alike: {one_shot}");
}
