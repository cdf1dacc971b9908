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
//! original stream crosses a group, one layer's weights per stream, and the moments
//! (`hidden^2` values each: three per layer, one per later layer of a group).
//!
//! The result is [`FitInputs`] the conversion's fits read exactly as the pass did, so the written
//! output is what the pass computed with (the fits run again there, deterministically).

use super::substitute::Substitution;
use super::{FitInputs, SequentialMoments};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::llama::calibrate::{accumulate, accumulate_cross, calibration_tokens, scale};
use crate::llama::{Llama, PassState};
use crate::options::Calibration;
use crate::plan::{GroupPlan, Share};
use faer::{Mat, MatRef};

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

/// Whether two activations are the same, bit for bit.
fn identical(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> bool {
    a.nrows() == b.nrows()
        && a.ncols() == b.ncols()
        && (0..a.ncols())
            .all(|j| (0..a.nrows()).all(|i| a[(i, j)].to_bits() == b[(i, j)].to_bits()))
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

/// Runs sequential calibration of `calibration` over `checkpoint` for `groups` (their budgets
/// resolved) and returns the statistics their fits read.
pub fn sequential_inputs(
    checkpoint: &Checkpoint,
    calibration: &Calibration,
    groups: &[GroupPlan],
) -> Result<FitInputs> {
    let (ids, mut record) = calibration_tokens(checkpoint, calibration)?;
    record.mode = Some(calibration.mode.name());
    let ctx = record.ctx;
    let n = ids.len() as f64;
    let llama = Llama::new(checkpoint)?;
    let mut original = llama.embed(&ids)?;
    let mut compressed = original.clone();
    let layers = checkpoint.config.num_layers;
    let mut inputs = FitInputs {
        covariances: Some(Vec::with_capacity(layers)),
        weighting: calibration.weighting,
        calibration: Some(record),
        ..FitInputs::default()
    };
    let mut substitution = Substitution::new(checkpoint, groups);
    let (mut original_state, mut compressed_state) = (PassState::default(), PassState::default());
    let mut start = 0;
    while start < layers {
        let end = segment(groups, start, layers);
        let source = llama.layer(start)?.attention_input(compressed.as_ref());
        for index in start..end {
            let layer = llama.layer(index)?;
            let x = layer.attention_input(original.as_ref());
            let covariance = second_moment(x.as_ref(), n);
            if index == start {
                // Nothing compressed below (or nothing that changed the inputs): the moments are
                // the one-shot ones, bit for bit, and the fit is today's.
                let (compressed_moment, target) = if identical(x.as_ref(), source.as_ref()) {
                    (covariance.clone(), covariance.clone())
                } else {
                    (
                        second_moment(source.as_ref(), n),
                        moment(x.as_ref(), source.as_ref(), n),
                    )
                };
                inputs.sequential.push(Some(SequentialMoments {
                    compressed: compressed_moment,
                    target,
                }));
            } else {
                inputs
                    .cross
                    .insert((index, start), moment(x.as_ref(), source.as_ref(), n));
                inputs.sequential.push(None);
            }
            inputs
                .covariances
                .as_mut()
                .ok_or_else(|| Error::bug("sequential calibration lost its covariances"))?
                .push(covariance);
            if index + 1 < layers {
                layer.forward(&mut original, ctx, &mut original_state)?;
            }
        }
        drop(source);
        for index in start..end {
            let mut layer = llama.layer(index)?;
            substitution.apply(&mut layer, &inputs)?;
            if index + 1 < layers {
                layer.forward(&mut compressed, ctx, &mut compressed_state)?;
            }
        }
        start = end;
    }
    Ok(inputs)
}
