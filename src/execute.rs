//! The executor: fits the plan's groups (in parallel across matrices) and walks the plan shard by
//! shard and tensor by tensor, handing bytes to a sink.
//!
//! Fits run ahead of the writer through a [`Pipeline`] in the order the write pass needs them, so
//! only the groups in flight are held in memory. Dense output takes them as its tensors come due
//! ([`Pipelined`]). Factored output needs every latent width before the layout exists, so
//! [`factor_pass`] drains the pipeline first and spills the encoded factors to a scratch file
//! ([`Spill`]) that the write pass then reads back: every matrix is decomposed once either way.
//! Input pages are released as soon as they have been consumed.

use crate::arch::Role;
use crate::checkpoint::Checkpoint;
use crate::decompose::{
    count_non_finite, decompose_owned, error_ratio, matrix_from_rows, matrix_to_rows,
    DecomposeError, Decomposition, Fit,
};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::input_hash::InputHasher;
use crate::plan::{Emit, GroupPlan, Op, Plan, ShardPlan, TensorPlan};
use crate::spec::Spec;
use crate::weighted::{
    balance_scales, blockwise_weight, decompose_weighted, key_weight, value_weight, Heads,
    LeftWeight,
};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};

/// What one decomposition kept and cost, as recorded in `surgery.json`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// Layer index.
    pub layer: usize,
    /// `q`, `k`, `v` or `shared_kv`.
    pub kind: &'static str,
    /// The tensors fitted together, in stacking order.
    pub tensors: Vec<String>,
    /// Shape of the (stacked) matrix fitted: `[rows, cols]`.
    pub shape: [usize; 2],
    /// The SPEC given.
    pub spec: String,
    /// The reconstruction.
    pub fit: &'static str,
    /// Components kept.
    pub rank: usize,
    /// Width of the factored form's latent: `rank`, plus one for the mean direction of fit `pca`.
    pub latent: usize,
    /// Components available.
    pub full_rank: usize,
    /// Whether `rank:N` exceeded the maximum and was clamped.
    pub rank_clamped: bool,
    /// Explained variance kept (sum of the kept components' ratios).
    pub variance_kept: f64,
    /// `||W - W'||_F / ||W||_F` over the whole group, with `W'` as written: the reconstruction
    /// rounded to the output dtype, or for factored output the product of the rounded factors.
    pub relative_error: f64,
    /// The same per tensor, in `tensors` order.
    pub tensor_relative_errors: Vec<f64>,
    /// Parameters of the original matrices.
    pub params_original: u64,
    /// Parameters of the factored form (down-projection plus up-projections).
    pub params_factored: u64,
    /// Bytes of the original matrices.
    pub bytes_original: u64,
    /// Bytes of the factored form in the same dtypes.
    pub bytes_factored: u64,
}

/// Where the executor sends output bytes: shards in plan order, each a sequence of tensors, each
/// tensor's bytes in one or more parts.
pub trait TensorSink {
    /// A new output file starts.
    fn begin_shard(&mut self, shard: &ShardPlan) -> Result<()>;
    /// The next tensor in plan order starts.
    fn begin_tensor(&mut self, tensor: &TensorPlan) -> Result<()>;
    /// The next bytes of the current tensor.
    fn write_part(&mut self, bytes: &[u8]) -> Result<()>;
    /// The current tensor is complete (its planned length must have been written).
    fn end_tensor(&mut self) -> Result<()>;
    /// The current file is complete.
    fn finish_shard(&mut self) -> Result<()>;

    /// A whole tensor in one part.
    fn write_tensor(&mut self, tensor: &TensorPlan, bytes: &[u8]) -> Result<()> {
        self.begin_tensor(tensor)?;
        self.write_part(bytes)?;
        self.end_tensor()
    }
}

/// Extra latent dimensions a fit needs for the mean row.
pub fn mean_dims(fit: Fit) -> usize {
    usize::from(fit == Fit::Pca)
}

/// How fit `act` weighs the errors of the outputs it fits (see `weighted`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ActWeighting {
    /// Every output direction alike; stacked blocks balanced to equal output energy.
    Energy,
    /// Key errors weighted by the queries that read them, value errors through `o_proj`; blocks
    /// then balanced to equal weighted energy.
    #[default]
    Attention,
}

/// What the fits need besides the weights.
#[derive(Debug, Default)]
pub struct FitInputs {
    /// Per layer, the covariance of the attention input (`--calibrate`), for fit `act`.
    pub covariances: Option<Vec<Mat<f64>>>,
    /// How fit `act` weighs output errors.
    pub weighting: ActWeighting,
    /// Where the covariances came from.
    pub calibration: Option<crate::calibrate::CalibrationRecord>,
}

/// Decodes and stacks a group's members straight into one matrix: the types and the matrix.
/// The members' pages stay mapped: the caller releases them after its last read.
fn stack_group(checkpoint: &Checkpoint, group: &GroupPlan) -> Result<(Vec<FloatType>, Mat<f64>)> {
    let mut types = Vec::with_capacity(group.members.len());
    let cols = checkpoint.tensors[group.members[0]].shape[1];
    let rows: usize = group
        .members
        .iter()
        .map(|&i| checkpoint.tensors[i].shape[0])
        .sum();
    let mut w = Mat::<f64>::zeros(rows, cols);
    let mut row0 = 0;
    for &i in &group.members {
        let t = &checkpoint.tensors[i];
        let ft = FloatType::from_dtype(t.dtype).ok_or_else(|| {
            Error::tensor(
                &checkpoint.shards[t.shard].path,
                &t.name,
                format!("dtype {:?} cannot be decomposed", t.dtype),
            )
        })?;
        types.push(ft);
        ft.decode_into(
            checkpoint.bytes(t),
            w.as_mut().subrows_mut(row0, t.shape[0]),
        );
        // Checked per member, so the message names the tensor (the fit checks the stack again).
        let bad = count_non_finite(w.as_ref().subrows(row0, t.shape[0]));
        if bad > 0 {
            return Err(Error::tensor(
                &checkpoint.shards[t.shard].path,
                &t.name,
                format!(
                    "layer {}: {bad} non-finite values (NaN or infinite); a matrix to decompose must be finite",
                    group.layer
                ),
            ));
        }
        row0 += t.shape[0];
    }
    Ok((types, w))
}

/// Releases the pages of a group's members.
fn release_members(checkpoint: &Checkpoint, group: &GroupPlan) {
    for &i in &group.members {
        checkpoint.release(&checkpoint.tensors[i]);
    }
}

/// Fits a stacked group (consumed: the weight-only fits centre it in place) with its fit and
/// effective SPEC.
fn fit_group(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    inputs: &FitInputs,
    w: Mat<f64>,
    spec: Spec,
) -> Result<Decomposition> {
    let first = &checkpoint.tensors[group.members[0]];
    let names: Vec<&str> = group
        .members
        .iter()
        .map(|&i| checkpoint.tensors[i].name.as_str())
        .collect();
    let fail = |e: DecomposeError| {
        Error::tensor(
            &checkpoint.shards[first.shard].path,
            names.join("+"),
            format!("layer {}: cannot decompose: {e}", group.layer),
        )
    };
    match group.fit {
        Fit::Act => {
            let c = inputs
                .covariances
                .as_ref()
                .and_then(|c| c.get(group.layer))
                .ok_or_else(|| fail(DecomposeError::NeedsCalibration))?;
            let rows: Vec<usize> = group
                .members
                .iter()
                .map(|&i| checkpoint.tensors[i].shape[0])
                .collect();
            let w = w.as_ref();
            let left = match inputs.weighting {
                ActWeighting::Energy => LeftWeight::Diagonal(balance_scales(w, c.as_ref(), &rows)),
                ActWeighting::Attention => {
                    let blocks = attention_blocks(checkpoint, group, c.as_ref())?;
                    blockwise_weight(w, c.as_ref(), &blocks).map_err(fail)?
                }
            };
            decompose_weighted(w, c.as_ref(), &left, spec).map_err(fail)
        }
        fit => decompose_owned(w, fit, spec).map_err(fail),
    }
}

/// Decodes a layer's projection (by role) to `f64`.
fn decode_role(checkpoint: &Checkpoint, layer: usize, role: Role) -> Result<Mat<f64>> {
    let arch = checkpoint.config.arch;
    let name = arch
        .layer_tensor_name(layer, role)
        .ok_or_else(|| Error::invalid(&checkpoint.dir, format!("no {role:?} name")))?;
    let t = checkpoint
        .tensor(&name)
        .ok_or_else(|| Error::tensor(&checkpoint.dir, &name, "missing"))?;
    let ft = FloatType::from_dtype(t.dtype).ok_or_else(|| {
        Error::tensor(
            &checkpoint.shards[t.shard].path,
            &t.name,
            format!("dtype {:?} cannot be read as floats", t.dtype),
        )
    })?;
    if t.shape.len() != 2 {
        return Err(Error::tensor(
            &checkpoint.shards[t.shard].path,
            &t.name,
            format!("expected a matrix, found shape {:?}", t.shape),
        ));
    }
    Ok(matrix_from_rows(
        t.shape[0],
        t.shape[1],
        &ft.decode(checkpoint.bytes(t)),
    ))
}

/// The attention-aware cost of each member's output errors: keys through the queries that read
/// them, values through `o_proj`; queries unweighted.
fn attention_blocks(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    c: MatRef<'_, f64>,
) -> Result<Vec<(usize, Option<Mat<f64>>)>> {
    let cfg = &checkpoint.config;
    let heads = Heads {
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    group
        .members
        .iter()
        .map(|&i| {
            let t = &checkpoint.tensors[i];
            let g = match t.class.role {
                Role::Key => {
                    let wq = decode_role(checkpoint, group.layer, Role::Query)?;
                    Some(key_weight(wq.as_ref(), c, heads))
                }
                Role::Value => {
                    let wo = decode_role(checkpoint, group.layer, Role::Output)?;
                    Some(value_weight(wo.as_ref(), heads))
                }
                _ => None,
            };
            Ok((t.shape[0], g))
        })
        .collect()
}

/// Every group's explained-variance spectrum (descending), in group order, computed in parallel:
/// what `budget:F` allocates ranks from.
pub fn spectra(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    inputs: &FitInputs,
) -> Result<Vec<Vec<f64>>> {
    let results: Vec<Result<Vec<f64>>> = groups
        .par_iter()
        .map(|group| {
            let (_, w) = stack_group(checkpoint, group)?;
            release_members(checkpoint, group);
            Ok(fit_group(checkpoint, group, inputs, w, Spec::Rank(1))?.spectrum)
        })
        .collect();
    results.into_iter().collect()
}

/// Seconds taken by the fits of `groups` alone, in parallel across matrices, with every matrix
/// decoded into memory beforehand (the benchmark's decomposition floor).
pub fn decompose_floor(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    inputs: &FitInputs,
) -> Result<f64> {
    let matrices: Vec<Mat<f64>> = groups
        .par_iter()
        .map(|group| {
            let (_, w) = stack_group(checkpoint, group)?;
            release_members(checkpoint, group);
            Ok(w)
        })
        .collect::<Result<_>>()?;
    let started = std::time::Instant::now();
    let fits: Vec<Result<Decomposition>> = groups
        .par_iter()
        .zip(matrices)
        .map(|(group, w)| fit_group(checkpoint, group, inputs, w, group.effective_spec()))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    for fit in fits {
        fit?;
    }
    Ok(seconds)
}

/// One fitted group: its report and its encoded outputs (see [`Op::Computed`] for their order).
struct GroupOutput {
    report: GroupReport,
    pieces: Vec<Option<Vec<u8>>>,
}

/// `||W - W'||_F / ||W||_F` of the whole group and of each member (`rows[k]` rows each, `cols`
/// columns), summed in row-major order. `original(i, buf)` and `written(i, buf)` fill `buf` with row
/// `i` of `W` and `W'`.
fn group_errors(
    rows: &[usize],
    cols: usize,
    original: impl Fn(usize, &mut [f64]),
    written: impl Fn(usize, &mut [f64]),
) -> (f64, Vec<f64>) {
    let (mut a_row, mut b_row) = (vec![0.0; cols], vec![0.0; cols]);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    let mut members = Vec::with_capacity(rows.len());
    let mut i = 0;
    for &n in rows {
        let (mut d, mut m) = (0.0f64, 0.0f64);
        for _ in 0..n {
            original(i, &mut a_row);
            written(i, &mut b_row);
            for (&a, &b) in a_row.iter().zip(&b_row) {
                let e = a - b;
                diff += e * e;
                norm += a * a;
                d += e * e;
                m += a * a;
            }
            i += 1;
        }
        members.push(error_ratio(d, m));
    }
    (error_ratio(diff, norm), members)
}

/// Decodes, stacks and fits one group; returns its report and its outputs in the `emit` form.
fn run_group(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    emit: Emit,
    inputs: &FitInputs,
) -> Result<GroupOutput> {
    let members: Vec<_> = group
        .members
        .iter()
        .map(|&i| &checkpoint.tensors[i])
        .collect();
    let names: Vec<String> = members.iter().map(|t| t.name.clone()).collect();
    let member_rows: Vec<usize> = members.iter().map(|t| t.shape[0]).collect();
    let (types, w) = stack_group(checkpoint, group)?;
    let (rows, cols) = (w.nrows(), w.ncols());
    let d = fit_group(checkpoint, group, inputs, w, group.effective_spec())?;

    // The errors compare W, decoded again from the input's pages (so the fit could consume its
    // copy), with W' as the output represents it, rounded.
    let mut starts = Vec::with_capacity(members.len());
    let mut row0 = 0;
    for t in &members {
        starts.push(row0);
        row0 += t.shape[0];
    }
    let member_of = |i: usize| starts.partition_point(|&s| s <= i) - 1;
    let inputs_bytes: Vec<&[u8]> = members.iter().map(|t| checkpoint.bytes(t)).collect();
    let row_of = |bytes: &[&[u8]], i: usize, buf: &mut [f64]| {
        let k = member_of(i);
        let size = types[k].size();
        let start = (i - starts[k]) * cols * size;
        types[k].decode_slice(&bytes[k][start..start + cols * size], buf);
    };
    let original = |i: usize, buf: &mut [f64]| row_of(&inputs_bytes, i, buf);
    let mut pieces: Vec<Option<Vec<u8>>> = Vec::with_capacity(members.len() + 1);
    let (relative_error, tensor_errors) = match emit {
        Emit::Dense => {
            for ((t, ft), &start) in members.iter().zip(&types).zip(&starts) {
                pieces.push(Some(
                    ft.encode_rows(d.reconstruction.as_ref().subrows(start, t.shape[0])),
                ));
            }
            let encoded: Vec<&[u8]> = pieces.iter().flatten().map(Vec::as_slice).collect();
            group_errors(&member_rows, cols, original, |i, buf| {
                row_of(&encoded, i, buf)
            })
        }
        Emit::Factored => {
            let latent = d.factors.down.nrows();
            let down = types[0].encode_rows(d.factors.down.as_ref());
            let mut down_rounded = Mat::<f64>::zeros(latent, cols);
            types[0].decode_into(&down, down_rounded.as_mut());
            pieces.push(Some(down));
            let mut up_rounded = Mat::<f64>::zeros(rows, latent);
            for ((t, ft), &start) in members.iter().zip(&types).zip(&starts) {
                let encoded = ft.encode_rows(d.factors.up.as_ref().subrows(start, t.shape[0]));
                ft.decode_into(&encoded, up_rounded.as_mut().subrows_mut(start, t.shape[0]));
                pieces.push(Some(encoded));
            }
            let written = product(&up_rounded, &down_rounded);
            group_errors(&member_rows, cols, original, |i, buf| {
                for (j, x) in buf.iter_mut().enumerate() {
                    *x = written[(i, j)];
                }
            })
        }
    };
    release_members(checkpoint, group);
    let rank = d.choice.rank;
    let latent = d.factors.down.nrows();
    let bytes_original = members.iter().map(|t| t.range.len() as u64).sum();
    let bytes_factored = (latent * cols * types[0].size()
        + members
            .iter()
            .zip(&types)
            .map(|(t, ft)| t.shape[0] * latent * ft.size())
            .sum::<usize>()) as u64;
    let report = GroupReport {
        layer: group.layer,
        kind: group.kind.name(),
        tensors: names,
        shape: [rows, cols],
        spec: group.spec.to_string(),
        fit: group.fit.name(),
        rank,
        latent,
        full_rank: d.choice.full_rank,
        rank_clamped: d.choice.clamped,
        variance_kept: d.variance_kept,
        relative_error,
        tensor_relative_errors: tensor_errors,
        params_original: (rows * cols) as u64,
        params_factored: (latent * (rows + cols)) as u64,
        bytes_original,
        bytes_factored,
    };
    Ok(GroupOutput { report, pieces })
}

/// `a @ b` in `f64`, single-threaded (parallelism is across matrices, so bytes never depend on the
/// thread count).
fn product(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), b.ncols());
    matmul(
        out.as_mut(),
        Accum::Replace,
        a.as_ref(),
        b.as_ref(),
        1.0,
        Par::Seq,
    );
    out
}

/// Fits one group and encodes its outputs in the `emit` form (for dense: each member's
/// reconstruction in its dtype), with its report. For in-memory use (`sweep`).
pub fn fit_and_encode(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    emit: Emit,
    inputs: &FitInputs,
) -> Result<(GroupReport, Vec<Vec<u8>>)> {
    let out = run_group(checkpoint, group, emit, inputs)?;
    Ok((out.report, out.pieces.into_iter().flatten().collect()))
}

/// Runs groups in parallel; errors are reported for the lowest group index, so they are
/// deterministic too.
fn run_groups(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    indices: &[usize],
    emit: Emit,
    inputs: &FitInputs,
    progress: Option<&ProgressBar>,
) -> Result<Vec<(usize, GroupOutput)>> {
    let results: Vec<(usize, Result<GroupOutput>)> = indices
        .par_iter()
        .map(|&g| {
            let r = run_group(checkpoint, &groups[g], emit, inputs);
            if let Some(p) = progress {
                p.inc(1);
            }
            (g, r)
        })
        .collect();
    results
        .into_iter()
        .map(|(g, r)| r.map(|o| (g, o)))
        .collect()
}

/// Computes every group's report without producing output (for `--dry-run`).
pub fn reports_only(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    emit: Emit,
    inputs: &FitInputs,
    progress: &ProgressBar,
) -> Result<Vec<GroupReport>> {
    progress.set_length(groups.len() as u64);
    let all: Vec<usize> = (0..groups.len()).collect();
    Ok(
        run_groups(checkpoint, groups, &all, emit, inputs, Some(progress))?
            .into_iter()
            .map(|(_, o)| o.report)
            .collect(),
    )
}

/// Produces a group output when the write pass reaches it.
pub trait PieceSource {
    /// The bytes of output `piece` of group `group` (each is asked for exactly once).
    fn take(
        &mut self,
        checkpoint: &Checkpoint,
        plan: &Plan,
        group: usize,
        piece: usize,
    ) -> Result<Vec<u8>>;
}

/// The source for plans without groups (`expand`): no piece is ever asked for.
pub struct NoPieces;

impl PieceSource for NoPieces {
    fn take(
        &mut self,
        checkpoint: &Checkpoint,
        _plan: &Plan,
        group: usize,
        _piece: usize,
    ) -> Result<Vec<u8>> {
        Err(Error::invalid(
            &checkpoint.dir,
            format!("internal error: output of group {group} asked of a plan without groups"),
        ))
    }
}

/// Encoded factors of every group, spilled to a scratch file by [`factor_pass`].
pub struct Spill {
    file: File,
    path: PathBuf,
    /// Per group, per piece: offset and length in the file.
    pieces: Vec<Vec<(u64, usize)>>,
}

impl Spill {
    /// Deletes the scratch file.
    pub fn remove(self) -> Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl PieceSource for Spill {
    fn take(
        &mut self,
        _checkpoint: &Checkpoint,
        _plan: &Plan,
        group: usize,
        piece: usize,
    ) -> Result<Vec<u8>> {
        let (offset, len) = self
            .pieces
            .get(group)
            .and_then(|p| p.get(piece))
            .copied()
            .ok_or_else(|| Error::invalid(&self.path, "internal error: no such factor"))?;
        let mut bytes = vec![0u8; len];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(bytes)
    }
}

/// Fits every group in the factored form (ahead of this loop, through a [`Pipeline`]), writing
/// the encoded factors in group order to a new scratch file at `spill_path`. Returns the reports in
/// group order and the spill.
pub fn factor_pass(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    inputs: &FitInputs,
    spill_path: &Path,
    progress: &ProgressBar,
) -> Result<(Vec<GroupReport>, Spill)> {
    progress.set_length(groups.len() as u64);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(spill_path)
        .map_err(|e| Error::io(spill_path, e))?;
    let mut reports = Vec::with_capacity(groups.len());
    let mut pieces = Vec::with_capacity(groups.len());
    let mut offset = 0u64;
    let order: Vec<usize> = (0..groups.len()).collect();
    with_pipeline(
        checkpoint,
        groups,
        &order,
        Emit::Factored,
        inputs,
        |pipeline| {
            for g in 0..groups.len() {
                let out = pipeline.get(g, &checkpoint.dir)?;
                let mut spans = Vec::with_capacity(out.pieces.len());
                for bytes in out.pieces.into_iter().flatten() {
                    file.write_all(&bytes)
                        .map_err(|e| Error::io(spill_path, e))?;
                    spans.push((offset, bytes.len()));
                    offset += bytes.len() as u64;
                }
                pieces.push(spans);
                reports.push(out.report);
                pipeline.done();
                progress.inc(1);
            }
            Ok(())
        },
    )?;
    Ok((
        reports,
        Spill {
            file,
            path: spill_path.to_path_buf(),
            pieces,
        },
    ))
}

/// `up @ down` of two input factors, encoded in `up`'s dtype.
fn expand_tensor(checkpoint: &Checkpoint, down: usize, up: usize) -> Result<Vec<u8>> {
    let (a, b) = (&checkpoint.tensors[down], &checkpoint.tensors[up]);
    let decoded = |t: &crate::checkpoint::TensorEntry| {
        let ft = FloatType::from_dtype(t.dtype).ok_or_else(|| {
            Error::tensor(
                &checkpoint.shards[t.shard].path,
                &t.name,
                format!("dtype {:?} cannot be expanded", t.dtype),
            )
        })?;
        let values = ft.decode(checkpoint.bytes(t));
        checkpoint.release(t);
        Ok::<_, Error>((ft, matrix_from_rows(t.shape[0], t.shape[1], &values)))
    };
    let (_, a_m) = decoded(a)?;
    let (ft, b_m) = decoded(b)?;
    if b_m.ncols() != a_m.nrows() {
        return Err(Error::tensor(
            &checkpoint.shards[b.shard].path,
            &b.name,
            format!(
                "shape {:?} does not fit `{}` {:?}",
                b.shape, a.name, a.shape
            ),
        ));
    }
    Ok(ft.encode(&matrix_to_rows(product(&b_m, &a_m).as_ref())))
}

/// Bytes of a copied tensor written (and then released from the input map) at a time.
const COPY_CHUNK: usize = 16 << 20;

/// Produces every output tensor in plan order and hands it to `sink`; group outputs come from
/// `pieces`. Copied tensors go through in chunks, each released from the input map once written;
/// the input files are hashed on the way (`hasher`).
pub fn execute(
    checkpoint: &Checkpoint,
    plan: &Plan,
    pieces: &mut dyn PieceSource,
    sink: &mut dyn TensorSink,
    hasher: &mut InputHasher,
    progress: &ProgressBar,
) -> Result<()> {
    progress.set_length(plan.data_len());
    for shard in &plan.shards {
        sink.begin_shard(shard)?;
        for tensor in &shard.tensors {
            match tensor.op {
                Op::Copy { tensor: index } => {
                    let t = &checkpoint.tensors[index];
                    let bytes = checkpoint.bytes(t);
                    sink.begin_tensor(tensor)?;
                    let mut at = 0;
                    while at < bytes.len() {
                        let end = (at + COPY_CHUNK).min(bytes.len());
                        sink.write_part(&bytes[at..end])?;
                        let range = t.range.start + at..t.range.start + end;
                        hasher.advance(checkpoint, t.shard, range.end);
                        checkpoint.release_range(t.shard, range);
                        at = end;
                    }
                    sink.end_tensor()?;
                }
                Op::Computed { group, piece } => {
                    let bytes = pieces.take(checkpoint, plan, group, piece)?;
                    sink.write_tensor(tensor, &bytes)?;
                    // A dense output replaces the input tensor of the same name.
                    if let Some(t) = checkpoint.tensor(&tensor.name) {
                        hasher.visit(checkpoint, t);
                    }
                }
                Op::Expand { down, up } => {
                    let bytes = expand_tensor(checkpoint, down, up)?;
                    sink.write_tensor(tensor, &bytes)?;
                    hasher.visit(checkpoint, &checkpoint.tensors[down]);
                    hasher.visit(checkpoint, &checkpoint.tensors[up]);
                }
            }
            progress.inc(tensor.byte_len as u64);
        }
        sink.finish_shard()?;
    }
    Ok(())
}

/// Fits run ahead of their consumer: groups are fitted in `order` on the thread pool, at most
/// [`window`] of them computed or waiting at a time, and handed over in any order; the consumer
/// takes them by index and says when it is done with one, which lets the next start. So the
/// fits of the next layers overlap the writing of this one, and memory stays bounded.
pub struct Pipeline {
    results: Receiver<(usize, Result<GroupOutput>)>,
    tokens: Receiver<()>,
    ready: HashMap<usize, Result<GroupOutput>>,
}

/// Groups in flight at once: twice the worker threads, so that every worker has a next group
/// while the consumer drains the last.
fn window() -> usize {
    2 * rayon::current_num_threads().max(1)
}

impl Pipeline {
    /// Waits for group `g`'s output (each group is taken once); `dir` names the checkpoint in the
    /// internal error of a group that never comes.
    fn get(&mut self, g: usize, dir: &Path) -> Result<GroupOutput> {
        loop {
            if let Some(r) = self.ready.remove(&g) {
                return r;
            }
            crate::interrupt::check()?;
            match self
                .results
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                Ok((i, r)) => {
                    self.ready.insert(i, r);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::invalid(
                        dir,
                        format!("internal error: the fit of group {g} was never produced"),
                    ))
                }
            }
        }
    }

    /// The consumer is done with one group: one more may start.
    fn done(&mut self) {
        let _ = self.tokens.recv();
    }
}

/// Runs `consume` with a [`Pipeline`] fitting `order` (group indices into `groups`) in `emit` form.
pub fn with_pipeline<R>(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    order: &[usize],
    emit: Emit,
    inputs: &FitInputs,
    consume: impl FnOnce(&mut Pipeline) -> Result<R>,
) -> Result<R> {
    let cancel = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (results_tx, results) = mpsc::channel();
        let (tokens_tx, tokens) = mpsc::sync_channel::<()>(window());
        let cancel = &cancel;
        scope.spawn(move || {
            rayon::in_place_scope(|s| {
                for &g in order {
                    if cancel.load(Ordering::Relaxed)
                        || crate::interrupt::requested()
                        || tokens_tx.send(()).is_err()
                    {
                        break;
                    }
                    let results_tx = results_tx.clone();
                    s.spawn(move |_| {
                        if cancel.load(Ordering::Relaxed) || crate::interrupt::requested() {
                            return;
                        }
                        let r = run_group(checkpoint, &groups[g], emit, inputs);
                        let _ = results_tx.send((g, r));
                    });
                }
            });
        });
        let mut pipeline = Pipeline {
            results,
            tokens,
            ready: HashMap::new(),
        };
        let out = consume(&mut pipeline);
        cancel.store(true, Ordering::Relaxed);
        drop(pipeline);
        out
    })
}

/// The groups in the order the plan's writes first need them.
pub fn need_order(plan: &Plan) -> Vec<usize> {
    let mut seen = vec![false; plan.groups.len()];
    let mut order = Vec::with_capacity(plan.groups.len());
    for shard in &plan.shards {
        for t in &shard.tensors {
            if let Op::Computed { group, .. } = t.op {
                if !std::mem::replace(&mut seen[group], true) {
                    order.push(group);
                }
            }
        }
    }
    order
}

/// Dense output through a [`Pipeline`]: groups are fitted ahead of the write pass, in the order it
/// needs them.
pub struct Pipelined<'p> {
    pipeline: &'p mut Pipeline,
    reports: Vec<Option<GroupReport>>,
    pending: HashMap<usize, Vec<Option<Vec<u8>>>>,
}

impl<'p> Pipelined<'p> {
    /// Serves the outputs of `groups` groups from `pipeline`.
    pub fn new(pipeline: &'p mut Pipeline, groups: usize) -> Self {
        Pipelined {
            pipeline,
            reports: vec![None; groups],
            pending: HashMap::new(),
        }
    }

    /// The reports of every group computed, in group order.
    pub fn into_reports(self) -> Vec<GroupReport> {
        self.reports.into_iter().flatten().collect()
    }
}

impl PieceSource for Pipelined<'_> {
    fn take(
        &mut self,
        checkpoint: &Checkpoint,
        _plan: &Plan,
        group: usize,
        piece: usize,
    ) -> Result<Vec<u8>> {
        if self.reports.get(group).is_some_and(Option::is_none) {
            let out = self.pipeline.get(group, &checkpoint.dir)?;
            self.reports[group] = Some(out.report);
            self.pending.insert(group, out.pieces);
        }
        let bytes = self
            .pending
            .get_mut(&group)
            .and_then(|m| m.get_mut(piece))
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::invalid(&checkpoint.dir, "internal error: output produced twice")
            })?;
        if self
            .pending
            .get(&group)
            .is_some_and(|m| m.iter().all(Option::is_none))
        {
            self.pending.remove(&group);
            self.pipeline.done();
        }
        Ok(bytes)
    }
}
