//! The pure planning stage: from an opened checkpoint and the surgery options, decide every output
//! tensor (name, dtype, shape, shard, operation) and every copied file before a byte is written.
//! `--dry-run` prints this plan; the executor and the writer only consume it.

use crate::arch::Role;
use crate::checkpoint::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use crate::decompose::Fit;
use crate::spec::Spec;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Which projections to rewrite, and how. Built from the command line by `options`.
#[derive(Debug, Clone, PartialEq)]
pub struct Surgery {
    /// Per-matrix fit of `q_proj`.
    pub q: Option<Spec>,
    /// Per-matrix fit of `k_proj` (exclusive with `shared_kv`).
    pub k: Option<Spec>,
    /// Per-matrix fit of `v_proj` (exclusive with `shared_kv`).
    pub v: Option<Spec>,
    /// One fit of the stacked `[k_proj; v_proj]`.
    pub shared_kv: Option<Spec>,
    /// The reconstruction used for every fit.
    pub fit: Fit,
}

/// What a decomposition group fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKind {
    /// `q_proj` alone.
    Q,
    /// `k_proj` alone.
    K,
    /// `v_proj` alone.
    V,
    /// `k_proj` and `v_proj` stacked.
    SharedKv,
}

impl GroupKind {
    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Q => "q",
            GroupKind::K => "k",
            GroupKind::V => "v",
            GroupKind::SharedKv => "shared_kv",
        }
    }
}

/// One decomposition: the tensors stacked (in row order) and fitted together.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// The layer.
    pub layer: usize,
    /// What is fitted.
    pub kind: GroupKind,
    /// How many components to keep.
    pub spec: Spec,
    /// The reconstruction.
    pub fit: Fit,
    /// Indices into [`Checkpoint::tensors`], stacked in this order.
    pub members: Vec<usize>,
}

/// How an output tensor's bytes are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Copied byte for byte from input tensor `tensor`.
    Copy {
        /// Index into [`Checkpoint::tensors`].
        tensor: usize,
    },
    /// Member `member` of group `group`'s reconstruction.
    Reconstruct {
        /// Index into [`Plan::groups`].
        group: usize,
        /// Position in the group's members.
        member: usize,
    },
}

/// One output tensor.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Hugging Face name (unchanged from the input).
    pub name: String,
    /// Storage type (unchanged).
    pub dtype: Dtype,
    /// Shape (unchanged).
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub byte_len: usize,
    /// How to produce it.
    pub op: Op,
}

/// One output safetensors file, tensors in the order they are written.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// File name in the output directory.
    pub file_name: String,
    /// Header `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Tensors in file order: by descending dtype alignment, then name (the order the safetensors
    /// library itself writes).
    pub tensors: Vec<TensorPlan>,
}

impl ShardPlan {
    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len as u64).sum()
    }
}

/// A non-weight file copied unchanged.
#[derive(Debug, Clone)]
pub struct FileCopy {
    /// Path relative to both the input and the output directory.
    pub relative: PathBuf,
}

/// Everything the executor and writer will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Output weight files.
    pub shards: Vec<ShardPlan>,
    /// Decompositions, in layer order.
    pub groups: Vec<GroupPlan>,
    /// Whether to write `model.safetensors.index.json`.
    pub write_index: bool,
    /// Files copied unchanged.
    pub copies: Vec<FileCopy>,
}

impl Plan {
    /// Total bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.shards.iter().map(ShardPlan::data_len).sum()
    }

    /// The index's `weight_map`: tensor name to shard file.
    pub fn weight_map(&self) -> BTreeMap<&str, &str> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.tensors
                    .iter()
                    .map(move |t| (t.name.as_str(), s.file_name.as_str()))
            })
            .collect()
    }

    /// Human-readable lines, one per output tensor and copied file (for `--dry-run`).
    pub fn describe(&self, checkpoint: &Checkpoint) -> Vec<String> {
        let mut lines = Vec::new();
        for shard in &self.shards {
            for t in &shard.tensors {
                let op = match t.op {
                    Op::Copy { .. } => "copy".to_string(),
                    Op::Reconstruct { group, .. } => {
                        let g = &self.groups[group];
                        format!("{} {} fit={}", g.kind.name(), g.spec, g.fit.name())
                    }
                };
                lines.push(format!(
                    "{}  {}  {:?} {:?}  {}",
                    shard.file_name, t.name, t.dtype, t.shape, op
                ));
            }
        }
        if self.write_index {
            lines.push(format!(
                "{INDEX_FILE}  (index of {} shards)",
                self.shards.len()
            ));
        }
        for c in &self.copies {
            lines.push(format!(
                "{}  copied from {}",
                c.relative.display(),
                checkpoint.dir.join(&c.relative).display()
            ));
        }
        lines
    }
}

/// Sort key placing tensors in model order: embeddings, layers by number, then the rest.
fn model_order_key(checkpoint: &Checkpoint, index: usize) -> (u8, usize, &str) {
    let t = &checkpoint.tensors[index];
    match t.class.layer {
        Some(layer) => (1, layer, t.name.as_str()),
        None if t.name.contains("embed") => (0, 0, t.name.as_str()),
        None => (2, 0, t.name.as_str()),
    }
}

/// Builds the plan. `max_shard_size` re-shards; otherwise each input shard maps to an output shard of
/// the same name.
pub fn plan(checkpoint: &Checkpoint, surgery: &Surgery, max_shard_size: Option<u64>) -> Plan {
    let arch = checkpoint.config.arch;
    let mut groups = Vec::new();
    let mut op_of: BTreeMap<usize, Op> = BTreeMap::new();
    let index_of = |layer: usize, role: Role| {
        arch.layer_tensor_name(layer, role)
            .and_then(|n| checkpoint.tensor_index(&n))
    };
    for layer in 0..checkpoint.config.num_layers {
        let mut add = |kind: GroupKind, spec: Option<Spec>, roles: &[Role]| {
            let Some(spec) = spec else { return };
            let members: Vec<usize> = roles.iter().filter_map(|&r| index_of(layer, r)).collect();
            if members.len() != roles.len() {
                return; // unreachable: Checkpoint::open checked every projection exists
            }
            for (member, &tensor) in members.iter().enumerate() {
                op_of.insert(
                    tensor,
                    Op::Reconstruct {
                        group: groups.len(),
                        member,
                    },
                );
            }
            groups.push(GroupPlan {
                layer,
                kind,
                spec,
                fit: surgery.fit,
                members,
            });
        };
        add(GroupKind::Q, surgery.q, &[Role::Query]);
        add(
            GroupKind::SharedKv,
            surgery.shared_kv,
            &[Role::Key, Role::Value],
        );
        add(GroupKind::K, surgery.k, &[Role::Key]);
        add(GroupKind::V, surgery.v, &[Role::Value]);
    }

    let tensor_plan = |index: usize| {
        let t = &checkpoint.tensors[index];
        TensorPlan {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            byte_len: t.range.len(),
            op: op_of
                .get(&index)
                .copied()
                .unwrap_or(Op::Copy { tensor: index }),
        }
    };

    let assignment: Vec<(String, BTreeMap<String, String>, Vec<usize>)> = match max_shard_size {
        None => checkpoint
            .shards
            .iter()
            .enumerate()
            .map(|(s, shard)| {
                let members = (0..checkpoint.tensors.len())
                    .filter(|&i| checkpoint.tensors[i].shard == s)
                    .collect();
                (shard.file_name.clone(), shard.metadata.clone(), members)
            })
            .collect(),
        Some(max) => {
            let mut order: Vec<usize> = (0..checkpoint.tensors.len()).collect();
            order.sort_by(|&a, &b| {
                model_order_key(checkpoint, a).cmp(&model_order_key(checkpoint, b))
            });
            let mut bins: Vec<Vec<usize>> = Vec::new();
            let mut current = 0u64;
            for i in order {
                let len = checkpoint.tensors[i].range.len() as u64;
                match bins.last_mut() {
                    Some(bin) if current + len <= max => {
                        bin.push(i);
                        current += len;
                    }
                    _ => {
                        bins.push(vec![i]);
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
                .map(|(k, members)| {
                    let name = if n == 1 {
                        SINGLE_FILE.to_string()
                    } else {
                        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                    };
                    (name, metadata.clone(), members)
                })
                .collect()
        }
    };

    let shards: Vec<ShardPlan> = assignment
        .into_iter()
        .map(|(file_name, mut metadata, members)| {
            metadata
                .entry("format".into())
                .or_insert_with(|| "pt".into());
            let mut tensors: Vec<TensorPlan> = members.into_iter().map(tensor_plan).collect();
            tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
            ShardPlan {
                file_name,
                metadata,
                tensors,
            }
        })
        .collect();
    let write_index = match max_shard_size {
        None => checkpoint.indexed,
        Some(_) => shards.len() > 1,
    };
    let copies = checkpoint
        .other_files
        .iter()
        .map(|relative| FileCopy {
            relative: relative.clone(),
        })
        .collect();
    Plan {
        shards,
        groups,
        write_index,
        copies,
    }
}
