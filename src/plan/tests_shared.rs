//! The planner with cross-layer sharing on the tiny two-layer checkpoint: one group for both
//! layers' K/V, its factored layout (one down-projection, every layer's up-projections) and the
//! version-2 description.

use super::*;
use crate::model::arch::Role;
use crate::model::latent::FORMAT_VERSION;
use crate::model::layout::CONFIG_FILE;
use crate::test_support::{self as tiny, index, open_tiny, HIDDEN, KV_DIM};
use serde_json::{json, Value};
use std::num::NonZeroUsize;

fn shared(share: Share) -> Surgery {
    Surgery {
        q: Some(Spec::Rank(2)),
        k: None,
        v: None,
        shared_kv: Some(Spec::Rank(3)),
        fit: Fit::Act,
        sharing: Some(LayerSharing {
            layers: NonZeroUsize::new(2).unwrap(),
            share,
        }),
        compensate: None,
    }
}

#[test]
fn adjacent_layers_merge_into_one_kv_group() {
    let (_dir, ck) = open_tiny(Dtype::F32, false);
    let all = groups(&ck, &shared(Share::Latent));
    let kinds: Vec<(GroupKind, usize, usize)> =
        all.iter().map(|g| (g.kind, g.layer, g.layers)).collect();
    assert_eq!(
        kinds,
        [
            (GroupKind::Q, 0, 1),
            (GroupKind::SharedKv, 0, 2),
            (GroupKind::Q, 1, 1)
        ]
    );
    let kv = &all[1];
    let members: Vec<usize> = [
        (0, Role::Key),
        (0, Role::Value),
        (1, Role::Key),
        (1, Role::Value),
    ]
    .into_iter()
    .map(|(l, r)| index(&ck, l, r))
    .collect();
    assert_eq!(
        kv.members, members,
        "every layer's k_proj, v_proj in layer order"
    );
    assert_eq!((kv.share, all[0].share), (Some(Share::Latent), None));
    assert_eq!(kv.cross_pairs(), [(1, 0)]);
    assert_eq!(kv.spanned_layers(), [0, 1]);
    let basis = groups(&ck, &shared(Share::Basis));
    assert!(
        basis[1].cross_pairs().is_empty(),
        "a basis needs no cross moments"
    );
}

#[test]
fn factored_plan_holds_one_down_projection_per_group() {
    let (_dir, ck) = open_tiny(Dtype::F32, false);
    let all = groups(&ck, &shared(Share::Latent));
    let layout = Layout::Factored {
        latents: vec![2, 3, 2],
    };
    let plan = plan(&ck, all, &layout, None).unwrap();
    let find = |name: String| {
        plan.shards
            .iter()
            .flat_map(|s| &s.tensors)
            .find(|t| t.name == name)
            .map(|t| (t.shape.clone(), t.op.clone()))
    };
    let name = |l: usize, f: Factor| tiny::layer_name(l, Role::Factor(f));
    assert_eq!(
        find(name(0, Factor::KvDown)),
        Some((vec![3, HIDDEN], Op::Computed { group: 1, piece: 0 }))
    );
    assert_eq!(find(name(1, Factor::KvDown)), None);
    for (layer, piece) in [(0, 1), (1, 3)] {
        assert_eq!(
            find(name(layer, Factor::KUp)),
            Some((vec![KV_DIM, 3], Op::Computed { group: 1, piece }))
        );
        assert_eq!(
            find(name(layer, Factor::VUp)),
            Some((
                vec![KV_DIM, 3],
                Op::Computed {
                    group: 1,
                    piece: piece + 1
                }
            ))
        );
    }
    let FileSource::Generated { bytes, .. } = &plan
        .files
        .iter()
        .find(|f| f.relative == Path::new(CONFIG_FILE))
        .unwrap()
        .source
    else {
        panic!("config.json is generated")
    };
    let config: Value = serde_json::from_slice(bytes).unwrap();
    let l = &config["latent_attention"];
    assert_eq!(l["format_version"], json!(FORMAT_VERSION));
    assert_eq!(l["kv_share"], json!("latent"));
    assert_eq!(l["kv_groups"], json!([[0, 1]]));
    assert_eq!(l["kv_rank"], json!([3, 3]));
    assert_eq!(l["q_rank"], json!([2, 2]));
}
