//! The pure planning stage: from an opened checkpoint and the surgery options, decide every output
//! tensor (name, dtype, shape, shard, operation) and every output file before a byte is written.
//! `--dry-run` prints this plan; the executor and the writer only consume it.
//!
//! A conversion is planned in two steps: [`groups()`] picks the matrices to fit, then [`plan()`]
//! lays out the output; the factored form needs each group's latent width first (the ranks the
//! thresholds select), the dense form does not. [`plan_expand()`] lays out `expand`.
//!
//! This file holds the plan's types (and `byte_len` and `copied`, which the layouts share); the
//! work is split by job: `groups` (the matrices to fit), `layout` (a conversion's tensors, dense or
//! factored), `factored` (the factored form's tensors and generated files), `expand` (`expand`'s
//! layout), `fused` (a family's fused tensors written back whole) and `shards` (ordering and shard
//! assignment).

mod expand;
mod factored;
mod fused;
mod groups;
mod layout;
mod shards;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compensate;
#[cfg(test)]
mod tests_shared;

pub use crate::model::latent::Share;
pub use expand::plan_expand;
pub use groups::{groups, layer_groups};
pub use layout::{compensated_tensors, plan};

use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::checkpoint::{Checkpoint, TensorEntry};
use crate::model::arch::Factor;
use crate::model::layout::INDEX_FILE;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which projections to rewrite, and how. Built from the command line by `options`.
#[derive(Debug, Clone, PartialEq)]
pub struct Surgery {
    /// Per-matrix fit of `q_proj`.
    pub q: Option<Spec>,
    /// Per-matrix fit of `k_proj` (exclusive with `shared_kv`).
    pub k: Option<Spec>,
    /// Per-matrix fit of `v_proj` (exclusive with `shared_kv`).
    pub v: Option<Spec>,
    /// One fit of the stacked `[k_proj; v_proj]`.
    pub shared_kv: Option<Spec>,
    /// The reconstruction used for every fit.
    pub fit: Fit,
    /// `--share-layers G` with `G > 1` and `--share`: the shared K/V fit spans groups of adjacent
    /// layers; `None` fits every layer on its own.
    pub sharing: Option<LayerSharing>,
    /// `--compensate`: what calibration refits besides the fitted projections.
    pub compensate: Option<Compensate>,
}

/// A projection that calibration refits after a layer's fits replace its projections, so that
/// the layer's output on the calibration tokens matches the original model's (`--compensate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensate {
    /// `o_proj`, refitted by regularised least squares on the attention heads' outputs.
    OProj,
}

impl Compensate {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            Compensate::OProj => "o_proj",
        }
    }
}

/// Cross-layer sharing of the shared K/V fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSharing {
    /// Layers per group (at least 2; the last group may be shorter).
    pub layers: std::num::NonZeroUsize,
    /// What the layers of a group share.
    pub share: Share,
}

/// The output form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// Reconstructed matrices under their original names: a standard checkpoint.
    Dense,
    /// Down- and up-projections (`docs/factored-format.md`).
    Factored,
}

impl Emit {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Emit::Dense => "dense",
            Emit::Factored => "factored",
        }
    }
}

/// How the computed groups are laid out in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Each member's reconstruction replaces it.
    Dense,
    /// Each group becomes its factors; `latents[g]` is group `g`'s latent width (rank, plus one for
    /// the mean direction of fit `pca`).
    Factored {
        /// Latent width per group.
        latents: Vec<usize>,
    },
}

/// What a decomposition group fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKind {
    /// `q_proj` alone.
    Q,
    /// `k_proj` alone.
    K,
    /// `v_proj` alone.
    V,
    /// `k_proj` and `v_proj` stacked.
    SharedKv,
}

impl GroupPlan {
    /// The layers the group spans, in order.
    pub fn layer_range(&self) -> std::ops::Range<usize> {
        self.layer..self.layer + self.layers
    }

    /// The layers of a group spanning several (empty for a one-layer group), as reports list them.
    pub fn spanned_layers(&self) -> Vec<usize> {
        match self.layers {
            1 => Vec::new(),
            _ => self.layer_range().collect(),
        }
    }

    /// The `(layer, source)` cross moments a shared latent group's fit needs: every later layer
    /// with the group's first layer (none for other groups).
    pub fn cross_pairs(&self) -> Vec<(usize, usize)> {
        match self.share {
            Some(Share::Latent) => (self.layer + 1..self.layer + self.layers)
                .map(|l| (l, self.layer))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The SPEC the fit uses: the given one, or the rank a budget or threshold was resolved to.
    pub fn effective_spec(&self) -> Spec {
        match (self.spec, self.resolved_rank) {
            (Spec::Budget(_) | Spec::Threshold(_), Some(rank)) => Spec::Rank(rank),
            (spec, _) => spec,
        }
    }
}

impl GroupKind {
    /// The factored form's tensors: the down-projection, then one up-projection per member.
    pub fn factors(self) -> (Factor, &'static [Factor]) {
        match self {
            GroupKind::Q => (Factor::QDown, &[Factor::QUp]),
            GroupKind::K => (Factor::KDown, &[Factor::KUp]),
            GroupKind::V => (Factor::VDown, &[Factor::VUp]),
            GroupKind::SharedKv => (Factor::KvDown, &[Factor::KUp, Factor::VUp]),
        }
    }

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Q => "q",
            GroupKind::K => "k",
            GroupKind::V => "v",
            GroupKind::SharedKv => "shared_kv",
        }
    }
}

/// One decomposition: the tensors stacked (in row order) and fitted together.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// The layer (the first layer of a group that spans several).
    pub layer: usize,
    /// Layers the group spans (`layer .. layer + layers`; 1 unless shared across layers).
    pub layers: usize,
    /// What the layers of a multi-layer group share (`None` for a one-layer group).
    pub share: Option<Share>,
    /// What is fitted.
    pub kind: GroupKind,
    /// How many components to keep, as given.
    pub spec: Spec,
    /// The rank the SPEC was resolved to before fitting: a `budget:F` by `budget::allocate`, a
    /// threshold by the factored layout's width pass (`execute::widths`); `None` otherwise.
    pub resolved_rank: Option<usize>,
    /// The reconstruction.
    pub fit: Fit,
    /// Indices into [`Checkpoint::tensors`], stacked in this order.
    pub members: Vec<usize>,
    /// What calibration refits in the group's layers besides its members (`--compensate`).
    pub compensate: Option<Compensate>,
}

/// How an output tensor's bytes are produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Copied byte for byte from input tensor `tensor`.
    Copy {
        /// Index into [`Checkpoint::tensors`].
        tensor: usize,
    },
    /// One output of group `group`: in the dense layout member `piece`'s reconstruction; in the
    /// factored layout the down-projection (`piece` 0) or member `piece - 1`'s up-projection.
    Computed {
        /// Index into [`Plan::groups`].
        group: usize,
        /// Which output of the group.
        piece: usize,
    },
    /// Input tensor `tensor`, layer `layer`'s `o_proj`, as calibration refitted it
    /// (`--compensate o_proj`), in its own dtype.
    Compensated {
        /// The layer.
        layer: usize,
        /// Index into [`Checkpoint::tensors`].
        tensor: usize,
    },
    /// `up @ down` of two input factors, in `up`'s dtype (`expand`).
    Expand {
        /// Index of the down-projection in [`Checkpoint::tensors`].
        down: usize,
        /// Index of the up-projection in [`Checkpoint::tensors`].
        up: usize,
    },
    /// A fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`): its parts' bytes one after the other,
    /// each part planned as a tensor of its own (`plan::fused`).
    Fused {
        /// The parts, top rows first.
        parts: Vec<TensorPlan>,
    },
}

impl Op {
    /// This operation and, for a fused tensor, its parts' (the operations that read inputs).
    pub fn leaves(&self) -> Vec<&Op> {
        match self {
            Op::Fused { parts } => parts.iter().flat_map(|p| p.op.leaves()).collect(),
            op => vec![op],
        }
    }
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    /// Hugging Face name.
    pub name: String,
    /// Storage type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub byte_len: usize,
    /// How to produce it.
    pub op: Op,
}

/// Bytes of a tensor of `dtype` and `shape`.
fn byte_len(dtype: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * dtype.bitsize() / 8
}

/// Input tensor `index` (`t`) copied byte for byte under its own name.
fn copied(index: usize, t: &TensorEntry) -> TensorPlan {
    TensorPlan {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        byte_len: t.range.len(),
        op: Op::Copy { tensor: index },
    }
}

/// One output safetensors file, tensors in the order they are written.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// File name in the output directory.
    pub file_name: String,
    /// Header `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Tensors in file order: by descending dtype alignment, then name (the order the safetensors
    /// library itself writes).
    pub tensors: Vec<TensorPlan>,
}

impl ShardPlan {
    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len as u64).sum()
    }
}

/// Where a non-weight output file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// Copied unchanged from the same path in the input.
    Copy,
    /// Written by this tool: the bytes, and what they are (for `--dry-run`).
    Generated {
        /// The file's contents.
        bytes: Vec<u8>,
        /// A few words on what it is.
        what: &'static str,
    },
}

/// A non-weight output file.
#[derive(Debug, Clone)]
pub struct OutputFile {
    /// Path relative to the output (and, for copies, the input) directory.
    pub relative: PathBuf,
    /// Its contents.
    pub source: FileSource,
}

/// Everything the executor and writer will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The output form.
    pub emit: Emit,
    /// Output weight files.
    pub shards: Vec<ShardPlan>,
    /// Decompositions, in layer order.
    pub groups: Vec<GroupPlan>,
    /// Whether to write `model.safetensors.index.json`.
    pub write_index: bool,
    /// Other files, copied or generated.
    pub files: Vec<OutputFile>,
}

impl Plan {
    /// Total bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.shards.iter().map(ShardPlan::data_len).sum()
    }

    /// The index's `weight_map`: tensor name to shard file.
    pub fn weight_map(&self) -> BTreeMap<&str, &str> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.tensors
                    .iter()
                    .map(move |t| (t.name.as_str(), s.file_name.as_str()))
            })
            .collect()
    }

    /// The files copied from the input, relative paths.
    pub fn copied_files(&self) -> impl Iterator<Item = &Path> {
        self.files
            .iter()
            .filter(|f| f.source == FileSource::Copy)
            .map(|f| f.relative.as_path())
    }

    /// What `op` does, in a few words (for `--dry-run`).
    fn describe_op(&self, checkpoint: &Checkpoint, op: &Op) -> String {
        match op {
            Op::Copy { .. } => "copy".to_string(),
            Op::Computed { group, piece } => {
                let g = &self.groups[*group];
                let part = match (self.emit, piece) {
                    (Emit::Dense, _) => "",
                    (Emit::Factored, 0) => " down-projection",
                    (Emit::Factored, _) => " up-projection",
                };
                format!("{} {} fit={}{part}", g.kind.name(), g.spec, g.fit.name())
            }
            Op::Compensated { .. } => "o_proj compensated (calibration)".to_string(),
            Op::Expand { down, up } => format!(
                "expand {} @ {}",
                checkpoint.tensors[*up].name, checkpoint.tensors[*down].name
            ),
            Op::Fused { parts } => {
                let parts: Vec<String> = parts
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {:?}: {}",
                            p.name,
                            p.shape,
                            self.describe_op(checkpoint, &p.op)
                        )
                    })
                    .collect();
                format!("fused of {}", parts.join("; "))
            }
        }
    }

    /// Human-readable lines, one per output tensor and file (for `--dry-run`).
    pub fn describe(&self, checkpoint: &Checkpoint) -> Vec<String> {
        let mut lines = Vec::new();
        for shard in &self.shards {
            for t in &shard.tensors {
                let op = self.describe_op(checkpoint, &t.op);
                lines.push(format!(
                    "{}  {}  {:?} {:?}  {}",
                    shard.file_name, t.name, t.dtype, t.shape, op
                ));
            }
        }
        if self.write_index {
            lines.push(format!(
                "{INDEX_FILE}  (index of {} shards)",
                self.shards.len()
            ));
        }
        for f in &self.files {
            lines.push(match &f.source {
                FileSource::Copy => format!(
                    "{}  copied from {}",
                    f.relative.display(),
                    checkpoint.dir.join(&f.relative).display()
                ),
                FileSource::Generated { bytes, what } => {
                    format!("{}  {what} ({} bytes)", f.relative.display(), bytes.len())
                }
            });
        }
        lines
    }
}
