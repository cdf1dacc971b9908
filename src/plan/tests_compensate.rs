//! The planner with `--compensate o_proj` on the tiny two-layer checkpoint: the `o_proj` of every
//! layer a compensating group spans is planned as compensated, under its own name, dtype and
//! shape, in the dense and the factored layout; without it, copied.

use super::*;
use crate::model::arch::Role;
use crate::test_support::{index, open_tiny};

fn surgery(compensate: Option<Compensate>) -> Surgery {
    Surgery {
        q: None,
        k: None,
        v: None,
        shared_kv: Some(Spec::Rank(3)),
        fit: Fit::Act,
        sharing: None,
        compensate,
    }
}

fn o_proj_ops(plan: &Plan) -> Vec<(String, Op, Dtype, Vec<usize>)> {
    plan.shards
        .iter()
        .flat_map(|s| &s.tensors)
        .filter(|t| t.name.ends_with("o_proj.weight"))
        .map(|t| (t.name.clone(), t.op.clone(), t.dtype, t.shape.clone()))
        .collect()
}

#[test]
fn compensated_o_proj_is_planned_in_both_layouts() {
    let (_dir, ck) = open_tiny(Dtype::BF16, false);
    let all = groups(&ck, &surgery(Some(Compensate::OProj)));
    assert!(all.iter().all(|g| g.compensate == Some(Compensate::OProj)));
    let o = |layer| index(&ck, layer, Role::Output);
    for layout in [
        Layout::Dense,
        Layout::Factored {
            latents: vec![3; all.len()],
        },
    ] {
        let p = plan(&ck, all.clone(), &layout, None).unwrap();
        let ops = o_proj_ops(&p);
        assert_eq!(ops.len(), 2, "{layout:?}");
        for (layer, (name, op, dtype, shape)) in ops.into_iter().enumerate() {
            let t = &ck.tensors[o(layer)];
            assert_eq!(name, t.name);
            assert_eq!(
                op,
                Op::Compensated {
                    layer,
                    tensor: o(layer)
                }
            );
            assert_eq!((dtype, shape), (t.dtype, t.shape.clone()));
        }
        assert!(p
            .describe(&ck)
            .iter()
            .any(|l| l.contains("o_proj compensated")));
    }
    let plain = plan(&ck, groups(&ck, &surgery(None)), &Layout::Dense, None).unwrap();
    assert!(o_proj_ops(&plain)
        .iter()
        .all(|(_, op, _, _)| matches!(op, Op::Copy { .. })));
    assert_eq!(
        compensated_tensors(&ck, &groups(&ck, &surgery(Some(Compensate::OProj)))),
        [(o(0), 0), (o(1), 1)].into_iter().collect()
    );
}
