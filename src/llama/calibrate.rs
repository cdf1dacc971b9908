//! Calibration for `--fit act`: the original model runs over calibration text and, per layer, the
//! second moment `C = X^T X / N` of the attention input (the hidden state after `input_layernorm`,
//! what `q_proj`/`k_proj`/`v_proj` read) is accumulated.
//!
//! The pass goes layer by layer over all calibration tokens at once: the hidden states of the `N`
//! tokens (`[N, hidden]`, `f32`) and one layer's decoded weights are in memory at a time, weights
//! streamed from the memory map, so memory is bounded by the activations, not the model. The
//! statistics are `f64`, `hidden^2` values per layer.

use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::llama::tokenize::TextTokenizer;
use crate::llama::Llama;
use crate::options::Calibration;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use serde::Serialize;

/// What a calibration pass measured, and on what.
#[derive(Debug)]
pub struct CalibrationStats {
    /// Per layer, `X^T X / N` of the attention input, `[hidden, hidden]`.
    pub covariances: Vec<Mat<f64>>,
    /// Provenance, recorded in `surgery.json`.
    pub record: CalibrationRecord,
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
    /// Tokens used.
    pub tokens: usize,
    /// Window length of the forward pass.
    pub ctx: usize,
}

/// `acc += x^T x` in `f64` (`x` `[rows, hidden]`), single-threaded so the sums do not depend on
/// the thread count.
pub fn accumulate(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
    let x64 = Mat::<f64>::from_fn(x.nrows(), x.ncols(), |i, j| f64::from(x[(i, j)]));
    matmul(
        acc.as_mut(),
        Accum::Add,
        x64.transpose(),
        x64.as_ref(),
        1.0,
        Par::Seq,
    );
}

/// Runs the calibration pass of `calibration` over `checkpoint`.
pub fn calibrate(checkpoint: &Checkpoint, calibration: &Calibration) -> Result<CalibrationStats> {
    let source = &calibration.text;
    let text = source.load("--calibrate")?;
    let ids = TextTokenizer::load(&checkpoint.dir)?.encode(&text.text)?;
    let (offset, wanted) = (calibration.offset, calibration.tokens.get());
    let end = offset
        .checked_add(wanted)
        .filter(|&e| e <= ids.len())
        .ok_or_else(|| {
            Error::usage(
                "--calib-tokens",
                format!(
                    "{source} has {} tokens; --calib-offset {offset} + --calib-tokens {wanted} exceeds it",
                    ids.len()
                ),
            )
        })?;
    let ids = &ids[offset..end];
    let ctx = calibration.ctx.get();
    let llama = Llama::new(checkpoint)?;
    let mut h = llama.embed(ids)?;
    let layers = checkpoint.config.num_layers;
    let hidden = checkpoint.config.hidden_size;
    let mut covariances = Vec::with_capacity(layers);
    for index in 0..layers {
        let layer = llama.layer(index)?;
        let x = layer.attention_input(h.as_ref());
        let mut c = Mat::<f64>::zeros(hidden, hidden);
        accumulate(&mut c, x.as_ref());
        drop(x);
        let n = ids.len() as f64;
        for j in 0..hidden {
            for i in 0..hidden {
                c[(i, j)] /= n;
            }
        }
        covariances.push(c);
        if index + 1 < layers {
            layer.forward(&mut h, ctx);
        }
    }
    Ok(CalibrationStats {
        covariances,
        record: CalibrationRecord {
            file: source.to_string(),
            sha256: text.sha256,
            offset,
            tokens: ids.len(),
            ctx,
        },
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
}
