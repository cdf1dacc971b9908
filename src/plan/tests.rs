//! The planner on a tiny checkpoint written to a temporary directory (`crate::test_support`).

use super::*;
use crate::error::Error;
use crate::model::arch::{AttentionProjection, Role};
use crate::model::latent;
use crate::model::layout::{shard_file_name, CONFIG_FILE, SINGLE_FILE};
use crate::test_support::{self as tiny, open_factored, open_tiny, RawTensor, Widths};
use crate::test_support::{HIDDEN, KV_DIM, Q_DIM};
use serde_json::{json, Value};

fn surgery(q: Option<Spec>, shared_kv: Option<Spec>, k: Option<Spec>, v: Option<Spec>) -> Surgery {
    Surgery {
        q,
        k,
        v,
        shared_kv,
        fit: Fit::Pca,
        sharing: None,
        compensate: None,
    }
}

/// `--q 0.9 --shared-kv 0.5`.
fn q_and_shared_kv() -> Surgery {
    surgery(
        Some(Spec::Threshold(0.9)),
        Some(Spec::Threshold(0.5)),
        None,
        None,
    )
}

fn names(shard: &ShardPlan) -> Vec<&str> {
    shard.tensors.iter().map(|t| t.name.as_str()).collect()
}

fn find<'p>(plan: &'p Plan, name: &str) -> (&'p ShardPlan, &'p TensorPlan) {
    plan.shards
        .iter()
        .find_map(|s| s.tensors.iter().find(|t| t.name == name).map(|t| (s, t)))
        .unwrap_or_else(|| panic!("{name} is not in the plan"))
}

fn files(plan: &Plan) -> Vec<(String, bool)> {
    plan.files
        .iter()
        .map(|f| {
            let generated = matches!(f.source, FileSource::Generated { .. });
            (f.relative.display().to_string(), generated)
        })
        .collect()
}

fn generated_json(plan: &Plan, relative: &str) -> Value {
    let file = plan
        .files
        .iter()
        .find(|f| f.relative == Path::new(relative))
        .unwrap();
    let FileSource::Generated { bytes, .. } = &file.source else {
        panic!("{relative} is not generated")
    };
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn dense_plan_keeps_every_tensor_in_its_shard() {
    for (dtype, sharded) in [(Dtype::F32, false), (Dtype::BF16, true)] {
        let (_dir, ck) = open_tiny(dtype, sharded);
        let groups = groups(&ck, &q_and_shared_kv());
        let plan = plan(&ck, groups, &Layout::Dense, None).unwrap();
        assert_eq!(plan.emit, Emit::Dense);
        assert_eq!(plan.groups.len(), 2 * tiny::LAYERS);
        let input_shards: Vec<&str> = ck.shards.iter().map(|s| s.file_name.as_str()).collect();
        let output_shards: Vec<&str> = plan.shards.iter().map(|s| s.file_name.as_str()).collect();
        assert_eq!(output_shards, input_shards);
        assert_eq!(plan.write_index, sharded);
        assert_eq!(
            plan.data_len(),
            ck.tensors.iter().map(|t| t.range.len() as u64).sum::<u64>()
        );

        let mut seen = vec![0; ck.tensors.len()];
        for (s, shard) in plan.shards.iter().enumerate() {
            assert_eq!(shard.metadata.get("format").map(String::as_str), Some("pt"));
            let mut sorted = names(shard);
            sorted.sort();
            assert_eq!(names(shard), sorted, "one dtype: tensors in name order");
            for t in &shard.tensors {
                let input = ck.tensor_index(&t.name).unwrap();
                seen[input] += 1;
                let entry = &ck.tensors[input];
                assert_eq!(entry.shard, s, "{} stays in its shard", t.name);
                assert_eq!(
                    (t.dtype, &t.shape, t.byte_len),
                    (entry.dtype, &entry.shape, entry.range.len())
                );
                match (entry.class.role, t.op.clone()) {
                    (Role::Query | Role::Key | Role::Value, Op::Computed { group, piece }) => {
                        let g = &plan.groups[group];
                        assert_eq!(g.members[piece], input, "{}", t.name);
                        assert_eq!(Some(g.layer), entry.class.layer);
                        let kind = match entry.class.role {
                            Role::Query => GroupKind::Q,
                            _ => GroupKind::SharedKv,
                        };
                        assert_eq!(g.kind, kind);
                    }
                    (_, Op::Copy { tensor }) => assert_eq!(tensor, input, "{}", t.name),
                    (role, op) => panic!("{}: {role:?} planned as {op:?}", t.name),
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "every input tensor once");
        let weight_map = plan.weight_map();
        assert_eq!(weight_map.len(), ck.tensors.len());
        for t in &ck.tensors {
            assert_eq!(weight_map[t.name.as_str()], ck.shards[t.shard].file_name);
        }
        let expected = vec![
            (CONFIG_FILE.to_string(), false),
            (tiny::EXTRA_FILE.to_string(), false),
        ];
        assert_eq!(files(&plan), expected);
        let copied: Vec<&Path> = plan.copied_files().collect();
        assert_eq!(
            copied,
            [Path::new(CONFIG_FILE), Path::new(tiny::EXTRA_FILE)]
        );
    }
}

#[test]
fn without_groups_the_dense_plan_copies_everything() {
    let (_dir, ck) = open_tiny(Dtype::F32, false);
    let plan = plan(&ck, Vec::new(), &Layout::Dense, None).unwrap();
    let tensors: Vec<&TensorPlan> = plan.shards.iter().flat_map(|s| &s.tensors).collect();
    assert_eq!(tensors.len(), ck.tensors.len());
    assert!(tensors.iter().all(|t| matches!(t.op, Op::Copy { .. })));
}

#[test]
fn factored_plan_writes_down_and_up_projections() {
    let (_dir, ck) = open_tiny(Dtype::F32, true);
    let groups = groups(&ck, &q_and_shared_kv());
    // Per layer: q, then shared K/V.
    let latents = vec![3, 2, 4, 5];
    let plan = plan(
        &ck,
        groups,
        &Layout::Factored {
            latents: latents.clone(),
        },
        None,
    )
    .unwrap();
    assert_eq!(plan.emit, Emit::Factored);
    assert!(plan.write_index);
    for layer in 0..tiny::LAYERS {
        for role in [Role::Query, Role::Key, Role::Value] {
            let name = tiny::layer_name(layer, role);
            assert!(!plan.weight_map().contains_key(name.as_str()), "{name}");
        }
        let (q, kv) = (latents[2 * layer], latents[2 * layer + 1]);
        let (qg, kvg) = (2 * layer, 2 * layer + 1);
        for (factor, shape, group, piece) in [
            (Factor::QDown, [q, HIDDEN], qg, 0),
            (Factor::QUp, [Q_DIM, q], qg, 1),
            (Factor::KvDown, [kv, HIDDEN], kvg, 0),
            (Factor::KUp, [KV_DIM, kv], kvg, 1),
            (Factor::VUp, [KV_DIM, kv], kvg, 2),
        ] {
            let name = tiny::layer_name(layer, Role::Factor(factor));
            let (_, t) = find(&plan, &name);
            assert_eq!(t.shape, shape, "{name}");
            assert_eq!(t.byte_len, shape[0] * shape[1] * 4, "{name}");
            assert_eq!(t.dtype, Dtype::F32);
            assert_eq!(t.op, Op::Computed { group, piece }, "{name}");
        }
    }
    // Each factor lives with the member it comes from: layer 1's K/V latent and k_b_proj with
    // k_proj in the first shard, v_b_proj with v_proj in the second.
    let second = shard_file_name(1, 2);
    for (factor, shard) in [
        (Factor::KvDown, shard_file_name(0, 2)),
        (Factor::KUp, shard_file_name(0, 2)),
        (Factor::VUp, second.clone()),
        (Factor::QDown, shard_file_name(0, 2)),
    ] {
        let (s, _) = find(&plan, &tiny::layer_name(1, Role::Factor(factor)));
        assert_eq!(s.file_name, shard, "{factor:?}");
    }
    let expected = vec![
        (CONFIG_FILE.to_string(), true),
        (tiny::EXTRA_FILE.to_string(), false),
        (latent::MODULE_FILE.to_string(), true),
    ];
    assert_eq!(files(&plan), expected);
    let module = plan
        .files
        .iter()
        .find(|f| f.relative == Path::new(latent::MODULE_FILE))
        .unwrap();
    assert!(matches!(
        &module.source,
        FileSource::Generated { bytes, .. } if bytes == latent::MODULE_SOURCE.as_bytes()
    ));
    let config = generated_json(&plan, CONFIG_FILE);
    assert_eq!(
        config["architectures"],
        json!([crate::model::arch::LLAMA.factored.class_name])
    );
    assert_eq!(config["hidden_size"], json!(HIDDEN));
    let l = &config["latent_attention"];
    assert_eq!(l["fit"], json!("pca"));
    assert_eq!(l["kv"], json!("shared"));
    assert_eq!(l["q_rank"], json!([3, 4]));
    assert_eq!(l["kv_rank"], json!([2, 5]));
    assert_eq!(l["k_rank"], Value::Null);
    assert_eq!(l["original_architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(l["original_model_type"], json!("llama"));
}

#[test]
fn factored_plan_of_separate_k_and_v() {
    let (_dir, ck) = open_tiny(Dtype::BF16, false);
    let s = surgery(None, None, Some(Spec::Rank(2)), Some(Spec::Rank(3)));
    let groups = groups(&ck, &s);
    let kinds: Vec<GroupKind> = groups.iter().map(|g| g.kind).collect();
    assert_eq!(
        kinds,
        [GroupKind::K, GroupKind::V, GroupKind::K, GroupKind::V]
    );
    let layout = Layout::Factored {
        latents: vec![3, 4, 2, 1],
    };
    let plan = plan(&ck, groups, &layout, None).unwrap();
    assert!(!plan.write_index);
    let (_, q) = find(&plan, &tiny::layer_name(0, Role::Query));
    assert!(matches!(q.op, Op::Copy { .. }));
    for (layer, factor, shape, op) in [
        (0, Factor::KDown, [3, HIDDEN], (0, 0)),
        (0, Factor::KUp, [KV_DIM, 3], (0, 1)),
        (0, Factor::VDown, [4, HIDDEN], (1, 0)),
        (0, Factor::VUp, [KV_DIM, 4], (1, 1)),
        (1, Factor::KUp, [KV_DIM, 2], (2, 1)),
        (1, Factor::VDown, [1, HIDDEN], (3, 0)),
    ] {
        let (_, t) = find(&plan, &tiny::layer_name(layer, Role::Factor(factor)));
        assert_eq!(t.shape, shape);
        assert_eq!(t.byte_len, shape[0] * shape[1] * 2);
        let (group, piece) = op;
        assert_eq!(t.op, Op::Computed { group, piece });
    }
    let l = generated_json(&plan, CONFIG_FILE)["latent_attention"].clone();
    assert_eq!(l["kv"], json!("separate"));
    assert_eq!(l["k_rank"], json!([3, 2]));
    assert_eq!(l["v_rank"], json!([4, 1]));
    assert_eq!(l["q_rank"], Value::Null);
    assert_eq!(l["kv_rank"], Value::Null);
}

#[test]
fn factored_plan_refuses_attention_biases() {
    let dir = tempfile::tempdir().unwrap();
    let bias = tiny::layer_name(1, Role::AttentionBias(AttentionProjection::Query));
    let mut tensors: Vec<RawTensor> = tiny::dense_shapes()
        .into_iter()
        .map(|(name, shape)| RawTensor::generated(&name, Dtype::F32, shape))
        .collect();
    tensors.push(RawTensor::generated(&bias, Dtype::F32, vec![Q_DIM]));
    tiny::write_checkpoint(dir.path(), &tiny::json_bytes(&tiny::config()), &[tensors]);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let s = surgery(Some(Spec::Rank(2)), None, None, None);
    let latents = vec![3; tiny::LAYERS];
    let err = plan(&ck, groups(&ck, &s), &Layout::Factored { latents }, None).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&bias) && text.contains("--emit factored"),
        "{text}"
    );
    // The dense form copies the bias.
    let dense = plan(&ck, groups(&ck, &s), &Layout::Dense, None).unwrap();
    assert!(matches!(find(&dense, &bias).1.op, Op::Copy { .. }));
}

/// The tiny model's tensor names in model order: the embedding, the layers (each in name order),
/// then the rest in name order.
fn model_order() -> Vec<String> {
    let mut names: Vec<String> = tiny::dense_shapes().into_iter().map(|(n, _)| n).collect();
    let embed = names.remove(0);
    let mut layers: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("model.layers."))
        .cloned()
        .collect();
    layers.sort(); // fewer than ten layers: name order is layer order
    let mut rest: Vec<String> = names
        .into_iter()
        .filter(|n| !n.starts_with("model.layers."))
        .collect();
    rest.sort();
    std::iter::once(embed).chain(layers).chain(rest).collect()
}

#[test]
fn max_shard_size_reshards_in_model_order() {
    for sharded in [false, true] {
        let (_dir, ck) = open_tiny(Dtype::F32, sharded);
        let max = 1024u64;
        let plan = plan(
            &ck,
            groups(&ck, &q_and_shared_kv()),
            &Layout::Dense,
            Some(max),
        )
        .unwrap();
        // The greedy packing of the model order.
        let mut bins: Vec<(u64, Vec<String>)> = Vec::new();
        for name in model_order() {
            let len = ck.tensor(&name).unwrap().range.len() as u64;
            match bins.last_mut() {
                Some((used, bin)) if *used + len <= max => {
                    *used += len;
                    bin.push(name);
                }
                _ => bins.push((len, vec![name])),
            }
        }
        assert!(bins.len() > 2);
        assert_eq!(plan.shards.len(), bins.len());
        assert!(plan.write_index);
        for (k, (shard, (used, bin))) in plan.shards.iter().zip(&bins).enumerate() {
            assert_eq!(shard.file_name, shard_file_name(k, bins.len()));
            assert_eq!(shard.data_len(), *used);
            assert!(shard.data_len() <= max || shard.tensors.len() == 1);
            let mut expected: Vec<&str> = bin.iter().map(String::as_str).collect();
            expected.sort();
            assert_eq!(names(shard), expected);
            let metadata: Vec<(&str, &str)> = shard
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(metadata, [("format", "pt")]);
        }
    }
}

#[test]
fn max_shard_size_bounds_of_one_file_and_one_tensor_per_file() {
    let (_dir, ck) = open_tiny(Dtype::BF16, true);
    let one = plan(&ck, Vec::new(), &Layout::Dense, Some(u64::MAX)).unwrap();
    assert_eq!(one.shards.len(), 1);
    assert_eq!(one.shards[0].file_name, SINGLE_FILE);
    assert!(!one.write_index, "a single output file needs no index");
    assert_eq!(one.shards[0].tensors.len(), ck.tensors.len());

    let each = plan(&ck, Vec::new(), &Layout::Dense, Some(1)).unwrap();
    let n = ck.tensors.len();
    assert_eq!(each.shards.len(), n);
    let order: Vec<&str> = each
        .shards
        .iter()
        .map(|s| s.tensors[0].name.as_str())
        .collect();
    assert_eq!(order, model_order());
    assert_eq!(each.shards[n - 1].file_name, shard_file_name(n - 1, n));
}

#[test]
fn plan_expand_multiplies_shared_factors_back() {
    let widths = Widths {
        q: Some(vec![3, 2]),
        kv: Some(vec![2, 3]),
        ..Widths::default()
    };
    let (_dir, ck) = open_factored(&widths);
    let l = ck.config.latent.clone().unwrap();
    let plan = plan_expand(&ck, &l).unwrap();
    assert_eq!(plan.emit, Emit::Dense);
    assert!(plan.groups.is_empty());
    assert!(!plan.write_index);
    assert_eq!(plan.shards.len(), 1);
    let mut planned: Vec<&str> = names(&plan.shards[0]);
    let mut dense: Vec<String> = tiny::dense_shapes().into_iter().map(|(n, _)| n).collect();
    planned.sort();
    dense.sort();
    assert_eq!(planned, dense, "every dense name once, no factor left");
    for layer in 0..tiny::LAYERS {
        let f = |factor| tiny::index(&ck, layer, Role::Factor(factor));
        for (role, rows, down, up) in [
            (Role::Query, Q_DIM, f(Factor::QDown), f(Factor::QUp)),
            (Role::Key, KV_DIM, f(Factor::KvDown), f(Factor::KUp)),
            (Role::Value, KV_DIM, f(Factor::KvDown), f(Factor::VUp)),
        ] {
            let (_, t) = find(&plan, &tiny::layer_name(layer, role));
            assert_eq!(t.op, Op::Expand { down, up });
            assert_eq!(t.shape, [rows, HIDDEN]);
            assert_eq!(t.byte_len, rows * HIDDEN * 4);
        }
    }
    let (_, o) = find(&plan, &tiny::layer_name(0, Role::Output));
    assert!(matches!(o.op, Op::Copy { tensor } if ck.tensors[tensor].name == o.name));
    // config.json restored, the module dropped.
    let expected = vec![
        (CONFIG_FILE.to_string(), true),
        (tiny::EXTRA_FILE.to_string(), false),
    ];
    assert_eq!(files(&plan), expected);
    let config = generated_json(&plan, CONFIG_FILE);
    assert_eq!(
        config,
        tiny::config(),
        "the original config (key order aside)"
    );
}

#[test]
fn plan_expand_of_separate_factors_keeps_dense_projections() {
    let widths = Widths {
        k: Some(vec![2, 1]),
        v: Some(vec![3, 2]),
        ..Widths::default()
    };
    let (_dir, ck) = open_factored(&widths);
    let plan = plan_expand(&ck, ck.config.latent.as_ref().unwrap()).unwrap();
    for layer in 0..tiny::LAYERS {
        let f = |factor| Some(tiny::index(&ck, layer, Role::Factor(factor)));
        for (role, down, up) in [
            (Role::Key, f(Factor::KDown), f(Factor::KUp)),
            (Role::Value, f(Factor::VDown), f(Factor::VUp)),
            (Role::Query, None, None),
        ] {
            let (_, t) = find(&plan, &tiny::layer_name(layer, role));
            let expected = match (down, up) {
                (Some(down), Some(up)) => Op::Expand { down, up },
                _ => Op::Copy {
                    tensor: tiny::index(&ck, layer, role),
                },
            };
            assert_eq!(t.op, expected);
        }
    }
}

#[test]
fn groups_follow_the_surgery() {
    let (_dir, ck) = open_tiny(Dtype::F32, false);
    let rank = Some(Spec::Rank(2));
    let cases = [
        (surgery(None, rank, None, None), vec![GroupKind::SharedKv]),
        (
            surgery(None, None, rank, rank),
            vec![GroupKind::K, GroupKind::V],
        ),
        (surgery(rank, None, None, None), vec![GroupKind::Q]),
        (
            surgery(rank, rank, None, None),
            vec![GroupKind::Q, GroupKind::SharedKv],
        ),
        (surgery(None, None, None, rank), vec![GroupKind::V]),
        (surgery(None, None, None, None), vec![]),
    ];
    for (s, per_layer) in cases {
        let groups = groups(&ck, &s);
        assert_eq!(groups.len(), per_layer.len() * tiny::LAYERS, "{s:?}");
        for (i, g) in groups.iter().enumerate() {
            let (layer, kind) = (i / per_layer.len(), per_layer[i % per_layer.len()]);
            assert_eq!((g.layer, g.kind), (layer, kind), "{s:?}");
            let roles: &[Role] = match kind {
                GroupKind::Q => &[Role::Query],
                GroupKind::K => &[Role::Key],
                GroupKind::V => &[Role::Value],
                GroupKind::SharedKv => &[Role::Key, Role::Value],
            };
            let members: Vec<usize> = roles.iter().map(|&r| tiny::index(&ck, layer, r)).collect();
            assert_eq!(g.members, members);
            assert_eq!(g.spec, Spec::Rank(2));
            assert_eq!(g.resolved_rank, None);
            assert_eq!(g.fit, Fit::Pca);
        }
    }
}

#[test]
fn effective_spec_resolves_budgets_and_thresholds() {
    let (budget, threshold) = (Spec::Budget(0.5), Spec::Threshold(0.9));
    for (spec, resolved_rank, effective) in [
        (budget, Some(3), Spec::Rank(3)),
        (budget, None, budget),
        (threshold, None, threshold),
        (threshold, Some(3), Spec::Rank(3)),
        (Spec::Rank(4), None, Spec::Rank(4)),
    ] {
        let group = GroupPlan {
            layers: 1,
            share: None,
            layer: 0,
            kind: GroupKind::Q,
            spec,
            resolved_rank,
            fit: Fit::Pca,
            members: vec![0],
            compensate: None,
        };
        assert_eq!(
            group.effective_spec(),
            effective,
            "{spec} {resolved_rank:?}"
        );
    }
}

#[test]
fn group_kinds_and_forms_are_named() {
    use GroupKind::{SharedKv, K, Q, V};
    let kv_factors = (Factor::KvDown, &[Factor::KUp, Factor::VUp][..]);
    assert_eq!(SharedKv.factors(), kv_factors);
    assert_eq!(Q.factors(), (Factor::QDown, &[Factor::QUp][..]));
    let names: Vec<&str> = [Q, K, V, SharedKv].iter().map(|k| k.name()).collect();
    assert_eq!(names, ["q", "k", "v", "shared_kv"]);
    assert_eq!(
        [Emit::Dense.name(), Emit::Factored.name()],
        ["dense", "factored"]
    );
}

#[test]
fn describe_lists_every_tensor_and_file() {
    let (dir, ck) = open_tiny(Dtype::BF16, true);
    let dense = plan(&ck, groups(&ck, &q_and_shared_kv()), &Layout::Dense, None).unwrap();
    let lines = dense.describe(&ck);
    assert_eq!(lines.len(), ck.tensors.len() + 1 + 2);
    let first = shard_file_name(0, 2);
    let q = tiny::layer_name(0, Role::Query);
    let k = tiny::layer_name(0, Role::Key);
    let embed = tiny::global_name(Role::Embedding);
    for line in [
        format!("{first}  {q}  BF16 [8, 8]  q 0.9 fit=pca"),
        format!("{first}  {k}  BF16 [4, 8]  shared_kv 0.5 fit=pca"),
        format!("{first}  {embed}  BF16 [16, 8]  copy"),
        "model.safetensors.index.json  (index of 2 shards)".to_string(),
        format!(
            "config.json  copied from {}",
            dir.path().join(CONFIG_FILE).display()
        ),
    ] {
        assert!(lines.contains(&line), "{line:?} not in {lines:#?}");
    }

    let s = surgery(Some(Spec::Rank(3)), None, None, None);
    let factored = Layout::Factored {
        latents: vec![4, 4],
    };
    let lines = plan(&ck, groups(&ck, &s), &factored, None)
        .unwrap()
        .describe(&ck);
    let down = tiny::layer_name(0, Role::Factor(Factor::QDown));
    let up = tiny::layer_name(0, Role::Factor(Factor::QUp));
    let config_len = lines
        .iter()
        .find_map(|l| l.strip_prefix("config.json  config.json rewritten for the factored form (latent_attention, auto_map) ("))
        .unwrap_or_else(|| panic!("no generated config in {lines:#?}"));
    assert!(config_len.ends_with(" bytes)"), "{config_len}");
    for line in [
        format!("{first}  {down}  BF16 [4, 8]  q rank:3 fit=pca down-projection"),
        format!("{first}  {up}  BF16 [8, 4]  q rank:3 fit=pca up-projection"),
        format!(
            "{}  the transformers module that loads the factored form ({} bytes)",
            latent::MODULE_FILE,
            latent::MODULE_SOURCE.len()
        ),
    ] {
        assert!(lines.contains(&line), "{line:?} not in {lines:#?}");
    }

    let widths = Widths {
        q: Some(vec![3, 2]),
        ..Widths::default()
    };
    let (_fdir, fck) = open_factored(&widths);
    let lines = plan_expand(&fck, fck.config.latent.as_ref().unwrap())
        .unwrap()
        .describe(&fck);
    let line = format!("{SINGLE_FILE}  {q}  F32 [8, 8]  expand {up} @ {down}");
    assert!(lines.contains(&line), "{line:?} not in {lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l
                .starts_with("config.json  config.json restored to the original architecture ("))
    );
}
