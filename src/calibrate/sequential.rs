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
//! the original stream keeps the attention outputs of the layers to refit, the compressed stream
//! refits each such layer's `o_proj` on its own heads' outputs once the layer's groups are
//! substituted, and moves on with it. (One-shot calibration refits `o_proj` without this pass:
//! [`super::refit`].)
//!
//! The result is [`FitInputs`] the conversion's fits read exactly as the pass did, so the written
//! output is what the pass computed with (the fits run again there, deterministically).

use super::compensation::compensate_output;
use super::moments::{
    accumulate, accumulate_cross, accumulate_f32, attention_stats, identical, scale,
};
use super::progress::{names, Progress};
use super::refit::{refitted_layers, segment};
use super::substitute::Substitution;
use super::text::CalibrationText;
use crate::error::{Error, Result};
use crate::execute::{FitInputs, SequentialMoments};
use crate::fit::act::ActWeighting;
use crate::forward::{Llama, PassState};
use crate::options::CalibrateMode;
use crate::plan::GroupPlan;
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

/// `E[x x^T]` of `x`'s rows, summed as the one-shot calibration sums the fits' input moments
/// (`f32` products summed in `f64`).
fn second_moment(x: MatRef<'_, f32>, n: f64) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(x.ncols(), x.ncols());
    accumulate_f32(&mut m, x);
    scale(&mut m, n);
    m
}

/// `E[x x^T]` in `f64` throughout: the refit's `S_cc`, which its `S_oc` ([`moment`]) is compared
/// with under a small ridge, so both are summed alike.
fn second_moment_f64(x: MatRef<'_, f32>, n: f64) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(x.ncols(), x.ncols());
    accumulate(&mut m, x);
    scale(&mut m, n);
    m
}

/// The two streams of the pass and their states.
struct Streams {
    original: Mat<f32>,
    compressed: Mat<f32>,
    original_state: PassState,
    compressed_state: PassState,
}

/// Runs the two-stream pass over `text` for `groups` (their budgets resolved) and returns the
/// statistics their fits read (weighted by `weighting`), with the `o_proj` refits of the groups
/// that ask for them (`--compensate o_proj`). The moments go to `scratch`.
pub fn sequential(
    llama: &Llama,
    text: &CalibrationText,
    groups: &[GroupPlan],
    weighting: ActWeighting,
    (scratch, progress): (&Scratch, &dyn Progress),
) -> Result<FitInputs> {
    let checkpoint = llama.checkpoint();
    progress.start(names::SEQUENTIAL, llama.params().num_layers, text.ids.len());
    let ctx = text.ctx();
    let n = text.ids.len() as f64;
    let original = llama.embed(&text.ids)?;
    let mut streams = Streams {
        compressed: original.clone(),
        original,
        original_state: PassState::default(),
        compressed_state: PassState::default(),
    };
    let layers = llama.params().num_layers;
    let mut record = text.record.clone();
    record.mode = Some(CalibrateMode::Sequential.name());
    let mut inputs = FitInputs {
        covariances: Some(Vec::with_capacity(layers)),
        weighting,
        calibration: Some(record),
        ..FitInputs::default()
    };
    let refitted = refitted_layers(llama, groups);
    let mut substitution = Substitution::new(checkpoint, groups);
    let mut start = 0;
    while start < layers {
        let end = segment(groups, start, layers);
        let outputs = original_segment(
            llama,
            text,
            &mut streams,
            (start, end),
            &refitted,
            (&mut inputs, scratch),
            n,
        )?;
        // One pool of activation buffers for both streams, each `[tokens, width]`.
        streams
            .original_state
            .swap_buffers(&mut streams.compressed_state);
        compressed_segment(
            llama,
            ctx,
            &mut streams,
            (start, end),
            outputs,
            (&mut substitution, &mut inputs),
            scratch,
        )?;
        streams
            .compressed_state
            .swap_buffers(&mut streams.original_state);
        start = end;
    }
    Ok(inputs)
}

/// The original stream across layers `[start, end)`: each layer's moments recorded, the attention
/// outputs of the layers to refit returned.
fn original_segment(
    llama: &Llama,
    text: &CalibrationText,
    s: &mut Streams,
    (start, end): (usize, usize),
    refitted: &BTreeSet<usize>,
    (inputs, scratch): (&mut FitInputs, &Scratch),
    n: f64,
) -> Result<BTreeMap<usize, Mat<f32>>> {
    let layers = llama.params().num_layers;
    let ctx = text.ctx();
    let source = llama.layer(start)?.attention_input(s.compressed.as_ref());
    let mut outputs: BTreeMap<usize, Mat<f32>> = BTreeMap::new();
    for index in start..end {
        let layer = llama.layer(index)?;
        let x = layer.attention_input(s.original.as_ref());
        let moments = (x.as_ref(), source.as_ref());
        record_moments(inputs, scratch, (index, start), moments, n)?;
        // The fit reads the compressed model's input where it has one (a group's source).
        let fitted = if index == start {
            source.as_ref()
        } else {
            x.as_ref()
        };
        inputs
            .attention
            .push(attention_stats(&layer, fitted, text.pinned_sink, scratch)?);
        if index + 1 == layers && !refitted.contains(&index) {
            continue;
        }
        let z = layer.attention_heads(s.original.as_ref(), ctx, &mut s.original_state)?;
        let o = layer.attention_output(z.as_ref(), &mut s.original_state);
        s.original_state.buffers.give(z);
        if refitted.contains(&index) {
            outputs.insert(index, o.clone());
        }
        if index + 1 < layers {
            layer.finish_output(&mut s.original, o, &mut s.original_state);
        } else {
            s.original_state.buffers.give(o);
        }
    }
    Ok(outputs)
}

/// The compressed stream across layers `[start, end)`: the groups substituted as their layers come,
/// `o_proj` refitted where `outputs` holds the original attention output.
fn compressed_segment(
    llama: &Llama,
    ctx: usize,
    s: &mut Streams,
    (start, end): (usize, usize),
    mut outputs: BTreeMap<usize, Mat<f32>>,
    (substitution, inputs): (&mut Substitution, &mut FitInputs),
    scratch: &Scratch,
) -> Result<()> {
    let checkpoint = llama.checkpoint();
    let layers = llama.params().num_layers;
    for index in start..end {
        let mut layer = llama.layer(index)?;
        substitution.apply(&mut layer, inputs)?;
        let target = outputs.remove(&index);
        if index + 1 == layers && target.is_none() {
            continue;
        }
        let z = layer.attention_heads(s.compressed.as_ref(), ctx, &mut s.compressed_state)?;
        if let Some(target) = target {
            let (projection, o) =
                compensate_output(checkpoint, &layer, target.as_ref(), z.as_ref(), scratch)?;
            layer.o = o;
            inputs.compensated.insert(index, projection);
        }
        if index + 1 < layers {
            layer.finish(&mut s.compressed, z.as_ref(), &mut s.compressed_state);
        }
    }
    Ok(())
}

/// Layer `index`'s moments, `x` its original input, `source` the compressed
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
                scratch.matrix(&second_moment_f64(source, n))?,
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
