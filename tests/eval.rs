//! `surgery-convert eval` on the bundled fixtures: perplexities agree with the independent numpy
//! forward pass of `fixtures/eval_reference.py` (RoPE scaling variants and biases included), the
//! layer-wise API keeps windows independent, factored checkpoints score like their dense twins, and
//! bad input fails with one line.

mod common;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::path::{Path, PathBuf};
use surgery_convert::forward::score::negative_log_likelihood;
use surgery_convert::forward::tokenize::TextTokenizer;
use surgery_convert::forward::Llama;
use surgery_convert::input::checkpoint::Checkpoint;

const FIXTURES: &[&str] = &["tiny-f32-gqa", "tiny-bf16-sharded", "tiny-tied"];
const TEXT: &str = "fixtures/eval/text.txt";
/// Perplexity agreement required with the float64 reference (relative).
const PPL_RTOL: f64 = 1e-4;
/// Mean NLL agreement (absolute, nats): f32 rounding on these models is about 1e-8, while the RoPE
/// variants of one fixture differ from each other by 6e-4 or more.
const NLL_ATOL: f64 = 1e-6;
/// The projections that get biases in the reference's bias case, in its order.
const PROJECTIONS: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Runs `eval` and returns its JSON report (asserting success).
fn eval(model: &Path, extra: &[&str]) -> Value {
    let model = model.to_str().unwrap();
    let mut args = vec!["eval", model, "--text", TEXT];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(
        out.status.success(),
        "eval {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("eval prints JSON")
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A copy of `fixture` with `overrides` merged into config.json and, with `bias`, the reference's
/// bias tensors added (F32 single-file fixtures only).
fn variant(tmp: &Path, fixture_name: &str, case: &str, overrides: &Value, bias: bool) -> PathBuf {
    let dir = tmp.join(format!("{fixture_name}-{case}"));
    copy_dir(&fixture(fixture_name), &dir);
    let config_path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    for (k, v) in overrides.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    if bias {
        add_biases(&dir.join("model.safetensors"));
    }
    dir
}

/// bias[i] = (((7 i + 3 l + 5 p) % 11) - 5) / 100 for projection p of layer l (see
/// fixtures/eval_reference.py), stored as F32.
fn add_biases(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut biases: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for layer in 0.. {
        let mut found = false;
        for (p, proj) in PROJECTIONS.iter().enumerate() {
            let Ok(w) = st.tensor(&format!("model.layers.{layer}.{proj}.weight")) else {
                continue;
            };
            assert_eq!(w.dtype(), Dtype::F32);
            found = true;
            let n = w.shape()[0];
            let data: Vec<u8> = (0..n)
                .flat_map(|i| {
                    let k = ((7 * i + 3 * layer + 5 * p) % 11) as f64 - 5.0;
                    ((k / 100.0) as f32).to_le_bytes()
                })
                .collect();
            biases.push((format!("model.layers.{layer}.{proj}.bias"), data, n));
        }
        if !found {
            break;
        }
    }
    let mut tensors: Vec<(String, TensorView)> = st.tensors();
    for (name, data, n) in &biases {
        tensors.push((
            name.clone(),
            TensorView::new(Dtype::F32, vec![*n], data).unwrap(),
        ));
    }
    let out = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn perplexity_matches_the_numpy_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let text_sha = surgery_convert::digest::hex(&sha2_digest(&std::fs::read(TEXT).unwrap()));
    let mut checked = 0;
    for fixture_name in FIXTURES {
        let path = fixture("eval").join(format!("{fixture_name}.json"));
        let reference: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            reference["text_sha256"],
            Value::from(text_sha.clone()),
            "{path:?} is stale"
        );
        for case in reference["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let overrides = &case["overrides"];
            let bias = case["bias"].as_bool().unwrap();
            let bos = case["bos"].as_bool().unwrap();
            let dir = if overrides.as_object().unwrap().is_empty() && !bias && !bos {
                fixture(fixture_name)
            } else {
                variant(tmp.path(), fixture_name, name, overrides, bias)
            };
            if bos {
                add_bos_template(&dir);
            }
            let opts: Vec<String> = ["tokens", "ctx", "offset"]
                .iter()
                .flat_map(|k| [format!("--{k}"), case[*k].to_string()])
                .collect();
            let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
            let got = eval(&dir, &opts);
            let label = format!("{fixture_name} {name}");
            assert_eq!(got["windows"], case["windows"], "{label}");
            assert_eq!(got["tokens"], case["count"], "{label}: tokens scored");
            assert_eq!(got["offset"], case["offset"], "{label}");
            assert_eq!(got["ctx"], case["ctx"], "{label}");
            assert_eq!(got["text_sha256"], reference["text_sha256"], "{label}");
            let want_bos = bos.then(|| {
                serde_json::json!({"token": "<s>", "id": 1,
                "source": "tokenizer.json post_processor"})
            });
            assert_eq!(got["bos"], want_bos.unwrap_or(Value::Null), "{label}");
            let (ppl, want_ppl) = (num(&got, "perplexity"), num(case, "perplexity"));
            assert!(
                ((ppl - want_ppl) / want_ppl).abs() <= PPL_RTOL,
                "{label}: perplexity {ppl} vs reference {want_ppl}"
            );
            let (nll, want_nll) = (num(&got, "nll_mean"), num(case, "nll_mean"));
            assert!(
                (nll - want_nll).abs() <= NLL_ATOL,
                "{label}: mean NLL {nll} vs reference {want_nll}"
            );
            assert!(
                (ppl - nll.exp()).abs() <= 1e-9 * ppl,
                "{label}: ppl = exp(nll)"
            );
            checked += 1;
        }
    }
    // 4 cases and the BOS case per fixture, plus the bias case on tiny-f32-gqa.
    assert_eq!(checked, 16);
}

fn sha2_digest(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

fn text_ids(model: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(TEXT).unwrap();
    TextTokenizer::load(model).unwrap().encode(&text).unwrap()
}

#[test]
fn layer_wise_windows_are_independent() {
    // 140 tokens in windows of 50: 50, 50 and a shorter 40. Running them together must equal
    // running each window alone, and must differ from one 140-token window.
    let dir = fixture("tiny-bf16-sharded");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let llama = Llama::new(&checkpoint).unwrap();
    let ids = &text_ids(&dir)[5..145];
    let (together, count) = negative_log_likelihood(&llama, ids, 50, |_| {}).unwrap();
    assert_eq!(count, 49 + 49 + 39);
    let mut alone = 0.0;
    for chunk in ids.chunks(50) {
        let (nll, n) = negative_log_likelihood(&llama, chunk, chunk.len(), |_| {}).unwrap();
        assert_eq!(n, chunk.len() - 1);
        alone += nll;
    }
    assert!(
        ((together - alone) / alone).abs() < 1e-6,
        "windows together {together} vs alone {alone}"
    );
    let (one, n) = negative_log_likelihood(&llama, ids, 140, |_| {}).unwrap();
    assert_eq!(n, 139);
    assert!(((one / 139.0) - (together / 137.0)).abs() > 1e-4);

    // The layer-wise API by hand: attention_input is input_layernorm of the hidden states.
    let h = llama.embed(&ids[..3]).unwrap();
    let layer = llama.layer(0).unwrap();
    let x = layer.attention_input(h.as_ref());
    let row: Vec<f64> = (0..h.ncols()).map(|j| h[(1, j)] as f64).collect();
    let rms = (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + 1e-5).sqrt();
    for (j, v) in row.iter().enumerate() {
        let want = layer.input_layernorm[j] as f64 * v / rms;
        assert!((x[(1, j)] as f64 - want).abs() < 1e-5, "col {j}");
    }
    assert!(llama.layer(3).is_err());
    assert!(llama.embed(&[9999]).is_err());
}

fn convert(input: &str, out: &Path, args: &[&str]) {
    let mut all = vec!["--in", input, "--out", out.to_str().unwrap(), "--quiet"];
    all.extend_from_slice(args);
    run_ok(&all);
}

#[test]
fn factored_checkpoints_score_like_their_dense_twins() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ["--tokens", "300", "--ctx", "64"];
    let original = num(&eval(&fixture("tiny-f32-gqa"), &opts), "nll_mean");
    // Shared K/V with a factored query; K and V factored separately (V by rank).
    for (label, args) in [
        ("shared", &["--shared-kv", "0.5", "--q", "0.9"][..]),
        ("separate", &["--k", "0.5", "--v", "rank:3"][..]),
    ] {
        let dense = tmp.path().join(format!("{label}-dense"));
        let factored = tmp.path().join(format!("{label}-factored"));
        convert("fixtures/tiny-f32-gqa", &dense, args);
        convert(
            "fixtures/tiny-f32-gqa",
            &factored,
            &[args, &["--emit", "factored"]].concat(),
        );
        let d = num(&eval(&dense, &opts), "nll_mean");
        let f = num(&eval(&factored, &opts), "nll_mean");
        // F32 factors: b @ a equals the dense reconstruction to ~1e-7 relative.
        assert!((d - f).abs() < 1e-6, "{label}: dense {d} vs factored {f}");
        assert!(
            (d - original).abs() > 1e-5,
            "{label}: the surgery did not change the model ({d} vs {original})"
        );
    }
}

#[test]
fn bad_input_fails_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let no_tokenizer = tmp.path().join("no-tokenizer");
    copy_dir(&fixture("tiny-tied"), &no_tokenizer);
    std::fs::remove_file(no_tokenizer.join("tokenizer.json")).unwrap();
    let no_tokenizer = no_tokenizer.to_str().unwrap().to_string();
    let no_bias = variant(
        tmp.path(),
        "tiny-f32-gqa",
        "no-bias",
        &serde_json::json!({"attention_bias": true}),
        false,
    );
    let no_bias = no_bias.to_str().unwrap().to_string();
    let yarn = variant(
        tmp.path(),
        "tiny-f32-gqa",
        "yarn",
        &serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        false,
    );
    let yarn = yarn.to_str().unwrap().to_string();
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["eval", &no_tokenizer, "--text", TEXT],
            1,
            &["no-tokenizer/tokenizer.json", "not found"],
        ),
        (
            &[
                "eval",
                "fixtures/tiny-tied",
                "--text",
                "fixtures/eval/missing.txt",
            ],
            2,
            &["--text", "fixtures/eval/missing.txt"],
        ),
        (
            &[
                "eval",
                "fixtures/tiny-tied",
                "--text",
                TEXT,
                "--offset",
                "1400",
                "--ctx",
                "512",
            ],
            2,
            &["--offset", "1500 tokens", "100 remain", "--ctx 512"],
        ),
        (
            &[
                "eval",
                "fixtures/tiny-tied",
                "--text",
                TEXT,
                "--tokens",
                "100",
                "--ctx",
                "128",
            ],
            2,
            &["--tokens", "--ctx 128"],
        ),
        (
            &["eval", "fixtures/tiny-tied", "--text", TEXT, "--ctx", "0"],
            2,
            &["--ctx"],
        ),
        (
            &["eval", &no_bias, "--text", TEXT],
            1,
            &["model.layers.0.self_attn.o_proj.bias", "missing"],
        ),
        (
            &["eval", &yarn, "--text", TEXT],
            1,
            &["config.json", "rope type `yarn` is not supported"],
        ),
        (
            &["eval", "fixtures/no-such-model", "--text", TEXT],
            1,
            &["fixtures/no-such-model"],
        ),
    ];
    for (args, code, expect) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("surgery-convert: error: "), "{stderr}");
        for e in *expect {
            assert!(stderr.contains(e), "{args:?}: `{e}` not in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
