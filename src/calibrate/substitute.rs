//! Fitted groups substituted into the layers of the forward pass, as a conversion would write
//! them: what `sweep` scores, and the compressed model that sequential calibration runs. A group
//! is fitted when the pass reaches its first layer; the maps of a group spanning several layers
//! wait for their layers.

use crate::error::{Error, Result};
use crate::execute::{fit_and_encode, FitInputs, GroupReport};
use crate::forward::linear::{KeyValue, Linear, Projection};
use crate::forward::Layer;
use crate::input::checkpoint::Checkpoint;
use crate::plan::{Emit, GroupKind, GroupPlan, Share};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The groups of one configuration, substituted layer by layer.
pub(crate) struct Substitution<'a> {
    checkpoint: &'a Checkpoint,
    groups: &'a [GroupPlan],
    /// The key/value maps of a group spanning several layers, fitted at its first layer, waiting
    /// for the later ones.
    pending: BTreeMap<usize, KeyValue>,
}

impl<'a> Substitution<'a> {
    /// Nothing fitted yet.
    pub(crate) fn new(checkpoint: &'a Checkpoint, groups: &'a [GroupPlan]) -> Self {
        Substitution {
            checkpoint,
            groups,
            pending: BTreeMap::new(),
        }
    }

    /// Fits the groups that start at `layer` (in parallel, with `inputs`) and replaces the layer's
    /// projections by what they write (dense maps; a group shared across layers in its factored
    /// form), and its `o_proj` by the refit calibration made of it, if any; returns their reports.
    pub(crate) fn apply(
        &mut self,
        layer: &mut Layer,
        inputs: &FitInputs,
    ) -> Result<Vec<GroupReport>> {
        let checkpoint = self.checkpoint;
        let due: Vec<&GroupPlan> = self
            .groups
            .iter()
            .filter(|g| g.layer == layer.index)
            .collect();
        let fitted: Vec<Result<(GroupReport, Vec<Vec<u8>>)>> = due
            .par_iter()
            .map(|g| {
                let emit = match g.share {
                    Some(_) => Emit::Factored,
                    None => Emit::Dense,
                };
                fit_and_encode(checkpoint, g, emit, inputs)
            })
            .collect();
        let mut reports = Vec::with_capacity(due.len());
        for (group, result) in due.into_iter().zip(fitted) {
            let (report, pieces) = result?;
            match group.share {
                Some(share) => self
                    .pending
                    .extend(shared_maps(checkpoint, group, share, &pieces)?),
                None => substitute(checkpoint, layer, group, &pieces)?,
            }
            reports.push(report);
        }
        if let Some(kv) = self.pending.remove(&layer.index) {
            layer.kv = with_biases_of(kv, &layer.kv);
        }
        if let Some(o) = inputs.compensated.get(&layer.index) {
            layer.o = super::compensation::decoded(checkpoint, o, layer.o.bias.clone())?;
        }
        Ok(reports)
    }
}

/// A group output encoded in its member's dtype (as the conversion writes it), decoded to `f32`.
fn decode_piece(checkpoint: &Checkpoint, member: usize, bytes: &[u8]) -> Result<Vec<f32>> {
    let t = &checkpoint.tensors[member];
    let ty = checkpoint.float_type(t, "decomposed")?;
    Ok(ty.decode_f32(bytes))
}

/// The key/value maps of every layer of a group spanning several layers, from its factored
/// `pieces` (the group's down-projection, then each member's up-projection in member order),
/// decoded as a factored conversion writes them; by layer.
fn shared_maps(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    share: Share,
    pieces: &[Vec<u8>],
) -> Result<Vec<(usize, KeyValue)>> {
    let decoded = |member: usize, bytes: &[u8], rows: usize, cols: usize| -> Result<Linear> {
        let values = decode_piece(checkpoint, member, bytes)?;
        Ok(Linear::from_row_major(&values, rows, cols, None))
    };
    let (down_bytes, ups) = pieces.split_first().ok_or_else(|| {
        Error::bug(format!(
            "layer {}: a shared group without outputs",
            group.layer
        ))
    })?;
    let first = &checkpoint.tensors[group.members[0]];
    let latent = down_bytes.len() / (first.shape[1] * first.dtype.bitsize() / 8).max(1);
    let down = decoded(group.members[0], down_bytes, latent, first.shape[1])?;
    let mut out = Vec::with_capacity(group.layers);
    for (i, layer) in group.layer_range().enumerate() {
        let up = |m: usize| -> Result<Linear> {
            let member = group.members.get(2 * i + m).copied();
            let bytes = ups.get(2 * i + m);
            let (Some(member), Some(bytes)) = (member, bytes) else {
                return Err(Error::bug(format!(
                    "layer {layer}: a shared group lacks an up-projection"
                )));
            };
            decoded(member, bytes, checkpoint.tensors[member].shape[0], latent)
        };
        let (k_up, v_up) = (up(0)?, up(1)?);
        let kv = match (share, i) {
            (Share::Latent, 0) => KeyValue::Source {
                down: down.clone(),
                k_up,
                v_up,
            },
            (Share::Latent, _) => KeyValue::FromSource { k_up, v_up },
            (Share::Basis, _) => KeyValue::Shared {
                down: down.clone(),
                k_up,
                v_up,
            },
        };
        out.push((layer, kv));
    }
    Ok(out)
}

/// `kv` (a shared group's maps) with the key and value biases of `original`, the layer's maps it
/// replaces, on its up-projections (where the factored form carries them).
fn with_biases_of(mut kv: KeyValue, original: &KeyValue) -> KeyValue {
    let (k_bias, v_bias) = match original {
        KeyValue::Separate { k, v } => (bias_of(k), bias_of(v)),
        KeyValue::Shared { k_up, v_up, .. }
        | KeyValue::Source { k_up, v_up, .. }
        | KeyValue::FromSource { k_up, v_up } => (k_up.bias.clone(), v_up.bias.clone()),
    };
    match &mut kv {
        KeyValue::Shared { k_up, v_up, .. }
        | KeyValue::Source { k_up, v_up, .. }
        | KeyValue::FromSource { k_up, v_up } => {
            k_up.bias = k_bias;
            v_up.bias = v_bias;
        }
        KeyValue::Separate { .. } => {}
    }
    kv
}

/// The bias a projection carries (the up-projection's, for a factored one).
fn bias_of(p: &Projection) -> Option<Vec<f32>> {
    match p {
        Projection::Dense(l) => l.bias.clone(),
        Projection::Factored { up, .. } => up.bias.clone(),
    }
}

/// Replaces `group`'s projections in `layer` by the dense maps of `pieces` (one encoded
/// reconstruction per member, in member order), keeping each projection's bias.
fn substitute(
    checkpoint: &Checkpoint,
    layer: &mut Layer,
    group: &GroupPlan,
    pieces: &[Vec<u8>],
) -> Result<()> {
    let mut linears = Vec::with_capacity(pieces.len());
    for (&member, bytes) in group.members.iter().zip(pieces) {
        let t = &checkpoint.tensors[member];
        linears.push((
            decode_piece(checkpoint, member, bytes)?,
            t.shape[0],
            t.shape[1],
        ));
    }
    let dense = |i: usize, bias: Option<Vec<f32>>| -> Result<Projection> {
        let (values, out, input) = linears.get(i).ok_or_else(|| {
            Error::bug(format!(
                "layer {} group {} has no output {i}",
                group.layer,
                group.kind.name()
            ))
        })?;
        Ok(Projection::Dense(Linear::from_row_major(
            values, *out, *input, bias,
        )))
    };
    let (k, v) = match &layer.kv {
        KeyValue::Separate { k, v } => (k, v),
        KeyValue::Shared { .. } | KeyValue::Source { .. } | KeyValue::FromSource { .. } => return Err(Error::invalid(
            &checkpoint.dir,
            "a factored checkpoint (written by --emit factored); expand it to a standard one first",
        )),
    };
    let (k_bias, v_bias) = (bias_of(k), bias_of(v));
    match group.kind {
        GroupKind::Q => layer.q = dense(0, bias_of(&layer.q))?,
        GroupKind::SharedKv => {
            layer.kv = KeyValue::Separate {
                k: dense(0, k_bias)?,
                v: dense(1, v_bias)?,
            }
        }
        GroupKind::K => {
            if let KeyValue::Separate { k, .. } = &mut layer.kv {
                *k = dense(0, k_bias)?;
            }
        }
        GroupKind::V => {
            if let KeyValue::Separate { v, .. } = &mut layer.kv {
                *v = dense(0, v_bias)?;
            }
        }
    }
    Ok(())
}
