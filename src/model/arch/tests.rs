//! The name tables: every name found by its role, each family's differences.

use super::*;

#[test]
fn classifies_llama_names() {
    let c = LLAMA
        .classify("model.layers.12.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(
        c,
        Classified {
            layer: Some(12),
            role: Role::Key
        }
    );
    let c = LLAMA.classify("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!(c.role, Role::MlpUp);
    assert_eq!(LLAMA.classify("lm_head.weight").unwrap().layer, None);
    assert!(LLAMA
        .classify("model.layers.x.self_attn.k_proj.weight")
        .is_none());
    assert!(LLAMA
        .classify("model.layers.01.self_attn.k_proj.weight")
        .is_none());
    assert!(LLAMA
        .classify("model.layers.0.self_attn.k_proj.scales")
        .is_none());
    assert!(LLAMA
        .classify("transformer.h.0.attn.c_attn.weight")
        .is_none());
}

#[test]
fn names_round_trip() {
    let factors = [
        Factor::QDown,
        Factor::QUp,
        Factor::KvDown,
        Factor::KDown,
        Factor::KUp,
        Factor::VDown,
        Factor::VUp,
    ];
    let roles = [Role::Query, Role::Key, Role::Value]
        .into_iter()
        .chain(factors.into_iter().map(Role::Factor));
    for role in roles {
        let name = LLAMA.layer_tensor_name(3, role).unwrap();
        assert_eq!(
            LLAMA.classify(&name),
            Some(Classified {
                layer: Some(3),
                role
            })
        );
    }
}

#[test]
fn every_name_is_found_by_its_role() {
    for arch in ARCHITECTURES {
        let mut seen = std::collections::BTreeSet::new();
        for (suffix, role) in arch.layer_entries() {
            assert!(seen.insert(role), "{}: {role:?} twice", arch.family);
            let name = arch.layer_tensor_name(7, role).unwrap();
            assert_eq!(name, format!("model.layers.7.{suffix}"));
            assert_eq!(arch.classify(&name).unwrap().role, role);
        }
        for &(name, role) in arch.global_tensors {
            assert_eq!(arch.global_tensor_name(role), Some(name));
            assert_eq!(
                arch.classify(name).unwrap(),
                Classified { layer: None, role }
            );
        }
        assert!(std::ptr::eq(
            find_factored(arch.factored.class_name).unwrap(),
            *arch
        ));
    }
    assert_eq!(LLAMA.global_tensor_name(Role::Query), None);
    assert_eq!(LLAMA.layer_tensor_name(0, Role::Embedding), None);
}

#[test]
fn finds_supported_classes() {
    assert!(find("LlamaForCausalLM").is_some());
    assert!(find("MistralForCausalLM").is_some());
    assert_eq!(find("Qwen2ForCausalLM").unwrap().kind, Family::Qwen2);
    assert_eq!(find("Qwen3ForCausalLM").unwrap().kind, Family::Qwen3);
    assert!(find("GPT2LMHeadModel").is_none());
}

#[test]
fn factored_names() {
    assert_eq!(
        LLAMA
            .layer_tensor_name(2, Role::Factor(Factor::KvDown))
            .unwrap(),
        "model.layers.2.self_attn.kv_a_proj.weight"
    );
    assert_eq!(
        LLAMA
            .layer_tensor_name(0, Role::Factor(Factor::VUp))
            .unwrap(),
        "model.layers.0.self_attn.v_b_proj.weight"
    );
}

#[test]
fn tables_differ_where_the_families_do() {
    let has = |arch: &Architecture, suffix: &str| arch.layer_entries().any(|(s, _)| s == suffix);
    // Qwen2: q/k/v biases, none on o_proj or the MLP; Qwen3 adds q_norm/k_norm.
    assert!(has(&QWEN2, "self_attn.k_proj.bias") && !has(&QWEN2, "self_attn.o_proj.bias"));
    assert!(!has(&QWEN2, "mlp.up_proj.bias") && !has(&QWEN2, "self_attn.q_norm.weight"));
    assert!(has(&QWEN3, "self_attn.q_norm.weight") && has(&QWEN3, "self_attn.o_proj.bias"));
    // Only families whose factored module carries biases name them on the up-projections.
    assert!(!has(&LLAMA, "self_attn.k_b_proj.bias") && has(&QWEN3, "self_attn.k_b_proj.bias"));
    assert!(QWEN2.classify("model.layers.0.mlp.up_proj.bias").is_none());
}

#[test]
fn bias_roles_invert() {
    for role in [Role::Query, Role::Key, Role::Value, Role::Output] {
        assert_eq!(role.bias().and_then(Role::projection), Some(role));
    }
    for p in [
        AttentionProjection::Query,
        AttentionProjection::Key,
        AttentionProjection::Value,
    ] {
        assert_eq!(
            Factor::up_of(p).and_then(Factor::biased_projection),
            Some(p)
        );
    }
    assert_eq!(Factor::up_of(AttentionProjection::Output), None);
    assert_eq!(Factor::KvDown.biased_projection(), None);
}
