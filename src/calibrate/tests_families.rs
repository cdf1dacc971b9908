//! The executor's output run through the forward pass (so these tests live above both), on the tiny checkpoint written as each family (`test_support::write_tiny_family`):
//! the factored form moves each factored projection's bias onto its up-projection, the Rust forward
//! pass of the factored output equals the dense output's (biases and Qwen3's q/k norms included),
//! and `expand` restores every original name.

use crate::execute::tests::{
    decode, relative_error, run, run_dense, run_factored, write_output, write_shards, Memory,
};
use crate::execute::*;
use crate::forward::{Llama, PassState};
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::{AttentionProjection, Factor, Family, Role};
use crate::model::layout::CONFIG_FILE;
use crate::plan;
use crate::plan::Layout;
use crate::test_support as tiny;
use safetensors::Dtype;
use std::path::Path;

/// The logits of a few tokens through the Rust forward pass of the checkpoint in `dir`.
fn logits(dir: &Path) -> Vec<f64> {
    let ck = Checkpoint::open(dir).unwrap();
    let llama = Llama::new(&ck).unwrap();
    let ids = [1u32, 5, 7, 2, 9, 3];
    let mut h = llama.embed(&ids).unwrap();
    let mut state = PassState::default();
    for layer in 0..llama.params().num_layers {
        llama
            .layer(layer)
            .unwrap()
            .forward(&mut h, 0, &mut state)
            .unwrap();
    }
    let out = llama.logits(h.as_ref()).unwrap();
    (0..out.nrows())
        .flat_map(|i| (0..out.ncols()).map(move |j| (i, j)))
        .map(|(i, j)| out[(i, j)] as f64)
        .collect()
}

/// The names `sink` wrote.
fn names(sink: &Memory) -> Vec<String> {
    let mut names: Vec<String> = sink.by_name().keys().map(|n| n.to_string()).collect();
    names.sort();
    names
}

fn factored_output_matches_dense(family: Family) {
    let input = tempfile::tempdir().unwrap();
    tiny::write_tiny_family(input.path(), family);
    let ck = Checkpoint::open(input.path()).unwrap();
    let (factored_plan, factored) = run_factored(&ck);
    let by_name = factored.by_name();
    let name = |layer, role| ck.config.arch.layer_tensor_name(layer, role).unwrap();
    let biased = ck.config.arch.factored_biases();
    for layer in (0..tiny::LAYERS).filter(|_| biased) {
        // q (rank 2) and the shared K/V (rank 3) are factored: their biases moved, bytes unchanged.
        for (projection, up) in [
            (AttentionProjection::Query, Factor::QUp),
            (AttentionProjection::Key, Factor::KUp),
            (AttentionProjection::Value, Factor::VUp),
        ] {
            let dense = name(layer, Role::AttentionBias(projection));
            assert!(!by_name.contains_key(dense.as_str()), "{dense} moved");
            let moved = by_name[name(layer, Role::FactorBias(up)).as_str()];
            let original = ck.tensor(&dense).unwrap();
            assert!(moved == ck.bytes(original), "{dense} bytes");
        }
    }
    let module_files: Vec<_> = factored_plan
        .files
        .iter()
        .map(|f| f.relative.clone())
        .collect();
    for file in ck.config.arch.factored.files {
        assert!(
            module_files.contains(&Path::new(file).to_path_buf()),
            "{file}"
        );
    }
    let factored_dir = tempfile::tempdir().unwrap();
    write_output(factored_dir.path(), &factored_plan, &factored);

    let dense_plan = plan::plan(&ck, factored_plan.groups.clone(), &Layout::Dense, None).unwrap();
    let (dense, _) = run_dense(&ck, &dense_plan);
    let dense_dir = tempfile::tempdir().unwrap();
    let config = std::fs::read(input.path().join(CONFIG_FILE)).unwrap();
    write_shards(dense_dir.path(), &config, &dense);
    let (a, b) = (logits(factored_dir.path()), logits(dense_dir.path()));
    let error = relative_error(&a, &b);
    assert!(error < 1e-5, "{family:?}: factored vs dense logits {error}");
    // The original model differs (rank 2 and 3 of 8 and 4 rows): the comparison is not vacuous.
    assert!(relative_error(&logits(input.path()), &b) > 1e-3);

    // expand: every original name back, the biases byte for byte.
    let fck = Checkpoint::open(factored_dir.path()).unwrap();
    let expand = plan::plan_expand(&fck, fck.config.latent.as_ref().unwrap()).unwrap();
    let expanded = run(&fck, &expand, &mut NoPieces).unwrap();
    assert_eq!(names(&expanded), names(&dense));
    for (name, bytes) in dense.by_name() {
        let (x, y) = (
            decode(Dtype::F32, expanded.by_name()[name]),
            decode(Dtype::F32, bytes),
        );
        assert!(relative_error(&x, &y) < 1e-5, "{name}");
    }
}

#[test]
fn qwen2_factored_output_matches_dense_and_expands() {
    factored_output_matches_dense(Family::Qwen2);
}

#[test]
fn qwen3_factored_output_matches_dense_and_expands() {
    factored_output_matches_dense(Family::Qwen3);
}

#[test]
fn gemma2_factored_output_matches_dense_and_expands() {
    factored_output_matches_dense(Family::Gemma2);
}

#[test]
fn gemma3_factored_output_matches_dense_and_expands() {
    factored_output_matches_dense(Family::Gemma3);
}

#[test]
fn phi3_factored_output_matches_dense_and_expands() {
    factored_output_matches_dense(Family::Phi3);
}

#[test]
fn each_family_runs_its_own_forward_pass() {
    // The same tensors read as another family's give other logits: every difference is read.
    let logits_of = |family| {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_tiny_family(dir.path(), family);
        logits(dir.path())
    };
    let all = [
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
    ];
    let outs: Vec<Vec<f64>> = all.iter().map(|&f| logits_of(f)).collect();
    for i in 0..outs.len() {
        assert!(outs[i].iter().all(|x| x.is_finite()), "{:?}", all[i]);
        for j in 0..i {
            let d = relative_error(&outs[i], &outs[j]);
            assert!(d > 1e-3, "{:?} vs {:?}: {d}", all[i], all[j]);
        }
    }
    // Gemma 2's final soft cap bounds every logit.
    assert!(outs[3].iter().all(|x| x.abs() <= 0.8 + 1e-6));
}

#[test]
fn qwen3_norms_and_biases_change_the_forward_pass() {
    // Without q_norm/k_norm or with other biases the logits differ: the pass reads them.
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_family(dir.path(), Family::Qwen3);
    let with = logits(dir.path());
    let ck = Checkpoint::open(dir.path()).unwrap();
    let llama = Llama::new(&ck).unwrap();
    assert!(llama.params().family.qk_norm);
    assert!(llama.layer(0).unwrap().qk_norm.is_some());
    let plain = tempfile::tempdir().unwrap();
    tiny::write_tiny_family(plain.path(), Family::Llama);
    assert!(relative_error(&logits(plain.path()), &with) > 1e-3);
}
