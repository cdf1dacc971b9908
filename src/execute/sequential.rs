//! Sequential calibration (`--calibrate-mode sequential`): one pass over the calibration tokens,
//! layer by layer, carrying two streams of hidden states, the original model's and the compressed
//! model's so far. At each layer the moments of both streams' attention inputs are accumulated
//! ([`SequentialMoments`]), the groups that start there are fitted on them
//! ([`crate::fit::compensate`]: the compressed inputs, the original outputs as the target) and
//! substituted ([`super::substitute`]), and both streams move on.
//!
//! A shared latent group (`--share-layers G --share latent`) needs, at its source layer `s`, the
//! cross moments of every later layer's original input with the source's compressed input: the
//! original stream runs ahead through the group's layers first, then the compressed stream follows
//! with the fitted group. Memory: the two hidden states, the compressed source input while the
//! original stream crosses a group, one layer's weights at a time, one pool of activation buffers for
//! both streams (the MLP block runs over the tokens in chunks), and the moments
//! (`hidden^2` values each: three per layer, one per later layer of a group).
//!
//! `o_proj` compensation (`--compensate o_proj`, [`super::compensation`]) rides on the same pass:
//! the original stream keeps the heads' outputs of the layers to refit, the compressed stream
//! refits each such layer's `o_proj` on its own heads' outputs once the layer's groups are
//! substituted, and moves on with it. In one-shot mode the compressed stream restarts from the
//! original one at every segment, so each refit corrects its own layer's error only.
//!
//! The result is [`FitInputs`] the conversion's fits read exactly as the pass did, so the written
//! output is what the pass computed with (the fits run again there, deterministically).

use super::compensation::compensate_output;
use super::substitute::Substitution;
use super::{FitInputs, SequentialMoments};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::llama::calibrate::{
    accumulate, accumulate_cross, attention_stats, calibration_tokens, identical, scale,
};
use crate::llama::{Llama, PassState};
use crate::options::{BosSink, CalibrateMode, Calibration};
use crate::plan::{compensated_tensors, GroupPlan, Share};
use crate::scratch::Scratch;
use faer::{Mat, MatRef};
use std::collections::{BTreeMap, BTreeSet};

/// `E[a^T b]` over the `n` rows: `E[x x^T]` when `a` and `b` are the same activations.
fn moment(a: MatRef<'_, f32>, b: MatRef<'_, f32>, n: f64) -> Mat<f64> {
    let hidden = a.ncols();
    let mut m = Mat::<f64>::zeros(hidden, b.ncols());
    accumulate_cross(&mut m, a, b);
    scale(&mut m, n);
    m
}

/// `E[x x^T]` of `x`'s rows, summed as the one-shot calibration sums it.
fn second_moment(x: MatRef<'_, f32>, n: f64) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(x.ncols(), x.ncols());
    accumulate(&mut m, x);
    scale(&mut m, n);
    m
}

/// The layers `[start, end)` the original stream crosses before the compressed stream follows:
/// a shared latent group's, else one layer.
fn segment(groups: &[GroupPlan], start: usize, layers: usize) -> usize {
    let span = groups
        .iter()
        .filter(|g| g.layer == start && g.share == Some(Share::Latent))
        .map(|g| g.layers)
        .max()
        .unwrap_or(1);
    (start + span.max(1)).min(layers)
}

/// Runs the two-stream calibration pass of `calibration` over `checkpoint` for `groups` (their
/// budgets resolved) and returns the statistics their fits read, with the `o_proj` refits of the
/// groups that ask for them (`--compensate o_proj`). In sequential mode every statistic comes from
/// the pass; in one-shot mode the fits read `one_shot` (the original model's statistics) and the
/// compressed stream restarts from the original one at every layer, so the pass only refits
/// `o_proj` on the compressed heads of the original inputs.
pub fn sequential_inputs(
    checkpoint: &Checkpoint,
    calibration: &Calibration,
    groups: &[GroupPlan],
    one_shot: FitInputs,
) -> Result<FitInputs> {
    let sequential = calibration.mode == CalibrateMode::Sequential;
    let (ids, mut record) = calibration_tokens(checkpoint, calibration)?;
    let ctx = record.ctx;
    // The BOS position, where calibration keeps it exact.
    let pinned = record.bos.is_some() && calibration.sink == BosSink::Exact;
    let n = ids.len() as f64;
    let llama = Llama::new(checkpoint)?;
    let mut original = llama.embed(&ids)?;
    let mut compressed = original.clone();
    let layers = checkpoint.config.num_layers;
    let mut inputs = match sequential {
        true => {
            record.mode = Some(calibration.mode.name());
            FitInputs {
                covariances: Some(Vec::with_capacity(layers)),
                weighting: calibration.weighting,
                calibration: Some(record),
                ..FitInputs::default()
            }
        }
        false => one_shot,
    };
    let refitted: BTreeSet<usize> = compensated_tensors(checkpoint, groups)
        .into_values()
        .collect();
    let mut substitution = Substitution::new(checkpoint, groups);
    let scratch = Scratch::new()?;
    let (mut original_state, mut compressed_state) = (PassState::default(), PassState::default());
    let mut start = 0;
    while start < layers {
        let end = segment(groups, start, layers);
        if !sequential {
            compressed.copy_from(original.as_ref());
        }
        let source = llama.layer(start)?.attention_input(compressed.as_ref());
        let mut heads: BTreeMap<usize, Mat<f32>> = BTreeMap::new();
        for index in start..end {
            let layer = llama.layer(index)?;
            if sequential {
                let x = layer.attention_input(original.as_ref());
                let moments = (x.as_ref(), source.as_ref());
                record_moments(&mut inputs, &scratch, (index, start), moments, n)?;
                // The fit reads the compressed model's input where it has one (a group's source).
                let fitted = if index == start {
                    source.as_ref()
                } else {
                    x.as_ref()
                };
                inputs
                    .attention
                    .push(attention_stats(&layer, fitted, pinned, &scratch)?);
            }
            if index + 1 == layers && !refitted.contains(&index) {
                continue;
            }
            let z = layer.attention_heads(original.as_ref(), ctx, &mut original_state)?;
            if index + 1 < layers {
                layer.finish(&mut original, z.as_ref(), &mut original_state);
            }
            if refitted.contains(&index) {
                heads.insert(index, z);
            }
        }
        drop(source);
        // One pool of activation buffers for both streams, each `[tokens, width]`.
        original_state.swap_buffers(&mut compressed_state);
        for index in start..end {
            let mut layer = llama.layer(index)?;
            substitution.apply(&mut layer, &inputs)?;
            if index + 1 == layers && !refitted.contains(&index) {
                continue;
            }
            let z = layer.attention_heads(compressed.as_ref(), ctx, &mut compressed_state)?;
            if let Some(target) = heads.remove(&index) {
                let (projection, o) =
                    compensate_output(checkpoint, &layer, target.as_ref(), z.as_ref(), &scratch)?;
                layer.o = o;
                inputs.compensated.insert(index, projection);
            }
            if index + 1 < layers {
                layer.finish(&mut compressed, z.as_ref(), &mut compressed_state);
            }
        }
        compressed_state.swap_buffers(&mut original_state);
        start = end;
    }
    Ok(inputs)
}

/// Sequential mode: layer `index`'s moments, `x` its original input, `source` the compressed
/// input of its segment's first layer `start` (the input of a shared latent group's source), kept
/// in `scratch`.
fn record_moments(
    inputs: &mut FitInputs,
    scratch: &Scratch,
    (index, start): (usize, usize),
    (x, source): (MatRef<'_, f32>, MatRef<'_, f32>),
    n: f64,
) -> Result<()> {
    let covariance = scratch.matrix(&second_moment(x, n))?;
    if index == start {
        // Nothing compressed below (or nothing that changed the inputs): the moments are the
        // one-shot ones, bit for bit, and the fit is today's.
        let (compressed_moment, target) = if identical(x, source) {
            (covariance.clone(), covariance.clone())
        } else {
            (
                scratch.matrix(&second_moment(source, n))?,
                scratch.matrix(&moment(x, source, n))?,
            )
        };
        inputs.sequential.push(Some(SequentialMoments {
            compressed: compressed_moment,
            target,
        }));
    } else {
        inputs
            .cross
            .insert((index, start), scratch.matrix(&moment(x, source, n))?);
        inputs.sequential.push(None);
    }
    inputs
        .covariances
        .as_mut()
        .ok_or_else(|| Error::bug("sequential calibration lost its covariances"))?
        .push(covariance);
    Ok(())
}
