//! Calibration for `--fit act`: the original model runs over calibration text and, per layer, the
//! second moment `C = X^T X / N` of the attention input (the hidden state after `input_layernorm`,
//! what `q_proj`/`k_proj`/`v_proj` read) is accumulated.
//!
//! The pass goes layer by layer over all calibration tokens at once: the hidden states of the `N`
//! tokens (`[N, hidden]`, `f32`) and one layer's decoded weights are in memory at a time, weights
//! streamed from the memory map, so memory is bounded by the activations, not the model. The
//! statistics are `f64`, `hidden^2` values per layer.
//!
//! For a shared latent across layers (`--share latent`), each later layer `l` of a group also
//! accumulates the cross second moment `E[x_l x_s^T]` with the group's source layer `s`: the
//! source's attention input is kept while the pass crosses its group (one more `[N, hidden]`
//! activation), and one more `hidden^2` matrix per such layer.

use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::llama::score::read_text;
use crate::llama::stream::TextSpan;
use crate::llama::windows::{check_ctx, lay_out};
use crate::llama::Llama;
use crate::model::bos::BosToken;
use crate::options::{Allocation, BosSink, Calibration};
use crate::scratch::{Moment, Scratch};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use serde::Serialize;
use std::collections::BTreeMap;

/// What a calibration pass measured, and on what.
#[derive(Debug)]
pub struct CalibrationStats {
    /// Per layer, `X^T X / N` of the attention input, `[hidden, hidden]`.
    pub covariances: Vec<Moment>,
    /// `X_l^T X_s / N` of layer `l` with source layer `s`, by `(l, s)`, `[hidden, hidden]`.
    pub cross: BTreeMap<(usize, usize), Moment>,
    /// Provenance, recorded in `surgery.json`.
    pub record: CalibrationRecord,
    /// Per layer, what the family's score function needs beyond the input moment.
    pub attention: Vec<AttentionStats>,
}

/// What calibration measured of one layer's attention beyond its input moment: the pieces of the
/// family's own score function that `W_q C W_q^T` leaves out, and the BOS position (the sink).
#[derive(Debug, Clone, Default)]
pub struct AttentionStats {
    /// Per KV head, summed over the query heads reading it, the second moment of the queries as
    /// the scores read them (after the family's per-head `q_norm`), `[kv_dim, kv_dim]`
    /// block-diagonal; `None` where the family has no query norm (then `W_q C W_q^T` is exact).
    pub queries: Option<Moment>,
    /// The effective weights of the per-head `k_norm` (`head_dim`), where the family has one.
    pub key_gain: Option<Vec<f64>>,
    /// The effective weights of the norm on the attention block's output (Gemma's
    /// `post_attention_layernorm`, `hidden`), where the family has one.
    pub output_gain: Option<Vec<f64>>,
    /// The attention input at a window's first position when windows start with a BOS: the same
    /// in every window (position 0 sees itself only), `hidden`.
    pub sink: Option<Vec<f64>>,
}

/// `sum_h Q_h^T Q_h / n` over the query heads, each added to its KV head's diagonal block:
/// `[kv_heads * head_dim]` square.
fn query_moment(
    q: MatRef<'_, f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    n: f64,
) -> Mat<f64> {
    let group = (heads / kv_heads.max(1)).max(1);
    let mut m = Mat::<f64>::zeros(kv_heads * head_dim, kv_heads * head_dim);
    for h in 0..heads {
        let j = h / group;
        let mut block = Mat::<f64>::zeros(head_dim, head_dim);
        accumulate(&mut block, q.subcols(h * head_dim, head_dim));
        for a in 0..head_dim {
            for b in 0..head_dim {
                m[(j * head_dim + a, j * head_dim + b)] += block[(a, b)] / n;
            }
        }
    }
    m
}

/// One layer's [`AttentionStats`] on its attention input `x` (`sink`: a BOS leads the windows).
pub(crate) fn attention_stats(
    layer: &crate::llama::Layer,
    x: MatRef<'_, f32>,
    sink: bool,
    scratch: &Scratch,
) -> Result<AttentionStats> {
    let widen = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let s = &layer.shape;
    let queries = match &layer.qk_norm {
        Some(_) => {
            let q = layer.normed_queries(x);
            let m = query_moment(
                q.as_ref(),
                s.num_heads,
                s.num_kv_heads,
                s.head_dim,
                x.nrows() as f64,
            );
            Some(scratch.matrix(&m)?)
        }
        None => None,
    };
    Ok(AttentionStats {
        queries,
        key_gain: layer.qk_norm.as_ref().map(|(_, k)| widen(k)),
        output_gain: layer.output_norms.as_ref().map(|n| widen(&n.attention)),
        sink: (sink && x.nrows() > 0)
            .then(|| (0..x.ncols()).map(|j| f64::from(x[(0, j)])).collect()),
    })
}

/// The calibration's provenance.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationRecord {
    /// The text file as given, or `built-in:calibration`.
    pub file: String,
    /// Its SHA-256.
    pub sha256: String,
    /// First token used (of the whole file's tokens, no special tokens).
    pub offset: usize,
    /// Text tokens used.
    pub tokens: usize,
    /// Window length of the forward pass (positions, a BOS included).
    pub ctx: usize,
    /// The token every window starts with (`null`: none, the windows are text alone).
    pub bos: Option<BosToken>,
    /// Text tokens that are the tokenizer's unknown token (`<unk>`): text it cannot represent.
    pub unknown_tokens: usize,
    /// Where the windows start with a BOS: `exact` (the fits keep its keys and values exactly) or
    /// `fitted` (`--bos-sink`); absent without a BOS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_sink: Option<&'static str>,
    /// How the built-in text's dialogue was written for this model: `chat template` (its own,
    /// as instruct models are used) or `plain text` (absent for a `--calibrate` file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialogue: Option<&'static str>,
    /// `sequential` for sequential calibration (absent: one-shot, the original model's inputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// `sensitivity` when `budget:F` was allocated by measured sensitivity (absent: by spectra).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<&'static str>,
}

/// Columns of a moment computed by one task of [`accumulate`] and [`accumulate_cross`].
const BLOCK_COLUMNS: usize = 32;

/// `x` widened to `f64`.
fn widen(x: MatRef<'_, f32>) -> Mat<f64> {
    Mat::<f64>::from_fn(x.nrows(), x.ncols(), |i, j| f64::from(x[(i, j)]))
}

/// `a^T b` by fixed blocks of `BLOCK_COLUMNS` columns of `b` (`cols` columns; `b(start, n)` gives
/// columns `start..start + n` in `f64`, so `b` is never widened whole), computed in parallel, each
/// summed single-threaded, so the sums do not depend on the thread count. With `lower`, `b` is `a`
/// and only each block's rows from its first column down are computed (the product is symmetric):
/// half the work. Returns each block's first column and its rows from `row0` (0, or with `lower`
/// the block's first column).
fn column_blocks(
    a: MatRef<'_, f64>,
    cols: usize,
    b: impl Fn(usize, usize) -> Mat<f64> + Sync,
    lower: bool,
) -> Vec<(usize, Mat<f64>)> {
    use rayon::prelude::*;
    (0..cols)
        .step_by(BLOCK_COLUMNS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let n = BLOCK_COLUMNS.min(cols - start);
            let row0 = if lower { start } else { 0 };
            let left = a.subcols(row0, a.ncols() - row0);
            let mut out = Mat::<f64>::zeros(left.ncols(), n);
            matmul(
                out.as_mut(),
                Accum::Replace,
                left.transpose(),
                b(start, n).as_ref(),
                1.0,
                Par::Seq,
            );
            (start, out)
        })
        .collect()
}

/// `acc += x^T x` in `f64` (`x` `[rows, hidden]`): a symmetric rank-k update, the lower triangle
/// computed (in parallel over fixed column blocks, see [`column_blocks`]) and mirrored, so the
/// result is exactly symmetric and does not depend on the thread count.
pub fn accumulate(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
    let x64 = widen(x);
    let columns = |start: usize, n: usize| x64.subcols(start, n).to_owned();
    for (start, block) in column_blocks(x64.as_ref(), x64.ncols(), columns, true) {
        for j in 0..block.ncols() {
            for i in j..block.nrows() {
                let (row, col) = (start + i, start + j);
                let v = block[(i, j)];
                acc[(row, col)] += v;
                if row != col {
                    acc[(col, row)] += v;
                }
            }
        }
    }
}

/// Whether two activations are the same, bit for bit.
pub fn identical(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> bool {
    a.nrows() == b.nrows()
        && a.ncols() == b.ncols()
        && (0..a.ncols())
            .all(|j| (0..a.nrows()).all(|i| a[(i, j)].to_bits() == b[(i, j)].to_bits()))
}

/// `acc += a^T b` in `f64` (`a`, `b` `[rows, hidden]`), in parallel over fixed blocks of
/// columns, each summed single-threaded in row order: the sums do not depend on the thread count.
pub fn accumulate_cross(acc: &mut Mat<f64>, a: MatRef<'_, f32>, b: MatRef<'_, f32>) {
    let a64 = widen(a);
    let columns = |start: usize, n: usize| widen(b.subcols(start, n));
    for (start, block) in column_blocks(a64.as_ref(), b.ncols(), columns, false) {
        for j in 0..block.ncols() {
            for i in 0..block.nrows() {
                acc[(i, start + j)] += block[(i, j)];
            }
        }
    }
}

/// Divides every entry of `m` by `n`.
pub(crate) fn scale(m: &mut Mat<f64>, n: f64) {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            m[(i, j)] /= n;
        }
    }
}

/// The calibration positions of `calibration` (its text tokenized by the model's tokenizer, the
/// text tokens `--calib-offset .. + --calib-tokens`, laid out in windows of `--calib-ctx` by the
/// model's convention: [`crate::llama::windows`]) and their provenance.
pub fn calibration_tokens(
    checkpoint: &Checkpoint,
    calibration: &Calibration,
) -> Result<(Vec<u32>, CalibrationRecord)> {
    let source = &calibration.text;
    let (offset, wanted) = (calibration.offset, calibration.tokens.get());
    let span = TextSpan {
        offset,
        tokens: wanted,
    };
    let text = read_text(
        &checkpoint.dir,
        source,
        "--calibrate",
        calibration.bos,
        span,
    )?;
    let ctx = calibration.ctx.get();
    check_ctx(ctx, text.bos_id(), "--calib-ctx")?;
    let end = offset
        .checked_add(wanted)
        .filter(|&e| e <= text.total)
        .ok_or_else(|| {
            Error::usage(
                "--calib-tokens",
                format!(
                    "{source} has {} tokens; --calib-offset {offset} + --calib-tokens {wanted} exceeds it",
                    text.total
                ),
            )
        })?;
    let used = text.slice(offset..end)?;
    let unknown_tokens = text
        .unknown
        .map_or(0, |u| used.iter().filter(|&&t| t == u).count());
    let ids = lay_out(used, ctx, text.bos_id());
    let tokens = used.len();
    let record = CalibrationRecord {
        file: source.to_string(),
        sha256: text.sha256,
        offset,
        tokens,
        ctx,
        bos_sink: text.bos.as_ref().map(|_| calibration.sink.name()),
        bos: text.bos,
        unknown_tokens,
        dialogue: text.dialogue,
        mode: None,
        allocation: (calibration.allocation == Allocation::Sensitivity)
            .then(|| calibration.allocation.name()),
    };
    Ok((ids, record))
}

/// A layer with full attention cannot read a shared latent from a source with a sliding window:
/// the source's cache keeps only its window's tokens (the factored module refuses such a
/// checkpoint, so the conversion refuses it first). `pairs` are `(layer, source)`.
fn refuse_sliding_sources(llama: &Llama, pairs: &[(usize, usize)]) -> Result<()> {
    let p = llama.params();
    let window = |l: usize| p.layer_shape(l).sliding_window;
    match pairs.iter().find(|&&(l, s)| window(s).is_some() && window(l).is_none()) {
        Some(&(l, s)) => Err(crate::error::Error::invalid(
            llama.checkpoint().dir.join(crate::model::layout::CONFIG_FILE),
            format!("--share latent: layer {l} attends to every token but would read the latent of layer {s}, whose sliding window caches only its last tokens (use --share basis, or --share-layers that keep such layers apart)"),
        )),
        None => Ok(()),
    }
}

/// Runs the calibration pass of `calibration` over `checkpoint`. `pairs` lists the `(layer,
/// source)` cross moments to accumulate (`source < layer`: a shared latent group's source layer
/// and one of its later layers). The moments are kept in `scratch`.
pub fn calibrate(
    checkpoint: &Checkpoint,
    calibration: &Calibration,
    pairs: &[(usize, usize)],
    scratch: &Scratch,
) -> Result<CalibrationStats> {
    let (ids, record) = calibration_tokens(checkpoint, calibration)?;
    let ids = &ids[..];
    let ctx = record.ctx;
    let llama = Llama::new(checkpoint)?;
    refuse_sliding_sources(&llama, pairs)?;
    let mut h = llama.embed(ids)?;
    let layers = checkpoint.config.num_layers;
    let hidden = checkpoint.config.hidden_size;
    let mut covariances = Vec::with_capacity(layers);
    let mut attention = Vec::with_capacity(layers);
    let sink = record.bos.is_some() && calibration.sink == BosSink::Exact;
    let mut cross = BTreeMap::new();
    // The attention inputs of source layers still needed by a later layer.
    let mut kept: BTreeMap<usize, Mat<f32>> = BTreeMap::new();
    let n = ids.len() as f64;
    let mut state = crate::llama::PassState::default();
    for index in 0..layers {
        let layer = llama.layer(index)?;
        let x = layer.attention_input(h.as_ref());
        let mut c = Mat::<f64>::zeros(hidden, hidden);
        accumulate(&mut c, x.as_ref());
        scale(&mut c, n);
        covariances.push(scratch.matrix(&c)?);
        drop(c);
        attention.push(attention_stats(&layer, x.as_ref(), sink, scratch)?);
        for &(l, s) in pairs.iter().filter(|(l, _)| *l == index) {
            let xs = kept.get(&s).ok_or_else(|| {
                Error::bug(format!(
                    "calibration: layer {l}'s source layer {s} does not come before it"
                ))
            })?;
            let mut m = Mat::<f64>::zeros(hidden, hidden);
            accumulate_cross(&mut m, x.as_ref(), xs.as_ref());
            scale(&mut m, n);
            cross.insert((l, s), scratch.matrix(&m)?);
        }
        kept.retain(|&s, _| pairs.iter().any(|&(l, p)| p == s && l > index));
        if pairs.iter().any(|&(l, s)| s == index && l > index) {
            kept.insert(index, x);
        }
        if index + 1 < layers {
            layer.forward(&mut h, ctx, &mut state)?;
        }
    }
    Ok(CalibrationStats {
        covariances,
        cross,
        record,
        attention,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_equals_the_direct_sum() {
        let x = Mat::<f32>::from_fn(7, 3, |i, j| (i as f32 - 2.5) * (j as f32 + 0.5));
        let mut acc = Mat::<f64>::zeros(3, 3);
        // Two chunks accumulate to the same as one pass over all rows.
        accumulate(&mut acc, x.subrows(0, 4));
        accumulate(&mut acc, x.subrows(4, 3));
        for a in 0..3 {
            for b in 0..3 {
                let direct: f64 = (0..7)
                    .map(|i| f64::from(x[(i, a)]) * f64::from(x[(i, b)]))
                    .sum();
                assert!((acc[(a, b)] - direct).abs() < 1e-9, "({a}, {b})");
            }
        }
    }

    #[test]
    fn cross_accumulation_equals_the_direct_sum() {
        let a = Mat::<f32>::from_fn(9, 40, |i, j| ((i * 7 + j * 3) % 11) as f32 - 5.0);
        let b = Mat::<f32>::from_fn(9, 40, |i, j| ((i * 5 + j * 2) % 13) as f32 * 0.25);
        let mut acc = Mat::<f64>::zeros(40, 40);
        accumulate_cross(&mut acc, a.as_ref(), b.as_ref());
        for p in 0..40 {
            for q in 0..40 {
                let direct: f64 = (0..9)
                    .map(|i| f64::from(a[(i, p)]) * f64::from(b[(i, q)]))
                    .sum();
                assert!((acc[(p, q)] - direct).abs() < 1e-9, "({p}, {q})");
            }
        }
    }
}
