//! From output tensors to output files: each tensor's sort key and home shard, the assignment to
//! shards (the input's, or new ones of a bounded size), the order inside a file, and the input's
//! other files carried over.

use super::{Emit, FileSource, GroupPlan, OutputFile, Plan, ShardPlan, TensorPlan};
use crate::input::checkpoint::Checkpoint;
use crate::model::latent;
use crate::model::layout::shard_file_name;
use std::path::Path;

/// An output tensor before sharding: where it would live without re-sharding, and its sort key.
pub(super) struct Placed {
    pub(super) tensor: TensorPlan,
    /// Index of the input shard it belongs with.
    pub(super) home: usize,
    /// Model order: embeddings, layers by number, the rest.
    pub(super) key: (u8, usize, String),
}

fn order_key(checkpoint: &Checkpoint, input: usize, name: &str) -> (u8, usize, String) {
    let t = &checkpoint.tensors[input];
    match t.class.layer {
        Some(layer) => (1, layer, name.to_string()),
        None if name.contains("embed") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

/// `tensor`, placed with input tensor `input` (its shard, its place in model order).
pub(super) fn placed(checkpoint: &Checkpoint, input: usize, tensor: TensorPlan) -> Placed {
    Placed {
        key: order_key(checkpoint, input, &tensor.name),
        home: checkpoint.tensors[input].shard,
        tensor,
    }
}

/// Assigns output tensors to shards (the input's, or new ones of at most `max_shard_size`) and adds
/// the input's other files as copies, except those in `generated`.
pub(super) fn assemble(
    checkpoint: &Checkpoint,
    emit: Emit,
    groups: Vec<GroupPlan>,
    out: Vec<Placed>,
    generated: Vec<OutputFile>,
    max_shard_size: Option<u64>,
) -> Plan {
    let assigned = match max_shard_size {
        None => by_input_shard(checkpoint, out),
        Some(max) => resharded(checkpoint, out, max),
    };
    let shards: Vec<ShardPlan> = assigned.into_iter().map(in_file_order).collect();
    let write_index = match max_shard_size {
        None => checkpoint.indexed,
        Some(_) => shards.len() > 1,
    };
    Plan {
        emit,
        shards,
        groups,
        write_index,
        files: other_files(checkpoint, generated),
    }
}

/// One output shard per input shard, same names and metadata, each tensor in its home shard.
fn by_input_shard(checkpoint: &Checkpoint, out: Vec<Placed>) -> Vec<ShardPlan> {
    let mut bins: Vec<Vec<TensorPlan>> = vec![Vec::new(); checkpoint.shards.len()];
    for p in out {
        if let Some(bin) = bins.get_mut(p.home) {
            bin.push(p.tensor);
        }
    }
    checkpoint
        .shards
        .iter()
        .zip(bins)
        .map(|(shard, tensors)| ShardPlan {
            file_name: shard.file_name.clone(),
            metadata: shard.metadata.clone(),
            tensors,
        })
        .collect()
}

/// New shards in model order, each filled while it stays within `max` bytes (a tensor larger than
/// `max` gets a shard of its own), named as Hugging Face names them, with the first input shard's
/// metadata.
fn resharded(checkpoint: &Checkpoint, mut out: Vec<Placed>, max: u64) -> Vec<ShardPlan> {
    out.sort_by(|a, b| a.key.cmp(&b.key));
    let mut bins: Vec<Vec<TensorPlan>> = Vec::new();
    let mut current = 0u64;
    for p in out {
        let len = p.tensor.byte_len as u64;
        match bins.last_mut() {
            Some(bin) if current + len <= max => {
                bin.push(p.tensor);
                current += len;
            }
            _ => {
                bins.push(vec![p.tensor]);
                current = len;
            }
        }
    }
    let n = bins.len();
    let metadata = checkpoint
        .shards
        .first()
        .map(|s| s.metadata.clone())
        .unwrap_or_default();
    bins.into_iter()
        .enumerate()
        .map(|(k, tensors)| ShardPlan {
            file_name: shard_file_name(k, n),
            metadata: metadata.clone(),
            tensors,
        })
        .collect()
}

/// The shard as written: `format` metadata defaulted to `pt`, tensors by descending dtype
/// alignment, then name (the order the safetensors library itself writes).
fn in_file_order(mut shard: ShardPlan) -> ShardPlan {
    shard
        .metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    shard
        .tensors
        .sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    shard
}

/// The input's other files as copies (except the loading module and those `generated` replaces),
/// plus `generated`, sorted by path.
fn other_files(checkpoint: &Checkpoint, generated: Vec<OutputFile>) -> Vec<OutputFile> {
    let replaced = |relative: &Path| {
        [latent::MODULE_FILE, latent::FAMILY_MODULE_FILE]
            .iter()
            .any(|m| relative == Path::new(m))
            || generated.iter().any(|g| g.relative == relative)
    };
    let mut files: Vec<OutputFile> = checkpoint
        .other_files
        .iter()
        .filter(|relative| !replaced(relative))
        .map(|relative| OutputFile {
            relative: relative.clone(),
            source: FileSource::Copy,
        })
        .collect();
    files.extend(generated);
    files.sort_by(|a, b| a.relative.cmp(&b.relative));
    files
}
