//! The `o_proj` refit of one-shot calibration (`--compensate o_proj`, [`super::compensation`]):
//! each refitted layer's attention block runs on the ORIGINAL model's input to it, with the
//! layer's fitted projections substituted, and its `o_proj` is refitted so that the block's
//! output matches the original model's heads through the original `o_proj`.
//!
//! The one-shot pass kept what this reads ([`super::one_shot::Kept`]): the hidden states entering
//! each segment and the original attention outputs (and, layer by layer, the queries, where the
//! refit leaves `q_proj` alone: then only the compressed keys and values are computed). So the
//! refit runs the attention block alone, per layer, not the MLP: a segment is one layer, or a shared latent group's layers (the group's
//! later layers read its source's latent, so the compressed stream crosses the group from its
//! first layer, MLP included, as a model with the group substituted would).

use super::compensation::compensate_output;
use super::one_shot::{Keep, Kept};
use super::progress::{names, Progress};
use super::substitute::Substitution;
use crate::error::{Error, Result};
use crate::execute::{CompensatedProjection, FitInputs};
use crate::forward::{Llama, LlamaParams, PassState};
use crate::plan::{compensated_tensors, GroupKind, GroupPlan, Share};
use crate::scratch::{Activations, Scratch};
use std::collections::{BTreeMap, BTreeSet};

/// The layers `[start, end)` a compressed stream crosses from one start: a shared latent group's,
/// else one layer.
pub(crate) fn segment(groups: &[GroupPlan], start: usize, layers: usize) -> usize {
    let span = groups
        .iter()
        .filter(|g| g.layer == start && g.share == Some(Share::Latent))
        .map(|g| g.layers)
        .max()
        .unwrap_or(1);
    (start + span.max(1)).min(layers)
}

/// The layers whose `o_proj` `groups` refit.
pub fn refitted_layers(llama: &Llama, groups: &[GroupPlan]) -> BTreeSet<usize> {
    compensated_tensors(llama.checkpoint(), groups)
        .into_values()
        .collect()
}

/// Whether the refit of `groups` runs layer by layer: every group fits one layer, so the layers
/// are independent.
fn layer_by_layer(groups: &[GroupPlan]) -> bool {
    groups.iter().all(|g| g.layers == 1)
}

/// The refitted layers whose queries the refit can read from the one-shot pass: layer by layer,
/// where no group of the layer fits `q_proj` (the refit's queries are then the original ones).
fn kept_queries(groups: &[GroupPlan], heads: &BTreeSet<usize>) -> BTreeSet<usize> {
    if !layer_by_layer(groups) {
        return BTreeSet::new();
    }
    heads
        .iter()
        .copied()
        .filter(|&l| {
            groups
                .iter()
                .filter(|g| g.layer_range().contains(&l))
                .all(|g| matches!(g.kind, GroupKind::K | GroupKind::V | GroupKind::SharedKv))
        })
        .collect()
}

/// What the one-shot pass must keep for the refit of `groups`: each segment's input where the
/// segment holds a refitted layer, every refitted layer's attention output, and the queries of
/// those whose `q_proj` the refit leaves alone ([`kept_queries`]).
pub fn keep_for(llama: &Llama, groups: &[GroupPlan]) -> Keep {
    let layers = llama.params().num_layers;
    let heads = refitted_layers(llama, groups);
    let mut inputs = BTreeSet::new();
    let mut start = 0;
    while start < layers {
        let end = segment(groups, start, layers);
        if heads.range(start..end).next().is_some() {
            inputs.insert(start);
        }
        start = end;
    }
    let queries = kept_queries(groups, &heads);
    Keep {
        inputs,
        heads,
        queries,
    }
}

/// What `kept` holds of `layer`, or a bug: the pass was asked to keep it.
fn kept_at<'k>(
    kept: &'k BTreeMap<usize, Activations>,
    layer: usize,
    what: &str,
) -> Result<&'k Activations> {
    kept.get(&layer).ok_or_else(|| {
        Error::bug(format!(
            "o_proj refit: the one-shot pass kept no {what} of layer {layer}"
        ))
    })
}

/// Refits the `o_proj` of every layer `groups` compensate, from what the one-shot pass kept, and
/// adds the refits to `inputs` (the one-shot pass's statistics, which the groups' fits read; the
/// bytes go to `scratch`). Where every group fits one layer, the layers are independent and run
/// two at a time where memory allows ([`PAIR_BYTES`]: one's serial parts overlap the other's
/// products; the same bits as one at a time). Otherwise segment by segment, every layer's
/// groups substituted in order (a group shared across layers hands its maps on to its later
/// layers).
pub fn refit(
    llama: &Llama,
    ctx: usize,
    groups: &[GroupPlan],
    (inputs, kept): (&mut FitInputs, &Kept),
    (scratch, progress): (&Scratch, &dyn Progress),
) -> Result<()> {
    progress.start(names::REFIT, llama.params().num_layers, kept.tokens());
    if layer_by_layer(groups) {
        refit_layers(llama, ctx, groups, (inputs, kept), (scratch, progress))?;
    } else {
        refit_segments(llama, ctx, groups, (inputs, kept), (scratch, progress))?;
    }
    progress.finish();
    Ok(())
}

/// The refit of one layer whose groups span it alone: its groups fitted and substituted, its
/// attention block run on the original input to it, its `o_proj` refitted.
fn refit_layer(
    llama: &Llama,
    (ctx, index): (usize, usize),
    groups: &[GroupPlan],
    (inputs, kept): (&FitInputs, &Kept),
    scratch: &Scratch,
) -> Result<CompensatedProjection> {
    let mut layer = llama.layer(index)?;
    Substitution::new(llama.checkpoint(), groups).apply(&mut layer, inputs)?;
    let h = kept_at(&kept.inputs, index, "input")?.load()?;
    let mut state = PassState::default();
    let z = match kept.queries.get(&index) {
        Some(q) => {
            layer.attention_heads_with_queries(h.as_ref(), q.load()?.as_ref(), ctx, &mut state)?
        }
        None => layer.attention_heads(h.as_ref(), ctx, &mut state)?,
    };
    drop(h);
    let target = kept_at(&kept.outputs, index, "attention output")?.load()?;
    let (projection, _) = compensate_output(
        llama.checkpoint(),
        &layer,
        target.as_ref(),
        z.as_ref(),
        scratch,
    )?;
    Ok(projection)
}

/// The most memory two layers' refits may hold at once; past it (Llama-3-8B: about 3.5 GB each),
/// one layer at a time.
const PAIR_BYTES: u64 = 2 << 30;

/// About what one layer's refit holds at its peak: the layer's weights in `f32` and some twenty
/// `[width, width]` `f64` matrices of the refit's algebra (its moments, the solve's factor and
/// right-hand sides, the report's products), `width` the wider of `hidden` and the heads' outputs.
fn refit_bytes(p: &LlamaParams) -> u64 {
    let a = &p.attention;
    let (hidden, inner) = (p.hidden_size as u64, p.intermediate_size as u64);
    let width = hidden.max((a.num_heads * a.head_dim) as u64);
    let weights = (4 * hidden * width + 3 * hidden * inner).saturating_mul(4);
    (20 * width * width * 8).saturating_add(weights)
}

/// [`refit`] where every group fits one layer: two layers at a time where both fit in
/// [`PAIR_BYTES`], else one.
fn refit_layers(
    llama: &Llama,
    ctx: usize,
    groups: &[GroupPlan],
    (inputs, kept): (&mut FitInputs, &Kept),
    (scratch, progress): (&Scratch, &dyn Progress),
) -> Result<()> {
    let refitted: Vec<usize> = refitted_layers(llama, groups).into_iter().collect();
    (refitted.len()..llama.params().num_layers).for_each(|_| progress.layer());
    let at_once = match refit_bytes(llama.params()).saturating_mul(2) <= PAIR_BYTES {
        true => 2,
        false => 1,
    };
    for pair in refitted.chunks(at_once) {
        let one = |index: usize| {
            let done = refit_layer(llama, (ctx, index), groups, (inputs, kept), scratch);
            progress.layer();
            done.map(|p| (index, p))
        };
        let (a, b) = match *pair {
            [a, b] => {
                let (a, b) = rayon::join(|| one(a), || one(b));
                (a?, Some(b?))
            }
            [a] => (one(a)?, None),
            _ => return Err(Error::bug("o_proj refit: an empty pair of layers")),
        };
        for (index, projection) in std::iter::once(a).chain(b) {
            inputs.compensated.insert(index, projection);
        }
    }
    Ok(())
}

/// [`refit`] segment by segment (a group spans several layers).
fn refit_segments(
    llama: &Llama,
    ctx: usize,
    groups: &[GroupPlan],
    (inputs, kept): (&mut FitInputs, &Kept),
    (scratch, progress): (&Scratch, &dyn Progress),
) -> Result<()> {
    let checkpoint = llama.checkpoint();
    let layers = llama.params().num_layers;
    let refitted = refitted_layers(llama, groups);
    let mut substitution = Substitution::new(checkpoint, groups);
    let mut start = 0;
    while start < layers {
        let end = segment(groups, start, layers);
        let last = refitted.range(start..end).next_back().copied();
        let mut stream = match last {
            Some(_) => Some(kept_at(&kept.inputs, start, "input")?.load()?),
            None => None,
        };
        let mut state = PassState::default();
        for index in start..end {
            let mut layer = llama.layer(index)?;
            substitution.apply(&mut layer, inputs)?;
            progress.layer();
            let (Some(h), Some(last)) = (stream.as_mut(), last) else {
                continue;
            };
            if index > last {
                continue;
            }
            let z = layer.attention_heads(h.as_ref(), ctx, &mut state)?;
            if refitted.contains(&index) {
                let target = kept_at(&kept.outputs, index, "attention output")?.load()?;
                let (projection, o) =
                    compensate_output(checkpoint, &layer, target.as_ref(), z.as_ref(), scratch)?;
                layer.o = o;
                inputs.compensated.insert(index, projection);
            }
            if index < last {
                layer.finish(h, z.as_ref(), &mut state);
            }
            state.buffers.give(z);
        }
        start = end;
    }
    Ok(())
}
