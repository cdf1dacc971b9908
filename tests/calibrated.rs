//! Calibrated fits and budgets on the bundled fixtures: the calibration covariance equals a direct
//! computation, `--fit act` records its calibration and is deterministic, and `budget:F` keeps the
//! requested total of K/V cache values within one rank per layer.

mod common;

use common::*;
use safetensors::SafeTensors;
use serde_json::Value;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use surgery_convert::calibrate::one_shot::Keep;
use surgery_convert::calibrate::Calibrator;
use surgery_convert::fit::act::ActWeighting;
use surgery_convert::forward::tokenize::TextTokenizer;
use surgery_convert::input::checkpoint::Checkpoint;
use surgery_convert::input::text::{TextFile, TextSource};
use surgery_convert::options::Calibration;

const FIXTURES: &[&str] = &["tiny-f32-gqa", "tiny-bf16-sharded", "tiny-tied"];
const TEXT: &str = "fixtures/eval/text.txt";

fn text_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(TEXT)
}

#[test]
fn first_layer_covariance_equals_a_direct_computation() {
    // Layer 0's attention input is input_layernorm(embeddings): computed here straight from the
    // file, in f64, independently of the forward pass.
    let dir = fixture("tiny-f32-gqa");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let (offset, tokens) = (7, 300);
    let calibration = Calibration {
        text: TextSource::File(TextFile::new(text_path())),
        tokens: NonZeroUsize::new(tokens).unwrap(),
        offset,
        ctx: NonZeroUsize::new(64).unwrap(),
        weighting: ActWeighting::default(),
        mode: Default::default(),
        allocation: Default::default(),
        bos: Default::default(),
        sink: Default::default(),
    };
    let silent = &surgery_convert::calibrate::progress::Silent;
    let calibrator = Calibrator::new(&checkpoint, &calibration, silent).unwrap();
    let (stats, _) = calibrator.one_shot(&[], &Keep::default()).unwrap();
    let covariances = stats.covariances.unwrap();
    assert_eq!(covariances.len(), 2);
    assert_eq!(stats.calibration.unwrap().tokens, tokens);

    let text = std::fs::read_to_string(text_path()).unwrap();
    let ids = TextTokenizer::load(&dir).unwrap().encode(&text).unwrap();
    let ids = &ids[offset..offset + tokens];
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let values = |name: &str| -> Vec<f64> {
        let v = st.tensor(name).unwrap();
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()
    };
    let embed = values("model.embed_tokens.weight");
    let norm = values("model.layers.0.input_layernorm.weight");
    let hidden = norm.len();
    let eps = 1e-5;
    let mut c = vec![0.0f64; hidden * hidden];
    for &id in ids {
        let row = &embed[id as usize * hidden..(id as usize + 1) * hidden];
        let rms = (row.iter().map(|v| v * v).sum::<f64>() / hidden as f64 + eps).sqrt();
        let x: Vec<f64> = row.iter().zip(&norm).map(|(v, w)| v / rms * w).collect();
        for a in 0..hidden {
            for b in 0..hidden {
                c[a * hidden + b] += x[a] * x[b] / tokens as f64;
            }
        }
    }
    let got = covariances[0].load().unwrap();
    let later = covariances[1].load().unwrap();
    let scale = c.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for a in 0..hidden {
        for b in 0..hidden {
            // The forward pass runs in f32: agreement to f32 rounding of the normalised inputs.
            assert!(
                (got[(a, b)] - c[a * hidden + b]).abs() <= 1e-5 * scale,
                "C[{a}, {b}]: {} vs {}",
                got[(a, b)],
                c[a * hidden + b]
            );
        }
    }
    // Later layers' statistics differ (the hidden state moved through layer 0).
    let diff: f64 = (0..hidden * hidden)
        .map(|k| (later[(k / hidden, k % hidden)] - got[(k / hidden, k % hidden)]).abs())
        .sum();
    assert!(diff > 0.0);
}

fn convert(args: &[&str]) -> String {
    run_ok(args)
}

#[test]
fn act_fit_records_its_calibration_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (i, threads) in ["1", "2"].into_iter().enumerate() {
        let out = tmp.path().join(format!("act{i}"));
        convert(&[
            "--in",
            "fixtures/tiny-bf16-sharded",
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.9",
            "--q",
            "rank:8",
            "--fit",
            "act",
            "--calibrate",
            TEXT,
            "--calib-tokens",
            "400",
            "--calib-offset",
            "10",
            "--threads",
            threads,
            "--quiet",
        ]);
        outputs.push(read_files(&out));
        let r = report(&out);
        let cal = &r["options"]["calibration"];
        assert_eq!(cal["tokens"], 400);
        assert_eq!(cal["offset"], 10);
        assert_eq!(cal["file"], TEXT);
        assert_eq!(cal["sha256"].as_str().unwrap().len(), 64);
        assert!(r["command"].as_str().unwrap().contains("--calibrate"));
        for layer in r["layers"].as_array().unwrap() {
            for g in layer["groups"].as_array().unwrap() {
                assert_eq!(g["fit"], "act");
                assert_eq!(g["latent"], g["rank"], "act has no mean direction");
            }
        }
    }
    assert!(outputs[0] == outputs[1], "act output depends on --threads");
}

#[test]
fn calibration_options_need_act_and_fit_in_the_text() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--shared-kv", "0.5", "--calibrate", TEXT],
            "--calibrate: only --fit act",
        ),
        (
            vec!["--shared-kv", "0.5", "--calib-offset", "3"],
            "--calib-offset: only --fit act",
        ),
        (
            vec![
                "--shared-kv",
                "0.5",
                "--fit",
                "act",
                "--calibrate",
                TEXT,
                "--calib-tokens",
                "99999999",
            ],
            "--calib-tokens",
        ),
    ] {
        let mut all = vec!["--in", "fixtures/tiny-f32-gqa", "--out", o];
        all.extend(args);
        let r = run(&all);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn budget_hits_the_requested_total_within_one_rank_per_layer() {
    for fixture_name in FIXTURES {
        for (option, fraction) in [
            ("--shared-kv", 0.5),
            ("--shared-kv", 0.25),
            ("--shared-kv", 0.1),
            ("--k", 0.3),
        ] {
            for fit in ["pca", "svd"] {
                let spec = format!("budget:{fraction}");
                let stdout = {
                    let o = run(&[
                        "--in",
                        &format!("fixtures/{fixture_name}"),
                        "--out",
                        "unused",
                        option,
                        &spec,
                        "--fit",
                        fit,
                        "--dry-run",
                        "--json",
                    ]);
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                    o.stdout
                };
                let r: Value = serde_json::from_slice(&stdout).unwrap();
                let layers = r["layers"].as_array().unwrap();
                let mut width = 0u64;
                let mut kept = 0u64;
                let mut ranks = Vec::new();
                for l in layers {
                    for g in l["groups"].as_array().unwrap() {
                        assert_eq!(g["spec"], spec);
                        width += g["shape"][0].as_u64().unwrap();
                        kept += g["latent"].as_u64().unwrap();
                        ranks.push(g["rank"].as_u64().unwrap());
                    }
                }
                let target = (fraction * width as f64).round();
                assert!(
                    (kept as f64 - target).abs() <= layers.len() as f64,
                    "{fixture_name} {option} {spec} {fit}: kept {kept} of {width}, target {target}"
                );
                assert!(ranks.iter().all(|&r| r >= 1));
                // Ranks differ across layers only as the spectra say: the allocation is not uniform
                // by construction, but every layer's rank is within its full rank.
                for l in layers {
                    for g in l["groups"].as_array().unwrap() {
                        assert!(g["rank"].as_u64() <= g["full_rank"].as_u64());
                    }
                }
            }
        }
    }
}

#[test]
fn without_calibrate_the_builtin_text_is_used_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&[
        "--in",
        "fixtures/tiny-f32-gqa",
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "rank:4",
        "--fit",
        "act",
        "--calib-tokens",
        "400",
        "--no-check",
    ]);
    let r = report(&out);
    let cal = &r["options"]["calibration"];
    assert_eq!(cal["file"], "built-in:calibration");
    // The fixture's tokenizer has no chat template: the built-in dialogue is plain text.
    use surgery_convert::input::text::{Builtin, TextSource};
    let plain = TextSource::Builtin(Builtin::Calibration)
        .load("--calibrate", None)
        .unwrap();
    assert_eq!(cal["sha256"], plain.sha256.as_str());
    assert_eq!(cal["dialogue"], "plain text");
    assert_eq!(cal["tokens"], 400);
    let command = r["command"].as_str().unwrap();
    assert!(!command.contains("--calibrate "), "{command}");
}
