//! The pure planning stage: from an opened checkpoint and the surgery options, decide every output
//! tensor (name, dtype, shape, shard, operation) and every output file before a byte is written.
//! `--dry-run` prints this plan; the executor and the writer only consume it.
//!
//! A conversion is planned in two steps: [`groups`] picks the matrices to fit, then [`plan`] lays
//! out the output; the factored form needs each group's latent width first (the ranks the
//! thresholds select), the dense form does not. [`plan_expand`] lays out `expand`.

use crate::model::arch::{Factor, Role};
use crate::input::checkpoint::Checkpoint;
use crate::model::layout::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::fit::decompose::Fit;
use crate::error::{Error, Result};
use crate::model::latent::{self, KvMode, LatentAttention};
use crate::fit::spec::Spec;
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
    /// The SPEC the fit uses: the given one, or the rank a budget was resolved to.
    pub fn effective_spec(&self) -> Spec {
        match (self.spec, self.budget_rank) {
            (Spec::Budget(_), Some(rank)) => Spec::Rank(rank),
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
    /// The layer.
    pub layer: usize,
    /// What is fitted.
    pub kind: GroupKind,
    /// How many components to keep, as given.
    pub spec: Spec,
    /// The rank a `budget:F` SPEC was resolved to (`budget::allocate`); `None` otherwise.
    pub budget_rank: Option<usize>,
    /// The reconstruction.
    pub fit: Fit,
    /// Indices into [`Checkpoint::tensors`], stacked in this order.
    pub members: Vec<usize>,
}

/// How an output tensor's bytes are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// `up @ down` of two input factors, in `up`'s dtype (`expand`).
    Expand {
        /// Index of the down-projection in [`Checkpoint::tensors`].
        down: usize,
        /// Index of the up-projection in [`Checkpoint::tensors`].
        up: usize,
    },
}

/// One output tensor.
#[derive(Debug, Clone)]
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

    /// Human-readable lines, one per output tensor and file (for `--dry-run`).
    pub fn describe(&self, checkpoint: &Checkpoint) -> Vec<String> {
        let mut lines = Vec::new();
        for shard in &self.shards {
            for t in &shard.tensors {
                let op = match t.op {
                    Op::Copy { .. } => "copy".to_string(),
                    Op::Computed { group, piece } => {
                        let g = &self.groups[group];
                        let part = match (self.emit, piece) {
                            (Emit::Dense, _) => "",
                            (Emit::Factored, 0) => " down-projection",
                            (Emit::Factored, _) => " up-projection",
                        };
                        format!("{} {} fit={}{part}", g.kind.name(), g.spec, g.fit.name())
                    }
                    Op::Expand { down, up } => format!(
                        "expand {} @ {}",
                        checkpoint.tensors[up].name, checkpoint.tensors[down].name
                    ),
                };
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

/// Picks the matrices to fit, layer by layer: q, shared K/V, k, v as requested.
pub fn groups(checkpoint: &Checkpoint, surgery: &Surgery) -> Vec<GroupPlan> {
    let arch = checkpoint.config.arch;
    let mut groups = Vec::new();
    let index_of = |layer: usize, role: Role| {
        arch.layer_tensor_name(layer, role)
            .and_then(|n| checkpoint.tensor_index(&n))
    };
    for layer in 0..checkpoint.config.num_layers {
        let mut add = |kind: GroupKind, spec: Option<Spec>, roles: &[Role]| {
            let Some(spec) = spec else { return };
            let members: Vec<usize> = roles.iter().filter_map(|&r| index_of(layer, r)).collect();
            if members.len() != roles.len() {
                return; // unreachable: Checkpoint::open checked every projection exists
            }
            groups.push(GroupPlan {
                layer,
                kind,
                spec,
                budget_rank: None,
                fit: surgery.fit,
                members,
            });
        };
        add(GroupKind::Q, surgery.q, &[Role::Query]);
        add(
            GroupKind::SharedKv,
            surgery.shared_kv,
            &[Role::Key, Role::Value],
        );
        add(GroupKind::K, surgery.k, &[Role::Key]);
        add(GroupKind::V, surgery.v, &[Role::Value]);
    }
    groups
}

/// An output tensor before sharding: where it would live without re-sharding, and its sort key.
struct Placed {
    tensor: TensorPlan,
    /// Index of the input shard it belongs with.
    home: usize,
    /// Model order: embeddings, layers by number, the rest.
    key: (u8, usize, String),
}

fn order_key(checkpoint: &Checkpoint, input: usize, name: &str) -> (u8, usize, String) {
    let t = &checkpoint.tensors[input];
    match t.class.layer {
        Some(layer) => (1, layer, name.to_string()),
        None if name.contains("embed") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

fn placed(checkpoint: &Checkpoint, input: usize, tensor: TensorPlan) -> Placed {
    Placed {
        key: order_key(checkpoint, input, &tensor.name),
        home: checkpoint.tensors[input].shard,
        tensor,
    }
}

fn byte_len(dtype: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * dtype.bitsize() / 8
}

/// Lays out a conversion's output: the groups' outputs in `layout`, every other tensor copied, the
/// other files copied (for the factored layout, `config.json` rewritten and the loading module
/// added).
pub fn plan(
    checkpoint: &Checkpoint,
    groups: Vec<GroupPlan>,
    layout: &Layout,
    max_shard_size: Option<u64>,
) -> Result<Plan> {
    let c = &checkpoint.config;
    let mut member_of: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        for (m, &tensor) in group.members.iter().enumerate() {
            member_of.insert(tensor, (g, m));
        }
    }
    let mut out: Vec<Placed> = Vec::new();
    for (index, t) in checkpoint.tensors.iter().enumerate() {
        let op = match (member_of.get(&index), layout) {
            (None, _) => Op::Copy { tensor: index },
            (Some(&(group, member)), Layout::Dense) => Op::Computed {
                group,
                piece: member,
            },
            (Some(_), Layout::Factored { .. }) => continue,
        };
        let tensor = TensorPlan {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            byte_len: t.range.len(),
            op,
        };
        out.push(placed(checkpoint, index, tensor));
    }
    let mut files = Vec::new();
    if let Layout::Factored { latents } = layout {
        let mut latent = LatentAttention {
            fit: groups.first().map_or("pca", |g| g.fit.name()).to_string(),
            kv: None,
            kv_rank: None,
            q_rank: None,
            k_rank: None,
            v_rank: None,
            original_architectures: c
                .raw
                .get("architectures")
                .cloned()
                .unwrap_or_else(|| serde_json::json!([c.class_name])),
            original_model_type: c
                .raw
                .get("model_type")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
        };
        for (g, group) in groups.iter().enumerate() {
            let width = latents.get(g).copied().unwrap_or(0);
            let first = &checkpoint.tensors[group.members[0]];
            let bias_name = first.name.replace(".weight", ".bias");
            if checkpoint.tensor(&bias_name).is_some() {
                return Err(Error::tensor(
                    &checkpoint.shards[first.shard].path,
                    &bias_name,
                    "--emit factored: the factored form has no bias terms; use --emit dense for models with attention biases",
                ));
            }
            let (down, ups) = group.kind.factors();
            let name = |factor: Factor| {
                c.arch
                    .layer_tensor_name(group.layer, Role::Factor(factor))
                    .ok_or_else(|| {
                        Error::invalid(
                            &checkpoint.dir,
                            format!("the {} name table has no factored names", c.arch.family),
                        )
                    })
            };
            let cols = first.shape[1];
            let shape = vec![width, cols];
            out.push(placed(
                checkpoint,
                group.members[0],
                TensorPlan {
                    name: name(down)?,
                    dtype: first.dtype,
                    byte_len: byte_len(first.dtype, &shape),
                    shape,
                    op: Op::Computed { group: g, piece: 0 },
                },
            ));
            for (m, (&member, &up)) in group.members.iter().zip(ups).enumerate() {
                let t = &checkpoint.tensors[member];
                let shape = vec![t.shape[0], width];
                out.push(placed(
                    checkpoint,
                    member,
                    TensorPlan {
                        name: name(up)?,
                        dtype: t.dtype,
                        byte_len: byte_len(t.dtype, &shape),
                        shape,
                        op: Op::Computed {
                            group: g,
                            piece: m + 1,
                        },
                    },
                ));
            }
            let slot = match group.kind {
                GroupKind::Q => &mut latent.q_rank,
                GroupKind::K => &mut latent.k_rank,
                GroupKind::V => &mut latent.v_rank,
                GroupKind::SharedKv => &mut latent.kv_rank,
            };
            slot.get_or_insert_with(|| vec![0; c.num_layers])[group.layer] = width;
            latent.kv = match group.kind {
                GroupKind::SharedKv => Some(KvMode::Shared),
                GroupKind::K | GroupKind::V => Some(KvMode::Separate),
                GroupKind::Q => latent.kv,
            };
        }
        let config = latent::factored_config(&c.raw, &latent);
        files.push(OutputFile {
            relative: CONFIG_FILE.into(),
            source: FileSource::Generated {
                bytes: latent::to_pretty_bytes(&config, Path::new(CONFIG_FILE))?,
                what: "config.json rewritten for the factored form (latent_attention, auto_map)",
            },
        });
        files.push(OutputFile {
            relative: latent::MODULE_FILE.into(),
            source: FileSource::Generated {
                bytes: latent::MODULE_SOURCE.as_bytes().to_vec(),
                what: "the transformers module that loads the factored form",
            },
        });
    }
    let emit = match layout {
        Layout::Dense => Emit::Dense,
        Layout::Factored { .. } => Emit::Factored,
    };
    Ok(assemble(
        checkpoint,
        emit,
        groups,
        out,
        files,
        max_shard_size,
    ))
}

/// Lays out `expand`: every factor pair of a factored checkpoint multiplied back into the dense
/// projection it replaced (original name, the up-projection's dtype and shard), every other tensor
/// copied, `config.json` restored, the loading module dropped.
pub fn plan_expand(checkpoint: &Checkpoint, latent: &LatentAttention) -> Result<Plan> {
    let c = &checkpoint.config;
    let mut out = Vec::new();
    for (index, t) in checkpoint.tensors.iter().enumerate() {
        let (Role::Factor(factor), Some(layer)) = (t.class.role, t.class.layer) else {
            out.push(placed(
                checkpoint,
                index,
                TensorPlan {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    byte_len: t.range.len(),
                    op: Op::Copy { tensor: index },
                },
            ));
            continue;
        };
        let shared = latent.kv == Some(KvMode::Shared);
        let (dense, down) = match factor {
            Factor::QUp => (Role::Query, Factor::QDown),
            Factor::KUp if shared => (Role::Key, Factor::KvDown),
            Factor::KUp => (Role::Key, Factor::KDown),
            Factor::VUp if shared => (Role::Value, Factor::KvDown),
            Factor::VUp => (Role::Value, Factor::VDown),
            Factor::QDown | Factor::KvDown | Factor::KDown | Factor::VDown => continue,
        };
        let lookup = |role: Role| {
            c.arch
                .layer_tensor_name(layer, role)
                .ok_or_else(|| Error::tensor(&checkpoint.dir, &t.name, "no name for its pair"))
        };
        let down_name = lookup(Role::Factor(down))?;
        let down_index = checkpoint.tensor_index(&down_name).ok_or_else(|| {
            Error::tensor(
                &checkpoint.shards[t.shard].path,
                &down_name,
                format!("missing (needed to expand `{}`)", t.name),
            )
        })?;
        let shape = vec![t.shape[0], checkpoint.tensors[down_index].shape[1]];
        out.push(placed(
            checkpoint,
            index,
            TensorPlan {
                name: lookup(dense)?,
                dtype: t.dtype,
                byte_len: byte_len(t.dtype, &shape),
                shape,
                op: Op::Expand {
                    down: down_index,
                    up: index,
                },
            },
        ));
    }
    let config = latent::dense_config(&c.raw, latent);
    let files = vec![OutputFile {
        relative: CONFIG_FILE.into(),
        source: FileSource::Generated {
            bytes: latent::to_pretty_bytes(&config, Path::new(CONFIG_FILE))?,
            what: "config.json restored to the original architecture",
        },
    }];
    Ok(assemble(
        checkpoint,
        Emit::Dense,
        Vec::new(),
        out,
        files,
        None,
    ))
}

/// Assigns output tensors to shards (the input's, or new ones of at most `max_shard_size`) and adds
/// the input's other files as copies, except those in `generated`.
fn assemble(
    checkpoint: &Checkpoint,
    emit: Emit,
    groups: Vec<GroupPlan>,
    mut out: Vec<Placed>,
    generated: Vec<OutputFile>,
    max_shard_size: Option<u64>,
) -> Plan {
    let assignment: Vec<(String, BTreeMap<String, String>, Vec<TensorPlan>)> = match max_shard_size
    {
        None => {
            let mut bins: Vec<Vec<TensorPlan>> = vec![Vec::new(); checkpoint.shards.len()];
            for p in out {
                if let Some(bin) = bins.get_mut(p.home) {
                    bin.push(p.tensor);
                }
            }
            checkpoint
                .shards
                .iter()
                .zip(bins)
                .map(|(shard, tensors)| (shard.file_name.clone(), shard.metadata.clone(), tensors))
                .collect()
        }
        Some(max) => {
            out.sort_by(|a, b| a.key.cmp(&b.key));
            let mut bins: Vec<Vec<TensorPlan>> = Vec::new();
            let mut current = 0u64;
            for p in out {
                let len = p.tensor.byte_len as u64;
                match bins.last_mut() {
                    Some(bin) if current + len <= max => {
                        bin.push(p.tensor);
                        current += len;
                    }
                    _ => {
                        bins.push(vec![p.tensor]);
                        current = len;
                    }
                }
            }
            let n = bins.len();
            let metadata = checkpoint
                .shards
                .first()
                .map(|s| s.metadata.clone())
                .unwrap_or_default();
            bins.into_iter()
                .enumerate()
                .map(|(k, tensors)| {
                    let name = if n == 1 {
                        SINGLE_FILE.to_string()
                    } else {
                        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                    };
                    (name, metadata.clone(), tensors)
                })
                .collect()
        }
    };

    let shards: Vec<ShardPlan> = assignment
        .into_iter()
        .map(|(file_name, mut metadata, mut tensors)| {
            metadata
                .entry("format".into())
                .or_insert_with(|| "pt".into());
            tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
            ShardPlan {
                file_name,
                metadata,
                tensors,
            }
        })
        .collect();
    let write_index = match max_shard_size {
        None => checkpoint.indexed,
        Some(_) => shards.len() > 1,
    };
    let replaced = |relative: &Path| {
        relative == Path::new(latent::MODULE_FILE)
            || generated.iter().any(|g| g.relative == relative)
    };
    let mut files: Vec<OutputFile> = checkpoint
        .other_files
        .iter()
        .filter(|relative| !replaced(relative))
        .map(|relative| OutputFile {
            relative: relative.clone(),
            source: FileSource::Copy,
        })
        .collect();
    files.extend(generated);
    files.sort_by(|a, b| a.relative.cmp(&b.relative));
    Plan {
        emit,
        shards,
        groups,
        write_index,
        files,
    }
}
