//! Phi-3's fused tensors through the executor: opened as their parts, written back fused (dense,
//! `expand`), `q_proj` kept apart beside the K/V factors (factored), `gate_up_proj` fused in both.

use super::tests::{
    decode, relative_error, run, run_dense, run_factored_with, surgery, write_output, write_shards,
    Memory,
};
use super::*;
use crate::fit::spec::Spec;
use crate::model::arch::{Family, Fusion, Role};
use crate::model::layout::{CONFIG_FILE, SINGLE_FILE};
use crate::plan::{self, Surgery};
use crate::test_support as tiny;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;

/// The tensors of `dir`'s `model.safetensors` as stored: name to (shape, bytes).
fn stored(dir: &std::path::Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join(SINGLE_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.data().to_vec())))
        .collect()
}

/// What `sink` wrote: name to (shape, bytes).
fn written(sink: &Memory) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    sink.shards
        .iter()
        .flat_map(|(_, tensors)| tensors)
        .map(|(t, bytes)| (t.name.clone(), (t.shape.clone(), bytes.clone())))
        .collect()
}

fn phi3() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_family(dir.path(), Family::Phi3);
    let ck = Checkpoint::open(dir.path()).unwrap();
    (dir, ck)
}

#[test]
fn opening_splits_the_fused_tensors_into_row_ranges() {
    let (dir, ck) = phi3();
    let files = stored(dir.path());
    let arch = ck.config.arch;
    for layer in 0..tiny::LAYERS {
        for fusion in [Fusion::Qkv, Fusion::GateUp] {
            let fused = arch.layer_tensor_name(layer, Role::Fused(fusion)).unwrap();
            assert!(ck.tensor(&fused).is_none(), "{fused} is read as its parts");
            let mut joined = Vec::new();
            for &role in fusion.parts() {
                let t = ck
                    .tensor(&arch.layer_tensor_name(layer, role).unwrap())
                    .unwrap();
                assert_eq!(t.class.role, role);
                joined.extend_from_slice(ck.bytes(t));
            }
            assert_eq!(
                joined, files[&fused].1,
                "{fused}: the parts tile it in order"
            );
        }
    }
    let q = ck
        .tensor(&arch.layer_tensor_name(1, Role::Query).unwrap())
        .unwrap();
    assert_eq!(q.shape, [tiny::Q_DIM, tiny::HIDDEN]);
}

#[test]
fn a_copy_writes_the_fused_tensors_back_byte_for_byte() {
    let (dir, ck) = phi3();
    let plan = plan::plan(&ck, Vec::new(), &Layout::Dense, None).unwrap();
    let sink = run(&ck, &plan, &mut NoPieces).unwrap();
    assert_eq!(written(&sink), stored(dir.path()));
    let describe = plan.describe(&ck).join("\n");
    assert!(describe.contains("self_attn.qkv_proj.weight  F32 [16, 8]  fused of model.layers.0.self_attn.q_proj.weight [8, 8]: copy;"), "{describe}");
}

#[test]
fn factored_keeps_q_proj_apart_and_expand_fuses_it_back() {
    let (input, ck) = phi3();
    let kv_only = Surgery {
        q: None,
        shared_kv: Some(Spec::Rank(3)),
        ..surgery()
    };
    let (factored_plan, factored) = run_factored_with(&ck, &kv_only);
    let names = written(&factored);
    let arch = ck.config.arch;
    for layer in 0..tiny::LAYERS {
        let name = |role| arch.layer_tensor_name(layer, role).unwrap();
        assert!(names.contains_key(&name(Role::Query)), "q_proj kept apart");
        assert!(!names.contains_key(&name(Role::Fused(Fusion::Qkv))));
        assert!(!names.contains_key(&name(Role::Key)));
        let gate_up = &names[&name(Role::Fused(Fusion::GateUp))];
        assert_eq!(gate_up.0, [2 * tiny::INTERMEDIATE, tiny::HIDDEN]);
        assert!(!names.contains_key(&name(Role::MlpGate)));
    }
    let factored_dir = tempfile::tempdir().unwrap();
    write_output(factored_dir.path(), &factored_plan, &factored);

    // The dense form of the same fits, fused; its q rows are the input's, untouched.
    let dense_plan = plan::plan(&ck, factored_plan.groups.clone(), &Layout::Dense, None).unwrap();
    let (dense, _) = run_dense(&ck, &dense_plan);
    let dense_tensors = written(&dense);
    let original = stored(input.path());
    let qkv = arch.layer_tensor_name(0, Role::Fused(Fusion::Qkv)).unwrap();
    assert_eq!(
        dense_tensors[&qkv].0,
        [tiny::Q_DIM + 2 * tiny::KV_DIM, tiny::HIDDEN]
    );
    let q_bytes = tiny::Q_DIM * tiny::HIDDEN * 4;
    assert_eq!(
        dense_tensors[&qkv].1[..q_bytes],
        original[&qkv].1[..q_bytes]
    );
    assert_ne!(
        dense_tensors[&qkv].1, original[&qkv].1,
        "K/V rows were refitted"
    );
    let keys: Vec<&String> = dense_tensors.keys().collect();
    assert_eq!(
        keys,
        original.keys().collect::<Vec<_>>(),
        "the input's names"
    );

    // Opened again, the factored output reads q_proj and the fused gate_up_proj; expand restores
    // the dense form's names and values.
    let fck = Checkpoint::open(factored_dir.path()).unwrap();
    let expand = plan::plan_expand(&fck, fck.config.latent.as_ref().unwrap()).unwrap();
    let expanded = written(&run(&fck, &expand, &mut NoPieces).unwrap());
    assert_eq!(expanded.keys().collect::<Vec<_>>(), keys);
    for (name, (shape, bytes)) in &dense_tensors {
        assert_eq!(&expanded[name].0, shape, "{name}");
        let (x, y) = (
            decode(Dtype::F32, &expanded[name].1),
            decode(Dtype::F32, bytes),
        );
        assert!(relative_error(&x, &y) < 1e-5, "{name}");
    }
    let dense_dir = tempfile::tempdir().unwrap();
    let config = std::fs::read(input.path().join(CONFIG_FILE)).unwrap();
    write_shards(dense_dir.path(), &config, &dense);
    assert!(Checkpoint::open(dense_dir.path()).is_ok());
}

#[test]
fn a_missing_fused_tensor_is_named() {
    let (dir, _) = phi3();
    let path = dir.path().join(SINGLE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let qkv = "model.layers.1.self_attn.qkv_proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != qkv).collect();
    std::fs::write(&path, safetensors::serialize(kept, None).unwrap()).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_line();
    assert!(err.contains(qkv) && err.contains("missing"), "{err}");
}

/// `dir`'s `model.safetensors` with an F32 NaN written at byte `at`.
fn poke_nan(dir: &std::path::Path, at: usize) {
    let path = dir.join(SINGLE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn a_non_finite_part_is_named_by_the_fused_tensor_the_file_holds() {
    let (dir, ck) = phi3();
    let k1 = tiny::layer_name(1, Role::Key);
    let at = ck.tensor(&k1).unwrap().range.start + 4;
    drop(ck);
    poke_nan(dir.path(), at);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let groups = plan::groups(&ck, &surgery());
    let group = groups
        .iter()
        .find(|g| g.members.iter().any(|&m| ck.tensors[m].name == k1))
        .unwrap();
    let err = super::group::stack_group(&ck, group).unwrap_err().to_line();
    assert!(
        err.ends_with("tensor `model.layers.1.self_attn.qkv_proj.weight`: rows 8..12 (its k_proj part): layer 1: 1 non-finite values (NaN or infinite); a matrix to decompose must be finite"),
        "{err}"
    );
    assert!(!err.contains("k_proj.weight"), "{err}");
}
