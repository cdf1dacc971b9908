//! Unit tests of the checks of [`super::checks`] on tiny checkpoints written here (zeros: only names
//! and shapes matter): every tensor's shape, the tensors every layer needs, where a missing one is
//! reported, and fused tensors (named as stored, indexed by their stored names).

use super::*;
use crate::model::arch::{Role, LLAMA, PHI3};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const HIDDEN: usize = 8;
/// 2 heads of 4.
const Q_DIM: usize = 8;
/// 1 KV head of 4.
const KV_DIM: usize = 4;
const INTERMEDIATE: usize = 16;
const VOCAB: usize = 16;

/// A tensor to write: name and shape (F32 zeros).
type Raw = (String, Vec<usize>);

/// The tiny Llama's `config.json`.
fn config() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_attention_heads": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 1, "tie_word_embeddings": false, "vocab_size": VOCAB})
}

/// The tiny Phi-3 config: the Llama one as `Phi3ForCausalLM`.
fn phi3_config() -> Value {
    let mut config = config();
    config["architectures"] = json!(["Phi3ForCausalLM"]);
    config
}

fn layer_name(layer: usize, role: Role) -> String {
    LLAMA.layer_tensor_name(layer, role).unwrap()
}

fn global_name(role: Role) -> String {
    LLAMA.global_tensor_name(role).unwrap().to_string()
}

/// The tiny Llama's tensors in model order.
fn tiny_tensors() -> Vec<Raw> {
    let mut out = vec![(global_name(Role::Embedding), vec![VOCAB, HIDDEN])];
    for layer in 0..2 {
        for (role, shape) in [
            (Role::Query, vec![Q_DIM, HIDDEN]),
            (Role::Key, vec![KV_DIM, HIDDEN]),
            (Role::Value, vec![KV_DIM, HIDDEN]),
            (Role::Output, vec![HIDDEN, Q_DIM]),
            (Role::MlpGate, vec![INTERMEDIATE, HIDDEN]),
            (Role::MlpUp, vec![INTERMEDIATE, HIDDEN]),
            (Role::MlpDown, vec![HIDDEN, INTERMEDIATE]),
            (Role::InputNorm, vec![HIDDEN]),
            (Role::PostAttentionNorm, vec![HIDDEN]),
        ] {
            out.push((layer_name(layer, role), shape));
        }
    }
    out.push((global_name(Role::FinalNorm), vec![HIDDEN]));
    out.push((global_name(Role::LmHead), vec![VOCAB, HIDDEN]));
    out
}

/// `tensors` as Phi-3 stores them: q/k/v and gate/up stacked in their fused tensor, where the
/// first part was.
fn fused(tensors: Vec<Raw>) -> Vec<Raw> {
    let mut out: Vec<Raw> = Vec::new();
    for (name, shape) in tensors {
        let class = PHI3.classify(&name).unwrap();
        let (Some(layer), Some(fusion)) = (class.layer, PHI3.fusion_of(class.role)) else {
            out.push((name, shape));
            continue;
        };
        let stored = PHI3.layer_tensor_name(layer, Role::Fused(fusion)).unwrap();
        match out.iter_mut().find(|(n, _)| *n == stored) {
            Some((_, s)) => s[0] += shape[0],
            None => out.push((stored, shape)),
        }
    }
    out
}

/// The two shards of a sharded tiny checkpoint: layer 1's v_proj and what follows in the second
/// (so layer 1 straddles the files).
fn split_in_two(mut tensors: Vec<Raw>) -> Vec<Vec<Raw>> {
    let v1 = layer_name(1, Role::Value);
    let at = tensors.iter().position(|(n, _)| *n == v1).unwrap();
    let second = tensors.split_off(at);
    vec![tensors, second]
}

/// Writes `config` and `shards` (one: `model.safetensors`; more: Hugging Face's shard names and
/// an index listing the names as stored) into `dir`.
fn write_checkpoint(dir: &Path, config: &Value, shards: &[Vec<Raw>]) {
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    let mut weight_map = BTreeMap::new();
    for (k, tensors) in shards.iter().enumerate() {
        let file_name = match shards.len() {
            1 => SINGLE_FILE.to_string(),
            n => crate::model::layout::shard_file_name(k, n),
        };
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, shape)| vec![0u8; shape.iter().product::<usize>() * 4])
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&data)
            .map(|((name, shape), bytes)| {
                let view = TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap();
                (name.clone(), view)
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(&file_name), bytes).unwrap();
        for (name, _) in tensors {
            weight_map.insert(name.clone(), file_name.clone());
        }
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }
}

/// The tiny dense checkpoint (one file) with `edit` applied to its tensors and `config` as its
/// `config.json`, opened.
fn open_edited(
    config: &Value,
    edit: impl FnOnce(&mut Vec<Raw>),
) -> (tempfile::TempDir, Result<Checkpoint>) {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = tiny_tensors();
    edit(&mut tensors);
    write_checkpoint(dir.path(), config, &[tensors]);
    let opened = Checkpoint::open(dir.path());
    (dir, opened)
}

/// The shape of tensor `name` replaced by `shape`.
fn reshape(tensors: &mut [Raw], name: &str, shape: Vec<usize>) {
    tensors.iter_mut().find(|(n, _)| n == name).unwrap().1 = shape;
}

/// The path, tensor and message of an [`Error::Tensor`], failing for any other variant.
fn tensor_error(err: Error) -> (PathBuf, String, String) {
    match err {
        Error::Tensor {
            path,
            tensor,
            message,
        } => (path, tensor, message),
        other => panic!("expected Error::Tensor, got {other:?}"),
    }
}

#[test]
fn every_tensor_has_the_shape_config_json_implies() {
    let (_dir, ok) = open_edited(&config(), |_| {});
    assert!(ok.is_ok(), "{ok:?}");
    for (name, wrong, want) in [
        (
            layer_name(1, Role::MlpGate),
            vec![INTERMEDIATE, Q_DIM + 1],
            vec![INTERMEDIATE, HIDDEN],
        ),
        (
            layer_name(0, Role::MlpUp),
            vec![INTERMEDIATE - 1, HIDDEN],
            vec![INTERMEDIATE, HIDDEN],
        ),
        (
            layer_name(1, Role::MlpDown),
            vec![INTERMEDIATE, HIDDEN],
            vec![HIDDEN, INTERMEDIATE],
        ),
        (
            layer_name(0, Role::Output),
            vec![HIDDEN, Q_DIM / 2],
            vec![HIDDEN, Q_DIM],
        ),
        (
            layer_name(1, Role::InputNorm),
            vec![HIDDEN + 1],
            vec![HIDDEN],
        ),
        (
            layer_name(0, Role::PostAttentionNorm),
            vec![1, HIDDEN],
            vec![HIDDEN],
        ),
        (
            global_name(Role::Embedding),
            vec![VOCAB + 1, HIDDEN],
            vec![VOCAB, HIDDEN],
        ),
        (
            global_name(Role::LmHead),
            vec![VOCAB, HIDDEN * 2],
            vec![VOCAB, HIDDEN],
        ),
        (global_name(Role::FinalNorm), vec![VOCAB], vec![HIDDEN]),
    ] {
        let (dir, opened) = open_edited(&config(), |t| reshape(t, &name, wrong.clone()));
        let (path, tensor, message) = tensor_error(opened.unwrap_err());
        assert_eq!(
            (path, tensor, message),
            (
                dir.path().join(SINGLE_FILE),
                name.clone(),
                format!("shape {wrong:?} disagrees with config.json, which implies {want:?}")
            )
        );
    }
}

#[test]
fn sizes_config_json_omits_come_from_the_tensors() {
    let mut config = config();
    let obj = config.as_object_mut().unwrap();
    obj.remove("intermediate_size");
    obj.remove("vocab_size");
    let (_dir, ok) = open_edited(&config, |_| {});
    assert!(ok.is_ok(), "{ok:?}");
    // Without the sizes, the tensors must still agree with each other.
    let (_dir, opened) = open_edited(&config, |t| {
        reshape(
            t,
            &layer_name(1, Role::MlpDown),
            vec![HIDDEN, INTERMEDIATE * 2],
        )
    });
    let (_, _, message) = tensor_error(opened.unwrap_err());
    assert!(
        message.ends_with(&format!("implies {:?}", [HIDDEN, INTERMEDIATE])),
        "{message}"
    );
    let (_dir, opened) = open_edited(&config, |t| {
        reshape(t, &global_name(Role::LmHead), vec![VOCAB * 2, HIDDEN])
    });
    let (_, tensor, _) = tensor_error(opened.unwrap_err());
    assert_eq!(tensor, global_name(Role::LmHead));
}

#[test]
fn every_tensor_a_layer_needs_is_present() {
    let mlp = layer_name(1, Role::MlpUp);
    let (dir, opened) = open_edited(&config(), |t| t.retain(|(n, _)| *n != mlp));
    let (path, tensor, message) = tensor_error(opened.unwrap_err());
    assert_eq!(
        (path, tensor, message.as_str()),
        (
            dir.path().join(SINGLE_FILE),
            mlp,
            "missing (every layer needs it)"
        )
    );
    let head = global_name(Role::LmHead);
    let (_dir, opened) = open_edited(&config(), |t| t.retain(|(n, _)| *n != head));
    let (_, tensor, message) = tensor_error(opened.unwrap_err());
    assert_eq!(tensor, head);
    assert!(
        message.contains("tie_word_embeddings is false"),
        "{message}"
    );
    // Tied, the head may be absent.
    let mut tied = config();
    tied["tie_word_embeddings"] = json!(true);
    let (_dir, opened) = open_edited(&tied, |t| t.retain(|(n, _)| *n != head));
    assert!(opened.is_ok(), "{opened:?}");
}

#[test]
fn a_tensor_no_shard_holds_is_named_against_the_index() {
    // Layer 1 straddles the shards (q and k in the first, v in the second): the index, which
    // names every tensor's shard, is the file that lacks it, not the first shard holding layer 1.
    let v1 = layer_name(1, Role::Value);
    let dir = tempfile::tempdir().unwrap();
    let mut shards = split_in_two(tiny_tensors());
    shards[1].retain(|(n, _)| *n != v1);
    write_checkpoint(dir.path(), &config(), &shards);
    let opened = Checkpoint::open(dir.path());
    let (path, tensor, message) = tensor_error(opened.unwrap_err());
    assert_eq!(
        (path, tensor, message.as_str()),
        (
            dir.path().join(INDEX_FILE),
            v1,
            "missing: in no shard, and not listed here (every layer needs q_proj, k_proj and v_proj)"
        )
    );
}

#[test]
fn a_sharded_phi3_checkpoint_opens_its_index_naming_the_fused_tensors() {
    let (_dir, opened) = open_edited(&phi3_config(), |t| {
        *t = fused(std::mem::take(t));
    });
    let ck = opened.unwrap();
    let k1 = ck.tensor(&layer_name(1, Role::Key)).unwrap();
    let qkv1 = "model.layers.1.self_attn.qkv_proj.weight";
    assert_eq!(
        k1.fused,
        Some(FusedPart {
            name: qkv1.to_string(),
            rows: Q_DIM..Q_DIM + KV_DIM
        })
    );
    assert_eq!(k1.stored_name(), qkv1);
    let (path, tensor, message) = tensor_error(k1.error(Path::new("m"), "bad"));
    assert_eq!(
        (path.to_str().unwrap(), tensor.as_str(), message.as_str()),
        ("m", qkv1, "rows 8..12 (its k_proj part): bad")
    );
    // Two shards and an index listing the fused names.
    let dir = tempfile::tempdir().unwrap();
    let mut first = fused(tiny_tensors());
    let second = first.split_off(first.len() / 2);
    write_checkpoint(dir.path(), &phi3_config(), &[first, second]);
    assert!(dir.path().join(INDEX_FILE).is_file());
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert!(ck.indexed);
    assert!(ck.tensor(&layer_name(0, Role::MlpGate)).is_some());
}

#[test]
fn a_phi3_qkv_proj_is_checked_whole_and_split_by_head_counts() {
    let qkv1 = "model.layers.1.self_attn.qkv_proj.weight";
    let rows = Q_DIM + 2 * KV_DIM;
    let (dir, opened) = open_edited(&phi3_config(), |t| {
        *t = fused(std::mem::take(t));
        reshape(t, qkv1, vec![rows, HIDDEN + 1]);
    });
    let (path, tensor, message) = tensor_error(opened.unwrap_err());
    assert_eq!(
        (path, tensor.as_str(), message),
        (
            dir.path().join(SINGLE_FILE),
            qkv1,
            format!("shape [{rows}, 9] disagrees with config.json, which implies [{rows}, 8]")
        )
    );
    // Heads that give the same row total split it differently (6 heads of 2, 1 KV head: q 12,
    // k 2, v 2 rows): the parts take config.json's split, and the copied o_proj, made for 8 query
    // rows, refuses it.
    let mut other_heads = phi3_config();
    other_heads["num_attention_heads"] = json!(6);
    other_heads["head_dim"] = json!(2);
    let (_dir, opened) = open_edited(&other_heads, |t| {
        *t = fused(std::mem::take(t));
    });
    let (_, tensor, message) = tensor_error(opened.unwrap_err());
    assert_eq!(tensor, layer_name(0, Role::Output));
    assert_eq!(
        message,
        "shape [8, 8] disagrees with config.json, which implies [8, 12]"
    );
}
