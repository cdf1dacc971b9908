//! The first planning step: which matrices each layer fits, and how; with cross-layer sharing, the
//! shared K/V fits of adjacent layers merge into one group per run of layers.

use super::{GroupKind, GroupPlan, Surgery};
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use std::num::NonZeroUsize;

/// Picks the matrices to fit, layer by layer: q, shared K/V, k, v as requested. With
/// `surgery.sharing`, the shared K/V groups of each run of adjacent layers
/// ([`layer_groups`]) merge into one group whose members are every layer's `k_proj`, `v_proj` in
/// layer order; query groups stay per layer.
pub fn groups(checkpoint: &Checkpoint, surgery: &Surgery) -> Vec<GroupPlan> {
    let per_layer = per_layer_groups(checkpoint, surgery);
    let Some(sharing) = surgery.sharing else {
        return per_layer;
    };
    let runs = layer_groups(checkpoint.config.num_layers, sharing.layers);
    let mut out = Vec::with_capacity(per_layer.len());
    for group in per_layer {
        if group.kind != GroupKind::SharedKv {
            out.push(group);
            continue;
        }
        let Some(run) = runs.iter().find(|r| r.contains(&group.layer)) else {
            continue; // unreachable: the runs cover every layer
        };
        if run.first() == Some(&group.layer) {
            out.push(GroupPlan {
                layers: run.len(),
                share: (run.len() > 1).then_some(sharing.share),
                ..group
            });
        } else if let Some(merged) = out
            .iter_mut()
            .rev()
            .find(|g| g.kind == GroupKind::SharedKv && g.layer_range().contains(&group.layer))
        {
            merged.members.extend(group.members);
        }
    }
    out
}

/// Every layer's own groups.
fn per_layer_groups(checkpoint: &Checkpoint, surgery: &Surgery) -> Vec<GroupPlan> {
    let arch = checkpoint.config.arch;
    let mut groups = Vec::new();
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
            groups.push(GroupPlan {
                layer,
                layers: 1,
                share: None,
                kind,
                spec,
                resolved_rank: None,
                fit: surgery.fit,
                members,
                compensate: surgery.compensate,
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
    groups
}

/// The runs of `size` adjacent layers among `layers` layers (the last may be shorter).
pub fn layer_groups(layers: usize, size: NonZeroUsize) -> Vec<Vec<usize>> {
    (0..layers)
        .collect::<Vec<_>>()
        .chunks(size.get())
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_adjacent_and_the_last_may_be_shorter() {
        let g = |n| layer_groups(5, NonZeroUsize::new(n).unwrap());
        assert_eq!(g(1), vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
        assert_eq!(g(2), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(g(4), vec![vec![0, 1, 2, 3], vec![4]]);
        assert_eq!(g(9), vec![vec![0, 1, 2, 3, 4]]);
    }
}
