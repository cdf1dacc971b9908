//! A conversion's layout: every input tensor copied or, in the dense layout, replaced by its
//! group's reconstruction under the same name; the factored layout's factors come from
//! [`super::factored`].

use super::shards::{assemble, placed, Placed};
use super::{copied, factored, fused, Compensate, Emit, GroupPlan, Layout, Op, Plan, TensorPlan};
use crate::error::Result;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use std::collections::BTreeMap;

/// Lays out a conversion's output: the groups' outputs in `layout`, every other tensor copied, the
/// other files copied (for the factored layout, `config.json` rewritten and the loading module
/// added).
pub fn plan(
    checkpoint: &Checkpoint,
    groups: Vec<GroupPlan>,
    layout: &Layout,
    max_shard_size: Option<u64>,
) -> Result<Plan> {
    let moved: Vec<usize> = match layout {
        Layout::Dense => Vec::new(),
        Layout::Factored { .. } => factored::moved_biases(checkpoint, &groups)?
            .into_iter()
            .map(|(index, _, _)| index)
            .collect(),
    };
    let mut out = named_tensors(checkpoint, &groups, layout, &moved);
    let (emit, files) = match layout {
        Layout::Dense => (Emit::Dense, Vec::new()),
        Layout::Factored { latents } => (
            Emit::Factored,
            factored::factor_groups(checkpoint, &groups, latents, &mut out)?,
        ),
    };
    let out = fused::fuse(checkpoint, out)?;
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
/// dense layout, each group member's reconstruction (the factored layout drops the members, and
/// the `moved` biases, which it renames).
fn named_tensors(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    layout: &Layout,
    moved: &[usize],
) -> Vec<Placed> {
    let mut member_of: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        for (m, &tensor) in group.members.iter().enumerate() {
            member_of.insert(tensor, (g, m));
        }
    }
    let compensated = compensated_tensors(checkpoint, groups);
    let mut out: Vec<Placed> = Vec::new();
    for (index, t) in checkpoint.tensors.iter().enumerate() {
        if moved.contains(&index) {
            continue;
        }
        let op = match (member_of.get(&index), layout) {
            (None, _) => match compensated.get(&index) {
                Some(&layer) => Op::Compensated {
                    layer,
                    tensor: index,
                },
                None => Op::Copy { tensor: index },
            },
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

/// The `o_proj` tensors calibration refits (`--compensate o_proj`): those of every layer a group
/// that asks for it spans; by tensor index, with the layer.
pub fn compensated_tensors(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
) -> BTreeMap<usize, usize> {
    let arch = checkpoint.config.arch;
    groups
        .iter()
        .filter(|g| g.compensate == Some(Compensate::OProj))
        .flat_map(GroupPlan::layer_range)
        .filter_map(|layer| {
            arch.layer_tensor_name(layer, Role::Output)
                .and_then(|name| checkpoint.tensor_index(&name))
                .map(|tensor| (tensor, layer))
        })
        .collect()
}
