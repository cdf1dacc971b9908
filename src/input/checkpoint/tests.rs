//! Unit tests of the checks [`Checkpoint::open`] runs, each on its own.

use super::*;
use crate::model::arch::Role;
use safetensors::Dtype;
use serde_json::json;

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
const Q1: &str = "model.layers.1.self_attn.q_proj.weight";

/// A two-layer Llama config.
fn config() -> ModelConfig {
    let value = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                       "num_attention_heads": 2, "num_hidden_layers": 2});
    ModelConfig::from_json(&value, Path::new("config.json")).unwrap()
}

fn info(shape: &[usize], data_offsets: (usize, usize)) -> TensorInfo {
    TensorInfo {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data_offsets,
    }
}

/// A scan of shard 1, `b.safetensors`, a 1,000-byte file.
fn scan<'a>(
    config: &'a ModelConfig,
    weight_map: Option<&'a BTreeMap<String, String>>,
) -> ShardScan<'a> {
    ShardScan {
        config,
        weight_map,
        index: 1,
        file_name: "b.safetensors",
        path: Path::new("dir/b.safetensors"),
        len: 1000,
    }
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

/// The path and message of an [`Error::Invalid`], failing for any other variant.
fn invalid_error(err: Error) -> (PathBuf, String) {
    match err {
        Error::Invalid { path, message } => (path, message),
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

/// The message of `scan`'s refusal of the tensor `name` with shape `shape` at `offsets`.
fn entry_refusal(scan: &ShardScan, name: &str, shape: &[usize], offsets: (usize, usize)) -> String {
    let err = scan
        .entry(name.to_string(), info(shape, offsets), 8)
        .unwrap_err();
    let (path, tensor, message) = tensor_error(err);
    assert_eq!((path.as_path(), tensor.as_str()), (scan.path, name));
    message
}

#[test]
fn entry_locates_and_classifies() {
    let config = config();
    let entry = scan(&config, None)
        .entry(Q1.to_string(), info(&[8, 8], (0, 256)), 8)
        .unwrap();
    assert_eq!((entry.shard, entry.range.clone()), (1, 8..264));
    assert_eq!(
        (entry.class.layer, entry.class.role),
        (Some(1), Role::Query)
    );
    assert_eq!(
        (entry.dtype, entry.shape.as_slice()),
        (Dtype::F32, &[8, 8][..])
    );
}

#[test]
fn entry_refusals() {
    let config = config();
    let scan = scan(&config, None);
    let bounds = "data offsets out of bounds";
    assert_eq!(entry_refusal(&scan, Q0, &[8, 8], (0, 993)), bounds);
    assert_eq!(entry_refusal(&scan, Q0, &[8, 8], (0, usize::MAX)), bounds);
    assert_eq!(
        entry_refusal(&scan, Q0, &[0, 8], (0, 0)),
        "shape [0, 8] has no elements (no Llama tensor is empty)"
    );
    assert_eq!(
        entry_refusal(
            &scan,
            "model.layers.0.self_attn.x_proj.weight",
            &[8],
            (0, 32)
        ),
        format!(
            "not a {} tensor name (unmapped tensors are refused)",
            config.arch.family
        )
    );
    assert_eq!(
        entry_refusal(
            &scan,
            "model.layers.2.self_attn.q_proj.weight",
            &[8, 8],
            (0, 256)
        ),
        "layer 2 but config.json has num_hidden_layers = 2"
    );
    // The bounds are checked before the shape, the shape before the name.
    assert_eq!(entry_refusal(&scan, "nonsense", &[0], (0, 993)), bounds);
    assert!(entry_refusal(&scan, "nonsense", &[0], (0, 0)).starts_with("shape [0]"));
}

#[test]
fn entry_checks_the_index() {
    let config = config();
    let map: BTreeMap<String, String> = [
        (Q0.to_string(), "a.safetensors".to_string()),
        (Q1.to_string(), "b.safetensors".to_string()),
    ]
    .into();
    let scan = scan(&config, Some(&map));
    assert!(scan.entry(Q1.into(), info(&[8, 8], (0, 256)), 8).is_ok());
    assert_eq!(
        entry_refusal(&scan, Q0, &[8, 8], (0, 256)),
        "the index places it in a.safetensors"
    );
    assert_eq!(
        entry_refusal(&scan, "model.norm.weight", &[8], (0, 32)),
        "not listed in model.safetensors.index.json"
    );
}

#[test]
fn table_refuses_a_name_in_two_shards() {
    let config = config();
    let header = || Header {
        data_start: 8,
        metadata: BTreeMap::new(),
        tensors: vec![(Q0.to_string(), info(&[8, 8], (0, 256)))],
    };
    let mut first = scan(&config, None);
    first.index = 0;
    first.path = Path::new("dir/a.safetensors");
    let mut table = TensorTable::default();
    table.add_shard(&first, header()).unwrap();
    let err = table.add_shard(&scan(&config, None), header()).unwrap_err();
    assert_eq!(
        tensor_error(err),
        (
            PathBuf::from("dir/b.safetensors"),
            Q0.to_string(),
            "appears twice (in more than one shard, or also inside a fused tensor)".to_string()
        )
    );
    assert_eq!(table.tensors.len(), 1);
}

#[test]
fn table_refuses_too_many_tensors() {
    let config = config();
    let header = Header {
        data_start: 8,
        metadata: BTreeMap::new(),
        tensors: vec![(String::new(), info(&[1], (0, 4))); header::MAX_TENSORS + 1],
    };
    let err = TensorTable::default()
        .add_shard(&scan(&config, None), header)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Safetensors { path, message }
            if path == Path::new("dir/b.safetensors")
                && *message == format!("the checkpoint holds more than {} tensors (the limit)", header::MAX_TENSORS)),
        "{err:?}"
    );
}

#[test]
fn table_refuses_index_entries_without_a_tensor() {
    let config = config();
    let mut table = TensorTable::default();
    let header = Header {
        data_start: 8,
        metadata: BTreeMap::new(),
        tensors: vec![(Q1.to_string(), info(&[8, 8], (0, 256)))],
    };
    table.add_shard(&scan(&config, None), header).unwrap();
    let mut map: BTreeMap<String, String> = [(Q1.to_string(), "b.safetensors".to_string())].into();
    table.check_all_present(Path::new("dir"), &map).unwrap();
    map.insert(Q0.to_string(), "a.safetensors".to_string());
    let err = table.check_all_present(Path::new("dir"), &map).unwrap_err();
    assert_eq!(
        tensor_error(err),
        (
            PathBuf::from("dir/a.safetensors"),
            Q0.to_string(),
            "listed in model.safetensors.index.json but absent from the shard".to_string()
        )
    );
}

#[test]
fn lists_shards() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let root = files::containment_root(dir).unwrap();
    let (path, message) = invalid_error(list_shards(dir, &root).unwrap_err());
    assert_eq!(path, dir);
    assert_eq!(
        message,
        "no model.safetensors or model.safetensors.index.json found (only safetensors checkpoints are supported)"
    );

    std::fs::write(dir.join(SINGLE_FILE), b"").unwrap();
    let list = list_shards(dir, &root).unwrap();
    assert_eq!(list.names, [SINGLE_FILE]);
    assert!(list.weight_map.is_none());

    // The index wins over the single file; every shard it lists must exist.
    let index = json!({"weight_map": {(Q0): "a.safetensors", (Q1): "b.safetensors"}});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    std::fs::write(dir.join("a.safetensors"), b"").unwrap();
    let (path, message) = invalid_error(list_shards(dir, &root).unwrap_err());
    assert_eq!(path, dir.join("b.safetensors"));
    assert_eq!(
        message,
        "shard listed in model.safetensors.index.json is missing"
    );
    std::fs::write(dir.join("b.safetensors"), b"").unwrap();
    let list = list_shards(dir, &root).unwrap();
    assert_eq!(list.names, ["a.safetensors", "b.safetensors"]);
    assert_eq!(list.weight_map.unwrap().len(), 2);
}

#[test]
fn config_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let root = files::containment_root(dir).unwrap();
    let (path, message) = invalid_error(open_config(dir, &root).unwrap_err());
    assert_eq!(path, dir.join(CONFIG_FILE));
    assert_eq!(
        message,
        "not found: a checkpoint directory needs config.json"
    );
}
