//! `o_proj` compensation (`--compensate o_proj`): after a layer's fits replace its projections,
//! its `o_proj` is refitted on the calibration tokens so that the attention block's output from
//! the compressed heads matches the original model's. The refit is [`crate::fit::compensate`]'s
//! regularised least squares with the heads' outputs as inputs: `z_c` the compressed layer's (on
//! the compressed stream), `z_o` the original layer's (on the original stream), `O` the original
//! weight, `O' = O (S_oc + λI)(S_cc + λI)^{-1}` with `S_oc = E[z_o z_c^T]`, `S_cc = E[z_c z_c^T]`.
//! It is `O` bit for bit when the heads' outputs coincide.

use super::moments::{accumulate, accumulate_cross, identical, scale};
use crate::error::{Error, Result};
use crate::execute::{CompensatedProjection, CompensationReport};
use crate::fit::compensate::compensate_by;
use crate::fit::decompose::{product, DecomposeError};
use crate::forward::linear::Linear;
use crate::forward::Layer;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use crate::scratch::Scratch;
use faer::{Mat, MatRef};

/// The refit's ridge, relative to `S_cc`'s mean eigenvalue. The compressed heads' outputs span
/// fewer directions than the original ones, so their moment is ill-conditioned and a small ridge
/// overfits the calibration tokens. Measured on SmolLM2-135M at 25% of the K/V cache (4,096 wiki
/// calibration tokens, held-out wiki perplexity, base 20.77): ridge 1e-4 / 1e-2 / 0.1 / 0.3 / 1 gave
/// 38.20 / 35.99 / 34.82 / 34.77 / 35.15 (none: 48.16); see docs/quality.md.
pub const O_RIDGE: f64 = 0.1;

/// `||a - b||_F / ||b||_F` of two `[tokens, width]` activations (`0` when `b` is zero).
fn relative_distance(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for j in 0..b.ncols() {
        for i in 0..b.nrows() {
            let (x, y) = (f64::from(a[(i, j)]), f64::from(b[(i, j)]));
            diff += (x - y) * (x - y);
            norm += y * y;
        }
    }
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        0.0
    }
}

/// Tokens per unit of width above which the report's errors come from the moments (three
/// `width^3` products in `f64`) rather than from the tokens (three `tokens x width^2` products in
/// `f32`): SmolLM2's 8,192 calibration tokens over 576 columns take the first way, Llama-3-8B's
/// over 4,096 the second.
const MOMENTS_PER_WIDTH: usize = 4;

/// The second moments of the heads' outputs on the calibration tokens, `z_c` the compressed
/// layer's and `z_o` the original's: `E[z_c z_c^T]`, `E[z_o z_c^T]`, `E[z_o z_o^T]`.
struct HeadMoments<'m> {
    compressed: MatRef<'m, f64>,
    cross: MatRef<'m, f64>,
    original: MatRef<'m, f64>,
}

/// `sum_ij a_ij b_ij`.
fn inner(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    (0..a.ncols())
        .map(|j| (0..a.nrows()).map(|i| a[(i, j)] * b[(i, j)]).sum::<f64>())
        .sum()
}

impl HeadMoments<'_> {
    /// `||A z_c - O z_o|| / ||O z_o||` over the tokens, from the moments:
    /// `E||A z_c - O z_o||^2 = tr(A S_cc A^T) - 2 tr(A S_oc^T O^T) + tr(O S_oo O^T)` (`0` when
    /// `O z_o` is zero). No pass over the tokens: three `[out, width] x [width, width]` products.
    fn output_error(&self, a: MatRef<'_, f64>, o: MatRef<'_, f64>) -> f64 {
        let reference = inner(product(o, self.original).as_ref(), o);
        let own = inner(product(a, self.compressed).as_ref(), a);
        let cross = inner(product(a, self.cross.transpose()).as_ref(), o);
        let error = (own - 2.0 * cross + reference).max(0.0);
        if reference > 0.0 {
            (error / reference).sqrt()
        } else {
            0.0
        }
    }
}

/// Refits `layer`'s `o_proj` (the compressed layer, whose `o` is still the original weight) from
/// the heads' outputs of the original (`original`) and compressed (`compressed`) streams, both
/// `[tokens, heads * head_dim]`. Returns the refit, encoded as written, and the map decoded from
/// it (the original bias kept) for the rest of the pass; the bytes are kept in `scratch`.
pub fn compensate_output(
    checkpoint: &Checkpoint,
    layer: &Layer,
    original: MatRef<'_, f32>,
    compressed: MatRef<'_, f32>,
    scratch: &Scratch,
) -> Result<(CompensatedProjection, Linear)> {
    let name = checkpoint
        .config
        .arch
        .layer_tensor_name(layer.index, Role::Output)
        .ok_or_else(|| Error::bug(format!("layer {}: no o_proj name", layer.index)))?;
    let tensor = checkpoint
        .tensor_index(&name)
        .ok_or_else(|| Error::bug(format!("{name}: not in the checkpoint")))?;
    let t = &checkpoint.tensors[tensor];
    let ty = checkpoint.float_type(t, "compensated")?;
    let n = original.nrows() as f64;
    let mut c = Mat::<f64>::zeros(compressed.ncols(), compressed.ncols());
    accumulate(&mut c, compressed);
    scale(&mut c, n);
    // The same heads' outputs give the same moment, summed the same way: `O` comes back unchanged.
    let same = identical(original, compressed);
    let moment_of = |a: MatRef<'_, f32>, b: Option<MatRef<'_, f32>>| {
        let mut m = Mat::<f64>::zeros(a.ncols(), a.ncols());
        match b {
            Some(b) => accumulate_cross(&mut m, a, b),
            None => accumulate(&mut m, a),
        }
        scale(&mut m, n);
        m
    };
    let target = match same {
        true => c.clone(),
        false => moment_of(original, Some(compressed)),
    };
    // `weight_t` is `O^T` (`[in, out]`).
    let wt = &layer.o.weight_t;
    let o = Mat::<f64>::from_fn(wt.ncols(), wt.nrows(), |i, j| f64::from(wt[(j, i)]));
    let refit = compensate_by(o.as_ref(), target.as_ref(), c.as_ref(), O_RIDGE).map_err(
        |e: DecomposeError| {
            checkpoint.tensor_error(t, format!("layer {}: cannot compensate: {e}", layer.index))
        },
    )?;
    let bytes = ty.encode_rows(refit.as_ref());
    let values = ty.decode_f32(&bytes);
    let linear = Linear::from_row_major(&values, o.nrows(), o.ncols(), layer.o.bias.clone());
    // `weight_t` holds `O^T`: the same Frobenius norms.
    let change = relative_distance(linear.weight_t.as_ref(), layer.o.weight_t.as_ref());
    let (before, after) = if original.nrows() > MOMENTS_PER_WIDTH * original.ncols() {
        let written = Mat::<f64>::from_fn(o.nrows(), o.ncols(), |i, j| {
            f64::from(values[i * o.ncols() + j])
        });
        let own = match same {
            true => c.clone(),
            false => moment_of(original, None),
        };
        let moments = HeadMoments {
            compressed: c.as_ref(),
            cross: target.as_ref(),
            original: own.as_ref(),
        };
        (
            moments.output_error(o.as_ref(), o.as_ref()),
            moments.output_error(written.as_ref(), o.as_ref()),
        )
    } else {
        let reference = layer.o.apply(original);
        (
            relative_distance(layer.o.apply(compressed).as_ref(), reference.as_ref()),
            relative_distance(linear.apply(compressed).as_ref(), reference.as_ref()),
        )
    };
    let report = CompensationReport {
        layer: layer.index,
        tensor: name,
        relative_change: change,
        calibration_error_before: before,
        calibration_error_after: after,
    };
    Ok((
        CompensatedProjection {
            tensor,
            bytes: scratch.bytes(&bytes)?,
            report,
        },
        linear,
    ))
}

/// A compensated `o_proj` decoded for the forward pass (the bias of `bias`'s map kept).
pub fn decoded(
    checkpoint: &Checkpoint,
    projection: &CompensatedProjection,
    bias: Option<Vec<f32>>,
) -> Result<Linear> {
    let t = &checkpoint.tensors[projection.tensor];
    let ty = checkpoint.float_type(t, "compensated")?;
    let values = ty.decode_f32(&projection.bytes.load()?);
    Ok(Linear::from_row_major(
        &values, t.shape[0], t.shape[1], bias,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_error_from_moments_is_the_direct_one() {
        let (tokens, width, out) = (50, 6, 4);
        let value = |seed: usize| ((seed * 7919 + 13) % 101) as f32 / 50.0 - 1.0;
        let zo = Mat::<f32>::from_fn(tokens, width, |i, j| value(i * width + j));
        let zc = Mat::<f32>::from_fn(tokens, width, |i, j| {
            zo[(i, j)] + 0.3 * value(3 * i + 5 * j + 1)
        });
        let o = Mat::<f64>::from_fn(out, width, |i, j| f64::from(value(17 * i + j + 3)));
        let a = Mat::<f64>::from_fn(out, width, |i, j| {
            o[(i, j)] + 0.2 * f64::from(value(i + 11 * j))
        });
        let moment = |x: MatRef<'_, f32>, y: MatRef<'_, f32>| {
            let mut m = Mat::<f64>::zeros(width, width);
            accumulate_cross(&mut m, x, y);
            scale(&mut m, tokens as f64);
            m
        };
        let (cc, oc, oo) = (
            moment(zc.as_ref(), zc.as_ref()),
            moment(zo.as_ref(), zc.as_ref()),
            moment(zo.as_ref(), zo.as_ref()),
        );
        let moments = HeadMoments {
            compressed: cc.as_ref(),
            cross: oc.as_ref(),
            original: oo.as_ref(),
        };
        // Directly: `||A z_c - O z_o|| / ||O z_o||` token by token, in f64.
        let direct = |a: &Mat<f64>| {
            let (mut diff, mut norm) = (0.0, 0.0);
            for t in 0..tokens {
                for r in 0..out {
                    let y: f64 = (0..width).map(|k| o[(r, k)] * f64::from(zo[(t, k)])).sum();
                    let x: f64 = (0..width).map(|k| a[(r, k)] * f64::from(zc[(t, k)])).sum();
                    diff += (x - y) * (x - y);
                    norm += y * y;
                }
            }
            (diff / norm).sqrt()
        };
        for m in [&o, &a] {
            let got = moments.output_error(m.as_ref(), o.as_ref());
            assert!((got - direct(m)).abs() < 1e-9, "{got} vs {}", direct(m));
            assert!(got > 0.01);
        }
    }
}
