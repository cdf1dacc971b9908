//! `expand`'s layout: a factored checkpoint back to the standard form.

use super::shards::{assemble, placed};
use super::{byte_len, copied, fused, Emit, FileSource, Op, OutputFile, Plan, TensorPlan};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::{Factor, Role};
use crate::model::latent::{self, KvMode, LatentAttention, Share};
use crate::model::layout::CONFIG_FILE;
use std::path::Path;

/// Lays out `expand`: every factor pair of a factored checkpoint multiplied back into the dense
/// projection it replaced (original name, the up-projection's dtype and shard), every other tensor
/// copied (a factored projection's bias back under its dense name), `config.json` restored, the
/// loading module dropped.
pub fn plan_expand(checkpoint: &Checkpoint, latent: &LatentAttention) -> Result<Plan> {
    if let Some(sharing) = &latent.kv_sharing {
        if sharing.share == Share::Latent {
            return Err(Error::invalid(
                checkpoint.dir.join(CONFIG_FILE),
                "latent_attention: kv_share \"latent\" cannot be expanded: the later layers of a group compute their keys and values from the first layer's latent, which a standard Llama cannot express (convert with --share basis for a dense form)",
            ));
        }
    }
    let mut out = Vec::new();
    for (index, t) in checkpoint.tensors.iter().enumerate() {
        let tensor = match (t.class.role, t.class.layer) {
            (Role::Factor(factor), Some(layer)) => {
                match expanded(checkpoint, latent, index, factor, layer)? {
                    Some(tensor) => tensor,
                    None => continue,
                }
            }
            (Role::FactorBias(factor), Some(layer)) => TensorPlan {
                name: dense_bias_name(checkpoint, factor, layer).ok_or_else(|| {
                    Error::tensor(
                        &checkpoint.dir,
                        &t.name,
                        "no name for its dense projection's bias",
                    )
                })?,
                ..copied(index, t)
            },
            _ => copied(index, t),
        };
        out.push(placed(checkpoint, index, tensor));
    }
    let config = latent::dense_config(&checkpoint.config.raw, latent);
    let files = vec![OutputFile {
        relative: CONFIG_FILE.into(),
        source: FileSource::Generated {
            bytes: latent::to_pretty_bytes(&config, Path::new(CONFIG_FILE))?,
            what: "config.json restored to the original architecture",
        },
    }];
    let out = fused::fuse(checkpoint, out)?;
    Ok(assemble(
        checkpoint,
        Emit::Dense,
        Vec::new(),
        out,
        files,
        None,
    ))
}

/// The name a factored projection's bias (on up-projection `factor`) takes back in the dense form.
fn dense_bias_name(checkpoint: &Checkpoint, factor: Factor, layer: usize) -> Option<String> {
    let projection = factor.biased_projection()?;
    checkpoint
        .config
        .arch
        .layer_tensor_name(layer, Role::AttentionBias(projection))
}

/// The dense projection that input tensor `index`, factor `factor` of layer `layer`, expands into:
/// `Some` for an up-projection (paired with its down-projection), `None` for a down-projection
/// (consumed by its up-projections).
fn expanded(
    checkpoint: &Checkpoint,
    latent: &LatentAttention,
    index: usize,
    factor: Factor,
    layer: usize,
) -> Result<Option<TensorPlan>> {
    let c = &checkpoint.config;
    let t = &checkpoint.tensors[index];
    let shared = latent.kv == Some(KvMode::Shared);
    let (dense, down) = match factor {
        Factor::QUp => (Role::Query, Factor::QDown),
        Factor::KUp if shared => (Role::Key, Factor::KvDown),
        Factor::KUp => (Role::Key, Factor::KDown),
        Factor::VUp if shared => (Role::Value, Factor::KvDown),
        Factor::VUp => (Role::Value, Factor::VDown),
        Factor::QDown | Factor::KvDown | Factor::KDown | Factor::VDown => return Ok(None),
    };
    let lookup = |layer: usize, role: Role| {
        c.arch
            .layer_tensor_name(layer, role)
            .ok_or_else(|| Error::tensor(&checkpoint.dir, &t.name, "no name for its pair"))
    };
    // A shared basis lives in its group's first layer.
    let down_layer = match (&latent.kv_sharing, down) {
        (Some(sharing), Factor::KvDown) => sharing.source_of(layer),
        _ => layer,
    };
    let down_name = lookup(down_layer, Role::Factor(down))?;
    let down_index = checkpoint.tensor_index(&down_name).ok_or_else(|| {
        Error::tensor(
            &checkpoint.shards[t.shard].path,
            &down_name,
            format!("missing (needed to expand `{}`)", t.name),
        )
    })?;
    let shape = vec![t.shape[0], checkpoint.tensors[down_index].shape[1]];
    Ok(Some(TensorPlan {
        name: lookup(layer, dense)?,
        dtype: t.dtype,
        byte_len: byte_len(t.dtype, &shape),
        shape,
        op: Op::Expand {
            down: down_index,
            up: index,
        },
    }))
}
