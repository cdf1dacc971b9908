//! A conversion's layout: every input tensor copied or, in the dense layout, replaced by its
//! group's reconstruction under the same name; the factored layout's factors come from
//! [`super::factored`].

use super::shards::{assemble, placed, Placed};
use super::{factored, Emit, GroupPlan, Layout, Op, Plan, TensorPlan};
use crate::error::Result;
use crate::input::checkpoint::{Checkpoint, TensorEntry};
use safetensors::Dtype;
use std::collections::BTreeMap;

/// Bytes of a tensor of `dtype` and `shape`.
pub(super) fn byte_len(dtype: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * dtype.bitsize() / 8
}

/// Input tensor `index` (`t`) copied byte for byte under its own name.
pub(super) fn copied(index: usize, t: &TensorEntry) -> TensorPlan {
    TensorPlan {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        byte_len: t.range.len(),
        op: Op::Copy { tensor: index },
    }
}

/// Lays out a conversion's output: the groups' outputs in `layout`, every other tensor copied, the
/// other files copied (for the factored layout, `config.json` rewritten and the loading module
/// added).
pub fn plan(
    checkpoint: &Checkpoint,
    groups: Vec<GroupPlan>,
    layout: &Layout,
    max_shard_size: Option<u64>,
) -> Result<Plan> {
    let mut out = named_tensors(checkpoint, &groups, layout);
    let (emit, files) = match layout {
        Layout::Dense => (Emit::Dense, Vec::new()),
        Layout::Factored { latents } => (
            Emit::Factored,
            factored::factor_groups(checkpoint, &groups, latents, &mut out)?,
        ),
    };
    Ok(assemble(
        checkpoint,
        emit,
        groups,
        out,
        files,
        max_shard_size,
    ))
}

/// The output tensors that keep an input tensor's name, in input order: the copies and, in the
/// dense layout, each group member's reconstruction (the factored layout drops the members).
fn named_tensors(checkpoint: &Checkpoint, groups: &[GroupPlan], layout: &Layout) -> Vec<Placed> {
    let mut member_of: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        for (m, &tensor) in group.members.iter().enumerate() {
            member_of.insert(tensor, (g, m));
        }
    }
    let mut out: Vec<Placed> = Vec::new();
    for (index, t) in checkpoint.tensors.iter().enumerate() {
        let op = match (member_of.get(&index), layout) {
            (None, _) => Op::Copy { tensor: index },
            (Some(&(group, member)), Layout::Dense) => Op::Computed {
                group,
                piece: member,
            },
            (Some(_), Layout::Factored { .. }) => continue,
        };
        let tensor = TensorPlan {
            op,
            ..copied(index, t)
        };
        out.push(placed(checkpoint, index, tensor));
    }
    out
}
