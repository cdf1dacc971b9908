//! Every tensor's shape and every factored input checked by the real binary: a copied tensor of
//! the wrong shape (MLP, `o_proj`, a norm, the embedding, the head) and a Phi-3 `qkv_proj` that does
//! not fit the head counts are refused when the checkpoint is opened; non-finite values are named
//! by the tensor the file holds (a fused Phi-3 tensor, a factor of a factored checkpoint, in
//! `eval`, `expand` and `sweep`); `verify` opens the checkpoint as the commands do (a factored one's
//! groups, ranks and shapes); a `format_version` of the wrong type is called so. Each refusal is
//! one line, exit 1, no output left behind, the input unchanged.

mod common;

use common::*;
use safetensors::tensor::TensorView;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fixture every case starts from: hidden 64, 4 heads and 2 KV heads of 16, MLP 128, vocabulary
/// 256, two layers, F32, one file.
const FIXTURE: &str = "tiny-f32-gqa";
const TEXT: &str = "fixtures/eval/text.txt";
const PREFIX: &str = "surgery-convert: error: ";

/// A copy of the fixture in `tmp/name`.
fn input(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    copy_dir(&fixture(FIXTURE), &dir);
    dir
}

/// The weight file of `dir` holding `tensor`.
fn file_holding(dir: &Path, tensor: &str) -> PathBuf {
    entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .map(|n| dir.join(n))
        .find(|p| {
            let bytes = std::fs::read(p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            st.names().contains(&tensor)
        })
        .unwrap_or_else(|| panic!("no file of {} holds {tensor}", dir.display()))
}

/// Rewrites the one-file checkpoint `file` with `edit` applied to its tensors.
fn rewrite(file: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let mut tensors: BTreeMap<String, Tensor> = {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| {
                let t = Tensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                };
                (name, t)
            })
            .collect()
    };
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// An F32 tensor of zeros.
fn zeros(shape: &[usize]) -> Tensor {
    Tensor {
        dtype: safetensors::Dtype::F32,
        shape: shape.to_vec(),
        bytes: vec![0; shape.iter().product::<usize>() * 4],
    }
}

/// Edits `dir`'s `config.json`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// Runs `args`, which must fail with exit 1 and one line starting [`PREFIX`] holding every
/// needle, leaving `input` as it was and `out` (when given) absent; returns the line.
fn refused(args: &[&str], needles: &[&str], input: &Path, out: Option<&Path>) -> String {
    let before = read_files(input);
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
    assert!(stderr.starts_with(PREFIX), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` missing: {stderr}"
        );
    }
    assert!(o.stdout.is_empty(), "{args:?}: printed {:?}", o.stdout);
    assert!(read_files(input) == before, "{args:?}: the input changed");
    if let Some(out) = out {
        assert!(!out.exists(), "{args:?}: {} left behind", out.display());
        let parent = out.parent().unwrap();
        assert!(
            !entries(parent).iter().any(|n| n.contains("surgery-tmp")),
            "{args:?}: a staging directory left behind"
        );
    }
    stderr.trim_end().to_string()
}

/// `convert --in DIR --out OUT --shared-kv 0.3`, refused with `needles`.
fn convert_refused(dir: &Path, needles: &[&str]) -> String {
    let out = dir.with_extension("out");
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    refused(
        &["--in", d, "--out", o, "--shared-kv", "0.3"],
        needles,
        dir,
        Some(&out),
    )
}

#[test]
fn a_copied_tensor_of_the_wrong_shape_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (name, wrong, want)) in [
        (
            "model.layers.1.mlp.gate_proj.weight",
            [128, 32].as_slice(),
            "[128, 64]",
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            &[64, 32],
            "[64, 64]",
        ),
        (
            "model.layers.1.mlp.down_proj.weight",
            &[128, 64],
            "[64, 128]",
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            &[32],
            "[64]",
        ),
        ("model.embed_tokens.weight", &[255, 64], "[256, 64]"),
        ("lm_head.weight", &[256, 32], "[256, 64]"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = input(tmp.path(), &format!("case{i}"));
        let file = dir.join("model.safetensors");
        rewrite(&file, |t| {
            t.insert(name.to_string(), zeros(wrong));
        });
        let expect = format!(
            "{PREFIX}{}: tensor `{name}`: shape {wrong:?} disagrees with config.json, which implies {want}",
            file.display()
        );
        let line = convert_refused(&dir, &[]);
        assert_eq!(line, expect);
        // eval reads the same shapes from the same source.
        let eval = refused(
            &["eval", dir.to_str().unwrap(), "--text", TEXT],
            &[],
            &dir,
            None,
        );
        assert_eq!(eval, expect);
    }
}

/// The fixture as Phi-3 stores it (q/k/v in `qkv_proj`, gate/up in `gate_up_proj`).
fn phi3(tmp: &Path, name: &str) -> PathBuf {
    let dir = input(tmp, name);
    rewrite(&dir.join("model.safetensors"), |tensors| {
        for layer in 0..2 {
            for (fused, parts) in [
                (
                    "self_attn.qkv_proj",
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].as_slice(),
                ),
                ("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"]),
            ] {
                let name = |part: &str| format!("model.layers.{layer}.{part}.weight");
                let mut joined = zeros(&[0, 64]);
                for part in parts {
                    let t = tensors.remove(&name(part)).unwrap();
                    joined.shape[0] += t.shape[0];
                    joined.bytes.extend_from_slice(&t.bytes);
                }
                tensors.insert(name(fused), joined);
            }
        }
    });
    edit_config(&dir, |c| {
        c["architectures"] = json!(["Phi3ForCausalLM"]);
        c["model_type"] = json!("phi3");
    });
    dir
}

#[test]
fn a_phi3_qkv_proj_that_does_not_fit_the_heads_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = phi3(tmp.path(), "intact");
    let out = tmp.path().join("intact-out");
    run_ok(&[
        "--in",
        ok.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
        "--quiet",
    ]);

    // Rows that sum right but a width other than hidden_size.
    let dir = phi3(tmp.path(), "width");
    let qkv = "model.layers.1.self_attn.qkv_proj.weight";
    rewrite(&dir.join("model.safetensors"), |t| {
        t.insert(qkv.to_string(), zeros(&[128, 63]));
    });
    convert_refused(
        &dir,
        &[&format!(
            "tensor `{qkv}`: shape [128, 63] disagrees with config.json, which implies [128, 64]"
        )],
    );

    // Head counts whose q + k + v rows make the same total (6 heads and 1 KV head of 16: 96 + 16
    // + 16 = 128) split the tensor differently; the checkpoint's o_proj, made for 64 query rows,
    // says it was not made for these heads.
    let dir = phi3(tmp.path(), "heads");
    edit_config(&dir, |c| {
        c["num_attention_heads"] = json!(6);
        c["num_key_value_heads"] = json!(1);
        c["head_dim"] = json!(16);
    });
    convert_refused(
        &dir,
        &["tensor `model.layers.0.self_attn.o_proj.weight`: shape [64, 64] disagrees with config.json, which implies [64, 96]"],
    );
}

#[test]
fn a_phi3_nan_is_named_by_the_fused_tensor_the_file_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = phi3(tmp.path(), "nan");
    let qkv = "model.layers.1.self_attn.qkv_proj.weight";
    rewrite(&dir.join("model.safetensors"), |t| {
        let t = t.get_mut(qkv).unwrap();
        // Row 64 is the first of k_proj (q_proj holds 4 heads x 16 rows).
        let at = 64 * 64 * 4 + 8;
        t.bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let line = convert_refused(
        &dir,
        &[&format!("tensor `{qkv}`: rows 64..96 (its k_proj part): layer 1: 1 non-finite values (NaN or infinite)")],
    );
    assert!(!line.contains("k_proj.weight"), "{line}");
}

/// A factored conversion of the fixture (`--shared-kv 0.3 --emit factored`) in `tmp/name`.
fn factored(tmp: &Path, name: &str) -> PathBuf {
    let out = tmp.join(name);
    run_ok(&[
        "--in",
        &fixture(FIXTURE).to_string_lossy(),
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.3",
        "--emit",
        "factored",
        "--quiet",
    ]);
    out
}

#[test]
fn a_non_finite_factor_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = factored(tmp.path(), "factored");
    let factor = "model.layers.1.self_attn.kv_a_proj.weight";
    let file = file_holding(&dir, factor);
    rewrite(&file, |t| {
        let t = t.get_mut(factor).unwrap();
        t.bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        t.bytes[12..16].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let d = dir.to_str().unwrap();
    let named = format!(
        "{}: tensor `{factor}`: layer 1: 2 non-finite values (NaN or infinite)",
        file.display()
    );
    let line = refused(&["eval", d, "--text", TEXT], &[&named], &dir, None);
    assert!(
        line.ends_with("the attention projections must be finite to be evaluated"),
        "{line}"
    );
    let out = tmp.path().join("expanded");
    let line = refused(
        &["expand", d, "--out", out.to_str().unwrap()],
        &[&named],
        &dir,
        Some(&out),
    );
    assert!(
        line.ends_with("a factor to expand must be finite"),
        "{line}"
    );
    // sweep refuses a factored input before reading a weight; expanded, it would be refused as
    // above.
    let out = tmp.path().join("sweep");
    refused(
        &[
            "sweep",
            "--in",
            d,
            "--text",
            TEXT,
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.5",
        ],
        &["config.json", "a factored checkpoint", "expand"],
        &dir,
        Some(&out),
    );
}

#[test]
fn sweep_and_eval_name_a_non_finite_dense_projection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = input(tmp.path(), "dense");
    let q = "model.layers.1.self_attn.q_proj.weight";
    let file = dir.join("model.safetensors");
    rewrite(&file, |t| {
        t.get_mut(q).unwrap().bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let named = format!(
        "{}: tensor `{q}`: layer 1: 1 non-finite values (NaN or infinite)",
        file.display()
    );
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("sweep");
    let o = out.to_str().unwrap();
    let sweep = [
        "sweep",
        "--in",
        d,
        "--text",
        TEXT,
        "--out",
        o,
        "--shared-kv",
        "0.5",
    ];
    refused(&sweep, &[&named], &dir, Some(&out));
    refused(&["eval", d, "--text", TEXT], &[&named], &dir, None);
}

/// Writes `dir`'s `SHA256SUMS` afresh, as `sha256sum` would (every other file, sorted).
fn regenerate_sums(dir: &Path) {
    let sums: String = read_files(dir)
        .into_iter()
        .filter(|(name, _)| name != "SHA256SUMS")
        .map(|(name, bytes)| format!("{}  {name}\n", surgery_convert::digest::sha256_hex(&bytes)))
        .collect();
    std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
}

#[test]
fn verify_opens_a_factored_checkpoint_as_expand_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = factored(tmp.path(), "factored");
    let d = dir.to_str().unwrap();
    run_ok(&["verify", d]);
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let widths = config["latent_attention"]["kv_rank"].clone();
    let width = widths[1].as_u64().unwrap();
    for (edit, needles) in [
        (
            json!({"kv_rank": [1]}),
            vec!["config.json: latent_attention: kv_rank must list 2 positive integers".to_string()],
        ),
        (
            json!({"format_version": 2, "kv_share": "basis", "kv_groups": [[1], [0]]}),
            vec!["config.json: latent_attention: kv_groups must list runs of consecutive layers".to_string()],
        ),
        (
            json!({"kv_rank": [widths[0], width + 1]}),
            // The layer's factors are checked in the layout's order: the down-projection first.
            vec![format!(
                "tensor `model.layers.1.self_attn.kv_a_proj.weight`: shape [{width}, 64] disagrees with config.json, which implies [{}, 64]",
                width + 1
            )],
        ),
    ] {
        let case = tmp.path().join("case");
        if case.exists() {
            std::fs::remove_dir_all(&case).unwrap();
        }
        copy_dir(&dir, &case);
        edit_config(&case, |c| {
            for (k, v) in edit.as_object().unwrap() {
                c["latent_attention"][k] = v.clone();
            }
        });
        regenerate_sums(&case);
        let sums = std::process::Command::new("sha256sum")
            .args(["-c", "--quiet", "SHA256SUMS"])
            .current_dir(&case)
            .status();
        if let Ok(status) = sums {
            assert!(status.success(), "SHA256SUMS regenerated in sha256sum's format");
        }
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        refused(&["verify", case.to_str().unwrap()], &needles, &case, None);
        // expand refuses it the same way.
        let out = tmp.path().join("expanded");
        let line = refused(&["expand", case.to_str().unwrap(), "--out", out.to_str().unwrap()], &needles, &case, Some(&out));
        assert!(!line.is_empty());
    }
}

#[test]
fn a_format_version_of_the_wrong_type_is_called_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = factored(tmp.path(), "factored");
    for (value, shown) in [(json!("1"), "\"1\""), (json!(1.0), "1.0")] {
        edit_config(&dir, |c| {
            c["latent_attention"]["format_version"] = value.clone()
        });
        let out = tmp.path().join("expanded");
        let line = refused(
            &[
                "expand",
                dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
            &dir,
            Some(&out),
        );
        assert_eq!(
            line,
            format!(
                "{PREFIX}{}: latent_attention: format_version has the wrong type (expected an integer), found {shown}",
                dir.join("config.json").display()
            )
        );
        refused(
            &["eval", dir.to_str().unwrap(), "--text", TEXT],
            &["format_version has the wrong type"],
            &dir,
            None,
        );
    }
}
