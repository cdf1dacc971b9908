//! The executor: fits the plan's groups (in parallel across matrices) and walks the plan shard by
//! shard and tensor by tensor, handing bytes to a sink.
//!
//! Fits run ahead of the writer through a [`pipeline::Pipeline`] in the order the write pass needs them, so
//! only the groups in flight are held in memory; the write pass takes them as its tensors come due
//! ([`pipeline::Pipelined`]). Factored output needs every latent width before the layout exists:
//! [`widths`] decides them first (a threshold from the fit's decomposing half, whose basis the
//! write pass's fit then finishes; a rank from nothing) and pins each fit to its width. Input pages are released as soon as they have been consumed.
//!
//! [`prepare`] computes what the fits need first (calibration, budgets); [`write`] runs a
//! conversion's write pass; [`input_hash`] hashes the input on the way.

pub(crate) mod group;
pub(crate) mod input_hash;
pub mod inputs;
pub(crate) mod kept_bases;
pub(crate) mod kept_spectra;
pub(crate) mod pipeline;
pub(crate) mod shared;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_fused;
#[cfg(test)]
mod tests_shared;
pub(crate) mod weighting;
pub(crate) mod widths;
pub(crate) mod write;

pub use group::{fit_and_encode, reports_only, spectra};
pub use inputs::{
    AttentionStats, CalibrationRecord, CompensatedProjection, CompensationReport, FitInputs,
    SequentialMoments,
};
pub use kept_spectra::KeptSpectra;

use crate::error::{Error, Result};
use crate::execute::input_hash::Pace;
use crate::fit::decompose::{matrix_from_rows, matrix_to_rows, product};
use crate::input::checkpoint::{Checkpoint, TensorEntry};
use crate::output::sink::TensorSink;
use crate::plan::{Emit, Layout, Op, Plan};
use indicatif::ProgressBar;
use serde::Serialize;

/// What one decomposition kept and cost, as recorded in `surgery.json`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// Layer index (the first layer of a group spanning several).
    pub layer: usize,
    /// Every layer of a group spanning several (`--share-layers`; absent for one layer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    /// What the layers share: `basis` or `latent` (absent for one layer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share: Option<&'static str>,
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
    /// For a calibrated group spanning several layers, per layer: the share of its weighted K/V
    /// output energy the fit keeps on the calibration text (for `latent`, predicted from the
    /// first layer's input).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layer_energy_kept: Vec<f64>,
    /// Seconds the fit and its encoding took (printed, never in `surgery.json`).
    #[serde(skip)]
    pub seconds: f64,
}

impl GroupReport {
    /// Whether the group fits projections of `layer`.
    pub fn covers(&self, layer: usize) -> bool {
        self.layer == layer || self.layers.contains(&layer)
    }
}

/// The output layout for `emit`, given the groups' reports (their latent widths).
pub fn layout(emit: Emit, reports: &[GroupReport]) -> Layout {
    match emit {
        Emit::Dense => Layout::Dense,
        Emit::Factored => Layout::Factored {
            latents: reports.iter().map(|r| r.latent).collect(),
        },
    }
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
        Err(Error::bug(format!(
            "{}: output of group {group} asked of a plan without groups",
            checkpoint.dir.display()
        )))
    }
}

/// `up @ down` of two input factors, encoded in `up`'s dtype.
fn expand_tensor(checkpoint: &Checkpoint, down: usize, up: usize) -> Result<Vec<u8>> {
    let (a, b) = (&checkpoint.tensors[down], &checkpoint.tensors[up]);
    let decoded = |t: &TensorEntry| {
        let ft = checkpoint.float_type(t, "expanded")?;
        let values = ft.decode(checkpoint.bytes(t));
        checkpoint.release(t);
        // A factored input is checked as a dense one is before its fit: by tensor, before use.
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            let layer = t
                .class
                .layer
                .map_or_else(String::new, |l| format!("layer {l}: "));
            return Err(checkpoint.tensor_error(
                t,
                format!("{layer}{bad} non-finite values (NaN or infinite); a factor to expand must be finite"),
            ));
        }
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
    Ok(ft.encode(&matrix_to_rows(
        product(b_m.as_ref(), a_m.as_ref()).as_ref(),
    )))
}

/// Bytes of a copied tensor written (and then released from the input map) at a time.
const COPY_CHUNK: usize = 16 << 20;

/// What the write pass reads from: the input, the plan and the fitted outputs.
struct Sources<'a, 'p> {
    checkpoint: &'a Checkpoint,
    plan: &'a Plan,
    pieces: &'a mut (dyn PieceSource + 'p),
    inputs: &'a FitInputs,
}

/// Produces every output tensor in plan order and hands it to `sink`; group outputs come from
/// `pieces`, compensated tensors from `inputs`. Copied tensors go through in chunks, each released
/// from the input map once written. Each finished tensor is reported to `pace` (the input hasher
/// running beside the write pass, [`input_hash::hash_alongside`]).
pub fn execute(
    checkpoint: &Checkpoint,
    plan: &Plan,
    pieces: &mut dyn PieceSource,
    inputs: &FitInputs,
    sink: &mut dyn TensorSink,
    pace: &Pace,
    progress: &ProgressBar,
) -> Result<()> {
    progress.set_length(plan.data_len());
    let mut sources = Sources {
        checkpoint,
        plan,
        pieces,
        inputs,
    };
    for shard in &plan.shards {
        sink.begin_shard(shard)?;
        for tensor in &shard.tensors {
            sink.begin_tensor(tensor)?;
            sources.write(&tensor.op, &tensor.name, sink)?;
            sink.end_tensor()?;
            pace.advance(tensor.byte_len as u64);
            progress.inc(tensor.byte_len as u64);
        }
        sink.finish_shard()?;
    }
    Ok(())
}

impl Sources<'_, '_> {
    /// Writes the bytes of `op` (output tensor `name`, or a part of a fused one) into the tensor
    /// `sink` has open.
    fn write(&mut self, op: &Op, name: &str, sink: &mut dyn TensorSink) -> Result<()> {
        let checkpoint = self.checkpoint;
        match *op {
            Op::Copy { tensor: index } => {
                let t = &checkpoint.tensors[index];
                let bytes = checkpoint.bytes(t);
                let mut at = 0;
                while at < bytes.len() {
                    let end = (at + COPY_CHUNK).min(bytes.len());
                    sink.write_part(&bytes[at..end])?;
                    checkpoint.release_range(t.shard, t.range.start + at..t.range.start + end);
                    at = end;
                }
            }
            Op::Computed { group, piece } => {
                let bytes = self.pieces.take(checkpoint, self.plan, group, piece)?;
                sink.write_part(&bytes)?;
            }
            Op::Compensated {
                layer,
                tensor: index,
            } => {
                let bytes = self
                    .inputs
                    .compensated
                    .get(&layer)
                    .filter(|c| c.tensor == index)
                    .map(|c| c.bytes.load())
                    .ok_or_else(|| {
                        Error::bug(format!(
                            "{name}: layer {layer}'s o_proj was planned compensated but never refitted"
                        ))
                    })?;
                sink.write_part(&bytes?)?;
            }
            Op::Expand { down, up } => {
                let bytes = expand_tensor(checkpoint, down, up)?;
                sink.write_part(&bytes)?;
            }
            Op::Fused { ref parts } => {
                for part in parts {
                    self.write(&part.op, &part.name, sink)?;
                }
            }
        }
        Ok(())
    }
}
