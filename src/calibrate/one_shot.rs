//! The one-shot pass: the original model runs over the calibration tokens once and, per layer,
//! the second moment `C = X^T X / N` of the attention input (the hidden state after
//! `input_layernorm`, what `q_proj`/`k_proj`/`v_proj` read) is accumulated, with what the
//! family's score function needs beyond it ([`super::moments::attention_stats`]).
//!
//! The pass goes layer by layer over all calibration tokens at once: the hidden states of the `N`
//! tokens (`[N, hidden]`, `f32`) and one layer's decoded weights are in memory at a time, weights
//! streamed from the memory map, so memory is bounded by the activations, not the model. The
//! statistics are `f64`, `hidden^2` values per layer, kept in the scratch file.
//!
//! For a shared latent across layers (`--share latent`), each later layer `l` of a group also
//! accumulates the cross second moment `E[x_l x_s^T]` with the group's source layer `s`: the
//! source's attention input is kept while the pass crosses its group (one more `[N, hidden]`
//! activation), and one more `hidden^2` matrix per such layer.
//!
//! Where `o_proj` is refitted ([`super::refit`]), the pass also keeps, in the scratch file, what
//! the refit reads ([`Kept`]): the hidden states entering each refitted segment's first layer and
//! each refitted layer's attention output (through `o_proj`, before the family's output norm),
//! both `f32` exactly as the pass computed them (so the refit computes what a second pass through
//! the original model would, bit for bit: `2 x N x hidden x 4` bytes per refitted layer), and
//! where the refit runs layer by layer and leaves `q_proj` alone, the layer's queries (`N x heads
//! x head_dim x 4` bytes more), so the refit computes only the compressed keys and values.

use super::moments::{accumulate_cross, accumulate_f32, attention_stats, scale};
use super::progress::{names, Progress};
use super::text::CalibrationText;
use crate::error::{Error, Result};
use crate::execute::{AttentionStats, FitInputs};
use crate::fit::act::ActWeighting;
use crate::forward::{Llama, PassState};
use crate::model::layout::CONFIG_FILE;
use crate::scratch::{Activations, Scratch};
use faer::Mat;
use std::collections::{BTreeMap, BTreeSet};

/// Which activations the pass keeps for the refit.
#[derive(Debug, Clone, Default)]
pub struct Keep {
    /// Layers whose input hidden states are kept (each refitted segment's first layer).
    pub inputs: BTreeSet<usize>,
    /// Layers whose attention outputs are kept (the refitted layers).
    pub heads: BTreeSet<usize>,
    /// Layers among `heads` whose queries are kept too (the refit does not change their
    /// `q_proj` and runs them alone: it computes only their keys and values).
    pub queries: BTreeSet<usize>,
}

impl Kept {
    /// The positions of what was kept (0 when nothing was).
    pub fn tokens(&self) -> usize {
        self.inputs.values().next().map_or(0, Activations::rows)
    }
}

impl Keep {
    /// Keeps what `other` keeps too.
    pub fn extend(&mut self, other: Keep) {
        self.inputs.extend(other.inputs);
        self.heads.extend(other.heads);
        self.queries.extend(other.queries);
    }
}

/// What the pass kept for the refit, in the scratch file.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    /// The hidden states entering a layer, `[N, hidden]`, by layer.
    pub inputs: BTreeMap<usize, Activations>,
    /// A layer's attention output in the original model (`o_proj`'s, its bias included, before
    /// the family's output norm: [`crate::forward::Layer::attention_output`]), `[N, hidden]`, by
    /// layer.
    pub outputs: BTreeMap<usize, Activations>,
    /// A layer's queries as its scores read them (after `q_proj`, the per-head norm and RoPE),
    /// `[N, heads * head_dim]`, by layer.
    pub queries: BTreeMap<usize, Activations>,
}

/// A layer with full attention cannot read a shared latent from a source with a sliding window:
/// the source's cache keeps only its window's tokens (the factored module refuses such a
/// checkpoint, so the conversion refuses it first). `pairs` are `(layer, source)`.
pub(crate) fn refuse_sliding_sources(llama: &Llama, pairs: &[(usize, usize)]) -> Result<()> {
    let p = llama.params();
    let window = |l: usize| p.layer_shape(l).sliding_window;
    match pairs.iter().find(|&&(l, s)| window(s).is_some() && window(l).is_none()) {
        Some(&(l, s)) => Err(Error::invalid(
            llama.checkpoint().dir.join(CONFIG_FILE),
            format!("--share latent: layer {l} attends to every token but would read the latent of layer {s}, whose sliding window caches only its last tokens (use --share basis, or --share-layers that keep such layers apart)"),
        )),
        None => Ok(()),
    }
}

/// Runs the one-shot pass over `text`. `pairs` lists the `(layer, source)` cross moments to
/// accumulate (`source < layer`: a shared latent group's source layer and one of its later
/// layers); `keep` what to keep for the refit. The moments are kept in `scratch`; `progress` is
/// told each layer. Returns the
/// fits' inputs (weighted by `weighting`) and what was kept.
pub fn one_shot(
    llama: &Llama,
    text: &CalibrationText,
    pairs: &[(usize, usize)],
    (keep, weighting): (&Keep, ActWeighting),
    (scratch, progress): (&Scratch, &dyn Progress),
) -> Result<(FitInputs, Kept)> {
    refuse_sliding_sources(llama, pairs)?;
    let ids = &text.ids[..];
    let ctx = text.ctx();
    let layers = llama.params().num_layers;
    progress.start(names::ONE_SHOT, layers, ids.len());
    let mut h = llama.embed(ids)?;
    let mut covariances = Vec::with_capacity(layers);
    let mut attention: Vec<AttentionStats> = Vec::with_capacity(layers);
    let mut cross = BTreeMap::new();
    let mut kept = Kept::default();
    // The attention inputs of source layers still needed by a later layer.
    let mut sources: BTreeMap<usize, Mat<f32>> = BTreeMap::new();
    let n = ids.len() as f64;
    let mut state = PassState::default();
    for index in 0..layers {
        let layer = llama.layer(index)?;
        if keep.inputs.contains(&index) {
            kept.inputs.insert(index, scratch.activations(h.as_ref())?);
        }
        let x = layer.attention_input(h.as_ref());
        let mut c = Mat::<f64>::zeros(x.ncols(), x.ncols());
        accumulate_f32(&mut c, x.as_ref());
        scale(&mut c, n);
        covariances.push(scratch.matrix(&c)?);
        drop(c);
        attention.push(attention_stats(
            &layer,
            x.as_ref(),
            text.pinned_sink,
            scratch,
        )?);
        for &(l, s) in pairs.iter().filter(|(l, _)| *l == index) {
            let xs = sources.get(&s).ok_or_else(|| {
                Error::bug(format!(
                    "calibration: layer {l}'s source layer {s} does not come before it"
                ))
            })?;
            let mut m = Mat::<f64>::zeros(x.ncols(), x.ncols());
            accumulate_cross(&mut m, x.as_ref(), xs.as_ref());
            scale(&mut m, n);
            cross.insert((l, s), scratch.matrix(&m)?);
        }
        sources.retain(|&s, _| pairs.iter().any(|&(l, p)| p == s && l > index));
        if pairs.iter().any(|&(l, s)| s == index && l > index) {
            sources.insert(index, x);
        }
        if keep.heads.contains(&index) {
            // `Layer::forward`, its attention output (and queries) kept on the way.
            let z = if keep.queries.contains(&index) {
                let (z, q) = layer.attention_heads_and_queries(h.as_ref(), ctx, &mut state)?;
                kept.queries.insert(index, scratch.activations(q.as_ref())?);
                state.buffers.give(q);
                z
            } else {
                layer.attention_heads(h.as_ref(), ctx, &mut state)?
            };
            let o = layer.attention_output(z.as_ref(), &mut state);
            state.buffers.give(z);
            kept.outputs.insert(index, scratch.activations(o.as_ref())?);
            if index + 1 < layers {
                layer.finish_output(&mut h, o, &mut state);
            } else {
                state.buffers.give(o);
            }
        } else if index + 1 < layers {
            layer.forward(&mut h, ctx, &mut state)?;
        }
        progress.layer();
    }
    progress.finish();
    let inputs = FitInputs {
        covariances: Some(covariances),
        cross,
        weighting,
        attention,
        calibration: Some(text.record.clone()),
        ..FitInputs::default()
    };
    Ok((inputs, kept))
}
