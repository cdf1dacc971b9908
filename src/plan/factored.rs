//! The factored layout (`docs/factored-format.md`): each group's down- and up-projections, and the
//! files that describe and load them (`config.json` with `latent_attention`, the module).

use super::shards::{placed, Placed};
use super::{byte_len, copied, FileSource, GroupKind, GroupPlan, Op, OutputFile, TensorPlan};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::{Factor, Role};
use crate::model::config::ModelConfig;
use crate::model::latent::{self, KvMode, KvSharing, LatentAttention};
use crate::model::layout::CONFIG_FILE;
use std::path::Path;

/// Appends every group's factors to `out` (group `g` of latent width `latents[g]`); returns the
/// generated files: the rewritten `config.json` and the loading module.
pub(super) fn factor_groups(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    latents: &[usize],
    out: &mut Vec<Placed>,
) -> Result<Vec<OutputFile>> {
    let c = &checkpoint.config;
    bias_copies(checkpoint, groups, out)?;
    let mut latent = description(c, groups);
    for (g, group) in groups.iter().enumerate() {
        let width = latents.get(g).copied().unwrap_or(0);
        factor_tensors(checkpoint, g, group, width, out)?;
        record_width(&mut latent, group, width, c.num_layers);
    }
    generated_files(c, &latent)
}

/// The `latent_attention` description before any group is recorded: the fit and the original
/// architecture, nothing factored yet.
fn description(c: &ModelConfig, groups: &[GroupPlan]) -> LatentAttention {
    LatentAttention {
        fit: groups.first().map_or("pca", |g| g.fit.name()).to_string(),
        kv: None,
        kv_rank: None,
        q_rank: None,
        k_rank: None,
        v_rank: None,
        kv_sharing: sharing(c, groups),
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
    }
}

/// The `kv_groups` of groups that span several layers (`None` when every group is one layer's):
/// every layer's group, one-layer groups included, so the list covers all layers.
fn sharing(c: &ModelConfig, groups: &[GroupPlan]) -> Option<KvSharing> {
    let share = groups.iter().find_map(|g| g.share)?;
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let mut layer = 0;
    while layer < c.num_layers {
        let run: Vec<usize> = groups
            .iter()
            .find(|g| g.kind == GroupKind::SharedKv && g.layer == layer)
            .map_or_else(|| vec![layer], |g| g.layer_range().collect());
        layer += run.len().max(1);
        runs.push(run);
    }
    Some(KvSharing {
        share,
        groups: runs,
    })
}

/// Appends group `g`'s down-projection `[width, cols]` (under the group's first layer) and one
/// up-projection `[rows, width]` per member (under the member's layer), each placed with the
/// member it comes from.
fn factor_tensors(
    checkpoint: &Checkpoint,
    g: usize,
    group: &GroupPlan,
    width: usize,
    out: &mut Vec<Placed>,
) -> Result<()> {
    let c = &checkpoint.config;
    let first = &checkpoint.tensors[group.members[0]];
    let (down, ups) = group.kind.factors();
    let name = |layer: usize, factor: Factor| {
        c.arch
            .layer_tensor_name(layer, Role::Factor(factor))
            .ok_or_else(|| {
                Error::invalid(
                    &checkpoint.dir,
                    format!("the {} name table has no factored names", c.arch.family),
                )
            })
    };
    let shape = vec![width, first.shape[1]];
    out.push(placed(
        checkpoint,
        group.members[0],
        TensorPlan {
            name: name(group.layer, down)?,
            dtype: first.dtype,
            byte_len: byte_len(first.dtype, &shape),
            shape,
            op: Op::Computed { group: g, piece: 0 },
        },
    ));
    // A group of several layers lists each layer's members in turn.
    for (m, (&member, &up)) in group.members.iter().zip(ups.iter().cycle()).enumerate() {
        let t = &checkpoint.tensors[member];
        let layer = t.class.layer.unwrap_or(group.layer);
        let shape = vec![t.shape[0], width];
        out.push(placed(
            checkpoint,
            member,
            TensorPlan {
                name: name(layer, up)?,
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
    Ok(())
}

/// The biases of the groups' members, which the factored form moves onto the up-projections
/// (`q_b_proj.bias`, ...): by bias tensor index, the member's layer and the bias's new role.
/// Refuses a bias the family's factored form cannot hold (Llama's has no bias terms).
pub(super) fn moved_biases(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
) -> Result<Vec<(usize, usize, Role)>> {
    let arch = checkpoint.config.arch;
    let mut out = Vec::new();
    for &member in groups.iter().flat_map(|g| &g.members) {
        let t = &checkpoint.tensors[member];
        let Some((bias, layer)) = t.class.role.bias().zip(t.class.layer) else {
            continue;
        };
        let Some(bias_name) = arch.layer_tensor_name(layer, bias) else {
            continue;
        };
        let Some(index) = checkpoint.tensor_index(&bias_name) else {
            continue;
        };
        let up = match bias {
            Role::AttentionBias(p) => Factor::up_of(p),
            _ => None,
        };
        match up.map(Role::FactorBias).filter(|_| arch.factored_biases()) {
            Some(role) => out.push((index, layer, role)),
            None => {
                return Err(Error::tensor(
                    &checkpoint.shards[t.shard].path,
                    &bias_name,
                    "--emit factored: the factored form has no bias terms; use --emit dense for models with attention biases",
                ))
            }
        }
    }
    Ok(out)
}

/// Appends the moved biases ([`moved_biases`]), each copied under its up-projection's name.
fn bias_copies(checkpoint: &Checkpoint, groups: &[GroupPlan], out: &mut Vec<Placed>) -> Result<()> {
    let arch = checkpoint.config.arch;
    for (index, layer, role) in moved_biases(checkpoint, groups)? {
        let name = arch
            .layer_tensor_name(layer, role)
            .ok_or_else(|| Error::bug(format!("the {} name table has no {role:?}", arch.family)))?;
        let tensor = TensorPlan {
            name,
            ..copied(index, &checkpoint.tensors[index])
        };
        out.push(placed(checkpoint, index, tensor));
    }
    Ok(())
}

/// Records `group`'s latent width (and the K/V mode it implies) in the description.
fn record_width(latent: &mut LatentAttention, group: &GroupPlan, width: usize, num_layers: usize) {
    let slot = match group.kind {
        GroupKind::Q => &mut latent.q_rank,
        GroupKind::K => &mut latent.k_rank,
        GroupKind::V => &mut latent.v_rank,
        GroupKind::SharedKv => &mut latent.kv_rank,
    };
    let widths = slot.get_or_insert_with(|| vec![0; num_layers]);
    for layer in group.layer_range() {
        if let Some(w) = widths.get_mut(layer) {
            *w = width;
        }
    }
    latent.kv = match group.kind {
        GroupKind::SharedKv => Some(KvMode::Shared),
        GroupKind::K | GroupKind::V => Some(KvMode::Separate),
        GroupKind::Q => latent.kv,
    };
}

/// The factored form's generated files: `config.json` rewritten, the transformers module.
fn generated_files(c: &ModelConfig, latent: &LatentAttention) -> Result<Vec<OutputFile>> {
    let classes = &c.arch.factored;
    let config = latent::factored_config(&c.raw, latent, classes);
    let mut files = vec![OutputFile {
        relative: CONFIG_FILE.into(),
        source: FileSource::Generated {
            bytes: latent::to_pretty_bytes(&config, Path::new(CONFIG_FILE))?,
            what: "config.json rewritten for the factored form (latent_attention, auto_map)",
        },
    }];
    for &file in classes.files {
        let source = latent::module_source(file)
            .ok_or_else(|| Error::bug(format!("no source for the module file {file}")))?;
        files.push(OutputFile {
            relative: file.into(),
            source: FileSource::Generated {
                bytes: source.as_bytes().to_vec(),
                what: "the transformers module that loads the factored form",
            },
        });
    }
    Ok(files)
}
