//! The executor on the tiny checkpoint (`crate::test_support`), into an in-memory sink: the dense
//! form (fits pipelined ahead of the write pass), the factored form (latent widths first, then
//! the fits pipelined as for dense), and
//! `expand` of what the factored form wrote.

use super::input_hash::hash_alongside;
use super::pipeline::{need_order, with_pipeline, Pipelined};
use super::*;
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::model::arch::{Factor, Role};
use crate::model::dtype::FloatType;
use crate::model::layout::CONFIG_FILE;
use crate::plan::{self, FileSource, ShardPlan, Surgery, TensorPlan};
use crate::test_support::{self as tiny, RawTensor, Widths};
use safetensors::Dtype;
use std::collections::BTreeMap;

/// One tensor as written: its plan and its bytes.
type Written = (TensorPlan, Vec<u8>);

/// A sink that keeps every shard in memory, checking the calls come in a valid order and each
/// tensor gets its planned length.
#[derive(Default)]
pub(crate) struct Memory {
    /// Per shard: its file name and its tensors, in the order written.
    pub(crate) shards: Vec<(String, Vec<Written>)>,
    in_shard: bool,
    in_tensor: bool,
}

impl Memory {
    fn last_tensor(&mut self) -> &mut Written {
        assert!(self.in_tensor, "bytes outside a tensor");
        self.shards.last_mut().unwrap().1.last_mut().unwrap()
    }

    /// Every tensor written, by name.
    pub(crate) fn by_name(&self) -> BTreeMap<&str, &[u8]> {
        let tensors = self.shards.iter().flat_map(|(_, ts)| ts);
        tensors
            .map(|(t, b)| (t.name.as_str(), b.as_slice()))
            .collect()
    }

    /// The order written: shard names and their tensors' names.
    fn order(&self) -> Vec<(&str, Vec<&str>)> {
        self.shards
            .iter()
            .map(|(f, ts)| {
                (
                    f.as_str(),
                    ts.iter().map(|(t, _)| t.name.as_str()).collect(),
                )
            })
            .collect()
    }
}

impl TensorSink for Memory {
    fn begin_shard(&mut self, shard: &ShardPlan) -> Result<()> {
        assert!(!self.in_shard, "shard begun inside a shard");
        self.in_shard = true;
        self.shards.push((shard.file_name.clone(), Vec::new()));
        Ok(())
    }

    fn begin_tensor(&mut self, tensor: &TensorPlan) -> Result<()> {
        assert!(
            self.in_shard && !self.in_tensor,
            "tensor begun out of place"
        );
        self.in_tensor = true;
        let shard = &mut self.shards.last_mut().unwrap().1;
        shard.push((tensor.clone(), Vec::new()));
        Ok(())
    }

    fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        self.last_tensor().1.extend_from_slice(bytes);
        Ok(())
    }

    fn end_tensor(&mut self) -> Result<()> {
        let (t, bytes) = self.last_tensor();
        assert_eq!(bytes.len(), t.byte_len, "{}: planned length", t.name);
        self.in_tensor = false;
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<()> {
        assert!(
            self.in_shard && !self.in_tensor,
            "shard finished out of place"
        );
        self.in_shard = false;
        Ok(())
    }
}

/// The plan's order, as [`Memory::order`] reports it.
pub(crate) fn plan_order(plan: &Plan) -> Vec<(&str, Vec<&str>)> {
    plan.shards
        .iter()
        .map(|s| {
            (
                s.file_name.as_str(),
                s.tensors.iter().map(|t| t.name.as_str()).collect(),
            )
        })
        .collect()
}

/// Executes `plan` with `pieces` into memory; checks the input files were hashed whole.
pub(crate) fn run(ck: &Checkpoint, plan: &Plan, pieces: &mut dyn PieceSource) -> Result<Memory> {
    let (sink, records) = hash_alongside(ck, plan.data_len(), |pace| {
        let mut sink = Memory::default();
        execute(
            ck,
            plan,
            pieces,
            &FitInputs::default(),
            &mut sink,
            pace,
            &ProgressBar::hidden(),
        )?;
        Ok(sink)
    })?;
    check_hashes(ck, &records);
    Ok(sink)
}

fn check_hashes(ck: &Checkpoint, records: &[crate::digest::FileRecord]) {
    for (record, shard) in records.iter().zip(&ck.shards) {
        assert_eq!(
            record.sha256,
            crate::digest::sha256_file(&shard.path).unwrap()
        );
    }
}

/// `--q rank:2 --shared-kv rank:3`, fit `pca`.
pub(crate) fn surgery() -> Surgery {
    Surgery {
        q: Some(Spec::Rank(2)),
        k: None,
        v: None,
        shared_kv: Some(Spec::Rank(3)),
        fit: Fit::Pca,
        sharing: None,
        compensate: None,
    }
}

/// The dense form through the pipeline, as `write_dense` runs it.
pub(crate) fn run_dense(ck: &Checkpoint, plan: &Plan) -> (Memory, Vec<GroupReport>) {
    let mut sink = Memory::default();
    let order = need_order(plan);
    let inputs = FitInputs::default();
    let (reports, records) = hash_alongside(ck, plan.data_len(), |pace| {
        with_pipeline(ck, &plan.groups, &order, Emit::Dense, &inputs, |pipeline| {
            let mut source = Pipelined::new(pipeline, plan.groups.len());
            let bar = ProgressBar::hidden();
            execute(ck, plan, &mut source, &inputs, &mut sink, pace, &bar)?;
            Ok(source.into_reports())
        })
    })
    .unwrap();
    check_hashes(ck, &records);
    (sink, reports)
}

pub(crate) fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    FloatType::from_dtype(dtype).unwrap().decode(bytes)
}

/// `||a - b|| / ||b||`.
pub(crate) fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Copies are the input's bytes: the tensor as the test support generated it.
fn assert_copies_identical(plan: &Plan, sink: &Memory) {
    let written = sink.by_name();
    for t in plan.shards.iter().flat_map(|s| &s.tensors) {
        if let Op::Copy { .. } = t.op {
            let input = RawTensor::generated(&t.name, t.dtype, t.shape.clone());
            assert!(written[t.name.as_str()] == input.bytes, "{} copied", t.name);
        }
    }
}

#[test]
fn dense_execution_copies_and_reconstructs_in_plan_order() {
    for (dtype, sharded) in [(Dtype::F32, false), (Dtype::BF16, true)] {
        let (_dir, ck) = tiny::open_tiny(dtype, sharded);
        let plan = plan::plan(&ck, plan::groups(&ck, &surgery()), &Layout::Dense, None).unwrap();
        if !sharded {
            // One file in name order: each layer's k_proj (shared K/V) comes before its q_proj.
            assert_eq!(need_order(&plan), [1, 0, 3, 2]);
        }
        let (sink, reports) = run_dense(&ck, &plan);
        assert_eq!(sink.order(), plan_order(&plan));
        assert_copies_identical(&plan, &sink);
        assert_eq!(reports.len(), plan.groups.len());
        for (report, group) in reports.iter().zip(&plan.groups) {
            assert_eq!(
                (report.layer, report.kind),
                (group.layer, group.kind.name())
            );
            let rank = if group.kind == plan::GroupKind::Q {
                2
            } else {
                3
            };
            assert_eq!((report.rank, report.latent), (rank, rank + 1));
            // The reported errors are those of the bytes written.
            for (&member, &error) in group.members.iter().zip(&report.tensor_relative_errors) {
                let t = &ck.tensors[member];
                let original = RawTensor::generated(&t.name, dtype, t.shape.clone());
                let written = decode(dtype, sink.by_name()[t.name.as_str()]);
                let measured = relative_error(&written, &decode(dtype, &original.bytes));
                assert!(measured > 0.01, "{}: a low-rank fit changes it", t.name);
                assert!(
                    (measured - error).abs() < 1e-6,
                    "{}: {measured} {error}",
                    t.name
                );
            }
        }
    }
}

/// The factored form as `write_factored` runs it: the width pass, then the fits pipelined ahead
/// of the write pass.
pub(crate) fn run_factored(ck: &Checkpoint) -> (Plan, Memory) {
    run_factored_with(ck, &surgery())
}

/// [`run_factored`] with another surgery.
pub(crate) fn run_factored_with(ck: &Checkpoint, surgery: &Surgery) -> (Plan, Memory) {
    run_factored_bases(ck, surgery, true)
}

/// [`run_factored_with`]; `reuse`: the write pass's fits finish the width pass's bases (as
/// `write_factored` runs them), or decompose again.
fn run_factored_bases(ck: &Checkpoint, surgery: &Surgery, reuse: bool) -> (Plan, Memory) {
    let mut groups = plan::groups(ck, surgery);
    let widths_inputs = FitInputs::default();
    let latents = super::widths::resolve_latents(ck, &mut groups, &widths_inputs, &|| {}).unwrap();
    let fresh = FitInputs::default();
    let inputs = if reuse { &widths_inputs } else { &fresh };
    let layout = Layout::Factored {
        latents: latents.clone(),
    };
    let plan = plan::plan(ck, groups, &layout, None).unwrap();
    let order = need_order(&plan);
    let sink = with_pipeline(ck, &plan.groups, &order, Emit::Factored, inputs, |p| {
        let mut source = Pipelined::new(p, plan.groups.len());
        let sink = run(ck, &plan, &mut source)?;
        // Every group's fit kept the width the layout planned for it.
        for (g, report) in source.into_reports().iter().enumerate() {
            assert_eq!(report.latent, latents[g], "group {g}");
        }
        Ok(sink)
    })
    .unwrap();
    // Every basis the width pass kept was taken by its group's fit.
    assert_eq!(inputs.bases.len(), 0);
    (plan, sink)
}

#[test]
fn factored_fits_finishing_the_width_pass_bases_write_the_same_bytes() {
    let (_dir, ck) = tiny::open_tiny(Dtype::F32, true);
    for fit in [Fit::Pca, Fit::Seed, Fit::Svd] {
        let surgery = Surgery {
            q: Some(Spec::Threshold(0.6)),
            shared_kv: Some(Spec::Threshold(0.5)),
            fit,
            ..surgery()
        };
        // The width pass keeps a basis for every threshold group.
        let mut groups = plan::groups(&ck, &surgery);
        let inputs = FitInputs::default();
        super::widths::resolve_latents(&ck, &mut groups, &inputs, &|| {}).unwrap();
        assert_eq!(inputs.bases.len(), groups.len(), "{fit:?}");
        let (_, reused) = run_factored_bases(&ck, &surgery, true);
        let (_, again) = run_factored_bases(&ck, &surgery, false);
        assert_eq!(reused.by_name(), again.by_name(), "{fit:?}");
    }
}

/// `up @ down` of two row-major matrices.
fn product(up: &[f64], down: &[f64], rows: usize, latent: usize) -> Vec<f64> {
    let cols = down.len() / latent;
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = (0..latent)
                .map(|l| up[i * latent + l] * down[l * cols + j])
                .sum();
        }
    }
    out
}

#[test]
fn factored_execution_writes_factors_whose_product_is_the_dense_fit() {
    let (_dir, ck) = tiny::open_tiny(Dtype::F32, true);
    let (plan, sink) = run_factored(&ck);
    assert_eq!(sink.order(), plan_order(&plan));
    assert_copies_identical(&plan, &sink);
    let dense_plan = plan::plan(&ck, plan.groups.clone(), &Layout::Dense, None).unwrap();
    let (dense, _) = run_dense(&ck, &dense_plan);
    let (factored, dense) = (sink.by_name(), dense.by_name());
    for layer in 0..tiny::LAYERS {
        let name = |role| tiny::layer_name(layer, role);
        let f = |factor| decode(Dtype::F32, factored[name(Role::Factor(factor)).as_str()]);
        for (role, rows, latent, down, up) in [
            (Role::Query, tiny::Q_DIM, 3, Factor::QDown, Factor::QUp),
            (Role::Key, tiny::KV_DIM, 4, Factor::KvDown, Factor::KUp),
            (Role::Value, tiny::KV_DIM, 4, Factor::KvDown, Factor::VUp),
        ] {
            let (down, up) = (f(down), f(up));
            assert_eq!(
                (down.len(), up.len()),
                (latent * tiny::HIDDEN, rows * latent)
            );
            let reconstruction = decode(Dtype::F32, dense[name(role).as_str()]);
            let error = relative_error(&product(&up, &down, rows, latent), &reconstruction);
            assert!(error < 1e-5, "{}: {error}", name(role));
        }
    }
}

/// Writes what the factored form produced as a checkpoint in `dir`.
pub(crate) fn write_output(dir: &std::path::Path, plan: &Plan, sink: &Memory) {
    let config = plan
        .files
        .iter()
        .find(|f| f.relative == std::path::Path::new(CONFIG_FILE));
    let Some(FileSource::Generated { bytes: config, .. }) = config.map(|f| &f.source) else {
        panic!("no generated config.json")
    };
    write_shards(dir, config, sink);
}

/// Writes the tensors `sink` holds as a checkpoint in `dir` with `config`.
pub(crate) fn write_shards(dir: &std::path::Path, config: &[u8], sink: &Memory) {
    let shards: Vec<Vec<RawTensor>> = sink
        .shards
        .iter()
        .map(|(_, tensors)| {
            let raw = |(t, bytes): &Written| RawTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: bytes.clone(),
            };
            tensors.iter().map(raw).collect()
        })
        .collect();
    tiny::write_checkpoint(dir, config, &shards);
}

#[test]
fn expand_of_the_factored_output_multiplies_the_factors_back() {
    let (_dir, ck) = tiny::open_tiny(Dtype::F32, true);
    let (factored_plan, factored) = run_factored(&ck);
    let out = tempfile::tempdir().unwrap();
    write_output(out.path(), &factored_plan, &factored);
    let fck = Checkpoint::open(out.path()).unwrap();
    let plan = plan::plan_expand(&fck, fck.config.latent.as_ref().unwrap()).unwrap();
    let sink = run(&fck, &plan, &mut NoPieces).unwrap();
    assert_eq!(sink.order(), plan_order(&plan));
    assert_copies_identical(&plan, &sink);
    let expanded = sink.by_name();
    let mut names: Vec<&str> = expanded.keys().copied().collect();
    let mut dense: Vec<String> = tiny::dense_shapes().into_iter().map(|(n, _)| n).collect();
    names.sort();
    dense.sort();
    assert_eq!(names, dense);
    let dense_plan = plan::plan(&ck, factored_plan.groups, &Layout::Dense, None).unwrap();
    let (reconstructed, _) = run_dense(&ck, &dense_plan);
    for (name, bytes) in reconstructed.by_name() {
        let (a, b) = (
            decode(Dtype::F32, expanded[name]),
            decode(Dtype::F32, bytes),
        );
        assert!(relative_error(&a, &b) < 1e-5, "{name}");
    }
}

#[test]
fn expand_encodes_the_product_in_the_up_projections_dtype() {
    let widths = Widths {
        q: Some(vec![3, 2]),
        ..Widths::default()
    };
    let (_dir, ck) = tiny::open_factored(&widths);
    let plan = plan::plan_expand(&ck, ck.config.latent.as_ref().unwrap()).unwrap();
    let sink = run(&ck, &plan, &mut NoPieces).unwrap();
    let written = sink.by_name();
    for (layer, &latent) in [3, 2].iter().enumerate() {
        let raw = |factor| {
            let t = &ck.tensors[tiny::index(&ck, layer, Role::Factor(factor))];
            decode(t.dtype, ck.bytes(t))
        };
        let expected = product(&raw(Factor::QUp), &raw(Factor::QDown), tiny::Q_DIM, latent);
        let q = decode(
            Dtype::F32,
            written[tiny::layer_name(layer, Role::Query).as_str()],
        );
        assert!(relative_error(&q, &expected) < 1e-6);
    }
}

#[test]
fn no_pieces_refuses_to_produce_a_group_output() {
    let (_dir, ck) = tiny::open_tiny(Dtype::F32, false);
    let plan = plan::plan(&ck, plan::groups(&ck, &surgery()), &Layout::Dense, None).unwrap();
    let err = NoPieces.take(&ck, &plan, 0, 0).unwrap_err();
    assert!(matches!(err, Error::Bug { .. }), "{err:?}");
    let err = run(&ck, &plan, &mut NoPieces).err().unwrap();
    assert!(matches!(err, Error::Bug { .. }), "{err:?}");
}

#[test]
fn expand_refuses_a_non_finite_factor_by_name() {
    let widths = Widths {
        kv: Some(vec![3, 2]),
        ..Widths::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let written = tiny::write_factored_tiny(dir.path(), Dtype::F32, &widths);
    let name = tiny::layer_name(1, Role::Factor(Factor::KvDown));
    let ck = Checkpoint::open(dir.path()).unwrap();
    let at = ck.tensor(&name).unwrap().range.start;
    drop(ck);
    assert!(written.iter().any(|t| t.name == name));
    let path = dir.path().join(crate::model::layout::SINGLE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let plan = plan::plan_expand(&ck, ck.config.latent.as_ref().unwrap()).unwrap();
    let err = run(&ck, &plan, &mut NoPieces).err().unwrap().to_line();
    assert!(
        err.ends_with(&format!("tensor `{name}`: layer 1: 1 non-finite values (NaN or infinite); a factor to expand must be finite")),
        "{err}"
    );
}
