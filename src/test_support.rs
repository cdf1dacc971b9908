//! Test-only helpers: a tiny Llama checkpoint (2 layers, hidden 8, 2 heads, 1 KV head,
//! intermediate 16, vocab 16) written to a directory as Hugging Face lays one out, dense or
//! factored, in one file or two shards with an index. Values are deterministic (from each tensor's
//! name); names come from the architecture table.

use crate::input::checkpoint::Checkpoint;
use crate::model::arch::{
    AttentionProjection, Factor, Family, Role, GEMMA2, GEMMA3, LLAMA, PHI3, QWEN2, QWEN3,
};
use crate::model::dtype::FloatType;
use crate::model::latent::{self, KvMode, LatentAttention};
use crate::model::layout::{shard_file_name, CONFIG_FILE, INDEX_FILE};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tempfile::TempDir;

/// Layers of the tiny model.
pub const LAYERS: usize = 2;
/// `hidden_size`.
pub const HIDDEN: usize = 8;
/// Rows of `q_proj` (2 heads of 4).
pub const Q_DIM: usize = 8;
/// Rows of `k_proj` and `v_proj` (1 KV head of 4).
pub const KV_DIM: usize = 4;
/// `intermediate_size`.
pub const INTERMEDIATE: usize = 16;
/// `vocab_size`.
pub const VOCAB: usize = 16;
/// A non-weight file every tiny checkpoint carries (copied by every plan).
pub const EXTRA_FILE: &str = "generation_config.json";

/// One tensor as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Hugging Face name.
    pub name: String,
    /// Storage type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian data.
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// A tensor of deterministic values: a hash of the name seeds a generator of uniform values in
    /// [-0.5, 0.5); norms (1-D tensors) are 1 plus a tenth of that.
    pub fn generated(name: &str, dtype: Dtype, shape: Vec<usize>) -> Self {
        let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|_| {
                // splitmix64
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                let u = (z ^ (z >> 31)) as f64 / 2f64.powi(64) - 0.5;
                if shape.len() == 1 {
                    1.0 + u / 10.0
                } else {
                    u
                }
            })
            .collect();
        let ft = FloatType::from_dtype(dtype).expect("a float dtype");
        RawTensor {
            name: name.to_string(),
            dtype,
            bytes: ft.encode(&values),
            shape,
        }
    }
}

/// The tiny model's `config.json`.
pub fn config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 64,
        "model_type": "llama",
        "num_attention_heads": 2,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "vocab_size": VOCAB,
    })
}

/// The name of layer `layer`'s tensor of role `role`.
pub fn layer_name(layer: usize, role: Role) -> String {
    LLAMA
        .layer_tensor_name(layer, role)
        .expect("a per-layer role")
}

/// The name of the global tensor of role `role`.
pub fn global_name(role: Role) -> String {
    LLAMA
        .global_tensor_name(role)
        .expect("a global role")
        .to_string()
}

/// The dense tiny model's tensors (name, shape) in model order: the embedding, each layer (q, k,
/// v, o, MLP, norms), the final norm, the head.
pub fn dense_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![(global_name(Role::Embedding), vec![VOCAB, HIDDEN])];
    for layer in 0..LAYERS {
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

/// The two shards of a sharded tiny checkpoint: the embedding, layer 0 and layer 1's `q_proj` and
/// `k_proj` in the first (so layer 1 straddles the files, its K and V apart), the rest in the
/// second.
pub fn split_in_two(tensors: Vec<RawTensor>) -> Vec<Vec<RawTensor>> {
    let second_from = layer_name(1, Role::Value);
    let at = tensors
        .iter()
        .position(|t| t.name == second_from)
        .expect("layer 1's v_proj");
    let mut first = tensors;
    let second = first.split_off(at);
    vec![first, second]
}

/// Writes a checkpoint into `dir`: `config` as `config.json`, [`EXTRA_FILE`], and `shards` (one:
/// `model.safetensors`; more: Hugging Face's shard names and an index), metadata `format: pt`.
pub fn write_checkpoint(dir: &Path, config: &[u8], shards: &[Vec<RawTensor>]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    std::fs::write(dir.join(EXTRA_FILE), b"{\"do_sample\": false}\n").unwrap();
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (k, tensors) in shards.iter().enumerate() {
        let file_name = shard_file_name(k, n);
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|t| {
                let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
                (t.name.clone(), view)
            })
            .collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata)).unwrap();
        std::fs::write(dir.join(&file_name), bytes).unwrap();
        for t in tensors {
            weight_map.insert(t.name.clone(), file_name.clone());
            total += t.bytes.len();
        }
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }
}

/// `value` as the bytes of a JSON file.
pub fn json_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap()
}

/// Writes the dense tiny checkpoint in `dtype` into `dir` (two shards and an index when
/// `sharded`); returns its shards' tensors as written.
pub fn write_tiny(dir: &Path, dtype: Dtype, sharded: bool) -> Vec<Vec<RawTensor>> {
    let tensors: Vec<RawTensor> = dense_shapes()
        .into_iter()
        .map(|(name, shape)| RawTensor::generated(&name, dtype, shape))
        .collect();
    let shards = if sharded {
        split_in_two(tensors)
    } else {
        vec![tensors]
    };
    write_checkpoint(dir, &json_bytes(&config()), &shards);
    shards
}

/// The tiny model as another family writes it, one F32 file in `dir`: Qwen2 (q/k/v biases),
/// Qwen3 (explicit `head_dim`, `q_norm`/`k_norm`, with `attention_bias` biases on all four
/// projections), Gemma 2 (four norms per layer, `query_pre_attn_scalar`, soft-capping, biases as
/// Qwen3), Gemma 3 (Gemma 2's without soft-capping, plus `q_norm`/`k_norm`). Llama gives
/// [`write_tiny`]'s checkpoint.
pub fn write_tiny_family(dir: &Path, family: Family) {
    let arch = [&LLAMA, &QWEN2, &QWEN3, &GEMMA2, &GEMMA3, &PHI3]
        .into_iter()
        .find(|a| a.kind == family)
        .expect("a table per family");
    let mut config = config();
    config["architectures"] = json!([arch.class_names[0]]);
    config["model_type"] = json!(arch.family);
    let mut tensors: Vec<RawTensor> = dense_shapes()
        .into_iter()
        .map(|(name, shape)| RawTensor::generated(&name, Dtype::F32, shape))
        .collect();
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let mut vectors: Vec<(Role, usize)> = Vec::new();
    if family == Family::Phi3 {
        config["partial_rotary_factor"] = json!(0.5);
        config["sliding_window"] = json!(3);
        write_checkpoint(dir, &json_bytes(&config), &[fused(tensors)]);
        return;
    }
    if family != Family::Llama {
        vectors.extend([
            (Role::AttentionBias(AttentionProjection::Query), Q_DIM),
            (Role::AttentionBias(AttentionProjection::Key), KV_DIM),
            (Role::AttentionBias(AttentionProjection::Value), KV_DIM),
        ]);
    }
    if family != Family::Llama && family != Family::Qwen2 {
        config["head_dim"] = json!(Q_DIM / 2);
        config["attention_bias"] = json!(true);
        vectors.push((Role::AttentionBias(AttentionProjection::Output), HIDDEN));
    }
    if matches!(family, Family::Qwen3 | Family::Gemma3) {
        vectors.extend([(Role::QueryNorm, Q_DIM / 2), (Role::KeyNorm, Q_DIM / 2)]);
    }
    if gemma {
        vectors.extend([
            (Role::PreFeedforwardNorm, HIDDEN),
            (Role::PostFeedforwardNorm, HIDDEN),
        ]);
        config["query_pre_attn_scalar"] = json!(3);
        config["sliding_window"] = json!(3);
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
    }
    if family == Family::Gemma2 {
        config["attn_logit_softcapping"] = json!(0.5);
        config["final_logit_softcapping"] = json!(0.8);
    }
    for layer in 0..LAYERS {
        for &(role, len) in &vectors {
            let name = arch.layer_tensor_name(layer, role).expect("a name");
            tensors.push(RawTensor::generated(&name, Dtype::F32, vec![len]));
        }
    }
    write_checkpoint(dir, &json_bytes(&config), &[tensors]);
}

/// `tensors` with each layer's q/k/v and gate/up stored fused, as Phi-3 stores them (the fused
/// tensor's bytes are its parts', in order, where the first part was).
fn fused(tensors: Vec<RawTensor>) -> Vec<RawTensor> {
    let mut out: Vec<RawTensor> = Vec::new();
    for t in tensors {
        let class = PHI3.classify(&t.name).expect("a Phi-3 name");
        let (Some(layer), Some(fusion)) = (class.layer, PHI3.fusion_of(class.role)) else {
            out.push(t);
            continue;
        };
        let name = PHI3
            .layer_tensor_name(layer, Role::Fused(fusion))
            .expect("a fused name");
        match out.iter_mut().find(|f| f.name == name) {
            Some(f) => {
                f.shape[0] += t.shape[0];
                f.bytes.extend_from_slice(&t.bytes);
            }
            None => out.push(RawTensor { name, ..t }),
        }
    }
    out
}

/// Latent widths of a factored tiny checkpoint, per layer.
#[derive(Debug, Clone, Default)]
pub struct Widths {
    /// The query's, when it is factored.
    pub q: Option<Vec<usize>>,
    /// The shared K/V latent's (exclusive with `k` and `v`).
    pub kv: Option<Vec<usize>>,
    /// K's, when it is factored alone.
    pub k: Option<Vec<usize>>,
    /// V's, when it is factored alone.
    pub v: Option<Vec<usize>>,
}

/// The `latent_attention` description of `widths` (fit `pca`).
pub fn latent_attention(widths: &Widths) -> LatentAttention {
    LatentAttention {
        fit: "pca".into(),
        kv: match (&widths.kv, &widths.k, &widths.v) {
            (Some(_), _, _) => Some(KvMode::Shared),
            (None, None, None) => None,
            _ => Some(KvMode::Separate),
        },
        kv_rank: widths.kv.clone(),
        q_rank: widths.q.clone(),
        k_rank: widths.k.clone(),
        v_rank: widths.v.clone(),
        kv_sharing: None,
        original_architectures: json!(["LlamaForCausalLM"]),
        original_model_type: json!("llama"),
    }
}

/// Writes a factored tiny checkpoint (one file, `dtype`, random factors of `widths`, the loading
/// module beside it) into `dir`; returns its tensors as written.
pub fn write_factored_tiny(dir: &Path, dtype: Dtype, widths: &Widths) -> Vec<RawTensor> {
    let mut tensors = Vec::new();
    for (name, shape) in dense_shapes() {
        let Some(class) = LLAMA.classify(&name) else {
            unreachable!("{name} is in the table")
        };
        let layer = class.layer.unwrap_or(0);
        let width = |w: &Option<Vec<usize>>| w.as_ref().map(|w| w[layer]);
        let factors = match class.role {
            Role::Query => width(&widths.q).map(|w| vec![(Factor::QDown, w), (Factor::QUp, w)]),
            Role::Key => match width(&widths.kv) {
                Some(w) => Some(vec![(Factor::KvDown, w), (Factor::KUp, w)]),
                None => width(&widths.k).map(|w| vec![(Factor::KDown, w), (Factor::KUp, w)]),
            },
            Role::Value => match width(&widths.kv) {
                Some(w) => Some(vec![(Factor::VUp, w)]),
                None => width(&widths.v).map(|w| vec![(Factor::VDown, w), (Factor::VUp, w)]),
            },
            _ => None,
        };
        let Some(factors) = factors else {
            tensors.push(RawTensor::generated(&name, dtype, shape));
            continue;
        };
        for (factor, w) in factors {
            let shape = match factor {
                Factor::QDown | Factor::KvDown | Factor::KDown | Factor::VDown => vec![w, HIDDEN],
                Factor::QUp | Factor::KUp | Factor::VUp => vec![shape[0], w],
            };
            let name = layer_name(layer, Role::Factor(factor));
            tensors.push(RawTensor::generated(&name, dtype, shape));
        }
    }
    let Value::Object(original) = config() else {
        unreachable!("the config is an object")
    };
    let factored = latent::factored_config(&original, &latent_attention(widths), &LLAMA.factored);
    write_checkpoint(dir, &json_bytes(&factored), &[tensors.clone()]);
    std::fs::write(dir.join(latent::MODULE_FILE), latent::MODULE_SOURCE).unwrap();
    tensors
}

/// Writes the dense tiny checkpoint ([`write_tiny`]) into a new temporary directory and opens it.
pub fn open_tiny(dtype: Dtype, sharded: bool) -> (TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), dtype, sharded);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    (dir, checkpoint)
}

/// Writes an F32 factored tiny checkpoint ([`write_factored_tiny`]) into a new temporary
/// directory and opens it.
pub fn open_factored(widths: &Widths) -> (TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    write_factored_tiny(dir.path(), Dtype::F32, widths);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    (dir, checkpoint)
}

/// Index in [`Checkpoint::tensors`] of layer `layer`'s tensor of role `role`.
pub fn index(checkpoint: &Checkpoint, layer: usize, role: Role) -> usize {
    checkpoint.tensor_index(&layer_name(layer, role)).unwrap()
}
