//! The first planning step: which matrices each layer fits, and how.

use super::{GroupKind, GroupPlan, Surgery};
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;

/// Picks the matrices to fit, layer by layer: q, shared K/V, k, v as requested.
pub fn groups(checkpoint: &Checkpoint, surgery: &Surgery) -> Vec<GroupPlan> {
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
                kind,
                spec,
                budget_rank: None,
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
    groups
}
