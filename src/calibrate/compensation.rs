//! `o_proj` compensation (`--compensate o_proj`): after a layer's fits replace its projections,
//! its `o_proj` is refitted on the calibration tokens so that the attention block's output from
//! the compressed heads matches the original model's. The refit is [`crate::fit::compensate`]'s
//! regularised least squares with the heads' outputs as inputs: `z_c` the compressed layer's (on
//! the compressed stream), `z_o` the original layer's (on the original stream), `O` the original
//! weight, `O' = O (S_oc + λI)(S_cc + λI)^{-1}` with `S_oc = E[z_o z_c^T]`, `S_cc = E[z_c z_c^T]`.
//! It is `O` bit for bit when the heads' outputs coincide.

use super::moments::{accumulate_cross_f32, accumulate_f32, identical, scale};
use crate::error::{Error, Result};
use crate::execute::{CompensatedProjection, CompensationReport};
use crate::fit::compensate::{compensate_by, narrow, Product};
use crate::fit::decompose::DecomposeError;
use crate::forward::linear::Linear;
use crate::forward::Layer;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use crate::scratch::Scratch;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

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

/// The second moments of the heads' outputs on the calibration tokens, `z_c` the compressed
/// layer's and `z_o` the original's: `E[z_c z_c^T]`, `E[z_o z_c^T]`, `E[z_o z_o^T]`.
struct HeadMoments {
    compressed: Mat<f64>,
    cross: Mat<f64>,
    original: Mat<f64>,
}

/// `sum_ij a_ij b_ij`, summed in `f64`.
fn inner(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f64 {
    (0..a.ncols())
        .map(|j| {
            (0..a.nrows())
                .map(|i| f64::from(a[(i, j)]) * f64::from(b[(i, j)]))
                .sum::<f64>()
        })
        .sum()
}

/// `a b` in `f32`.
fn product_f32(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::rayon(0));
    out
}

/// `sqrt(error / reference)`, `0` when `reference` is not positive.
fn relative(error: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        (error.max(0.0) / reference).sqrt()
    } else {
        0.0
    }
}

impl HeadMoments {
    /// The moments of `original` and `compressed` (`[tokens, width]`), from `f32` products
    /// summed in `f64` ([`accumulate_f32`]); the same heads' outputs give the same moment three
    /// times, summed the same way (the refit is then `O` itself).
    fn of(original: MatRef<'_, f32>, compressed: MatRef<'_, f32>) -> Self {
        let n = original.nrows() as f64;
        let width = compressed.ncols();
        let moment = |a: MatRef<'_, f32>, b: Option<MatRef<'_, f32>>| {
            let mut m = Mat::<f64>::zeros(width, width);
            match b {
                Some(b) => accumulate_cross_f32(&mut m, a, b),
                None => accumulate_f32(&mut m, a),
            }
            scale(&mut m, n);
            m
        };
        let compressed_moment = moment(compressed, None);
        if identical(original, compressed) {
            return HeadMoments {
                cross: compressed_moment.clone(),
                original: compressed_moment.clone(),
                compressed: compressed_moment,
            };
        }
        HeadMoments {
            cross: moment(original, Some(compressed)),
            original: moment(original, None),
            compressed: compressed_moment,
        }
    }

    /// `||M z_c - O z_o|| / ||O z_o||` over the tokens for `M = O` (before the refit) and
    /// `M = A` (after it), from the moments:
    /// `E||M z_c - O z_o||^2 = tr(M S_cc M^T) - 2 tr(M S_oc^T O^T) + tr(O S_oo O^T)`. No pass over
    /// the tokens: four `[out, width] x [width, width]` products in `f32` (the report's figures,
    /// good to about five digits), each inner product summed in `f64`.
    fn output_errors(&self, o: MatRef<'_, f32>, a: MatRef<'_, f32>) -> (f64, f64) {
        let (cc, oc, oo) = (
            narrow(self.compressed.as_ref()),
            narrow(self.cross.as_ref()),
            narrow(self.original.as_ref()),
        );
        let o_oc = product_f32(o, oc.as_ref());
        let reference = inner(product_f32(o, oo.as_ref()).as_ref(), o);
        let before = inner(product_f32(o, cc.as_ref()).as_ref(), o) - 2.0 * inner(o_oc.as_ref(), o);
        let after = inner(product_f32(a, cc.as_ref()).as_ref(), a) - 2.0 * inner(o_oc.as_ref(), a);
        (
            relative(before + reference, reference),
            relative(after + reference, reference),
        )
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
    let moments = HeadMoments::of(original, compressed);
    // `weight_t` is `O^T` (`[in, out]`).
    let wt = &layer.o.weight_t;
    let o = Mat::<f64>::from_fn(wt.ncols(), wt.nrows(), |i, j| f64::from(wt[(j, i)]));
    let refit = compensate_by(
        o.as_ref(),
        moments.cross.as_ref(),
        moments.compressed.as_ref(),
        (O_RIDGE, Product::F32),
    )
    .map_err(|e: DecomposeError| {
        checkpoint.tensor_error(t, format!("layer {}: cannot compensate: {e}", layer.index))
    })?;
    let bytes = ty.encode_rows(refit.as_ref());
    let values = ty.decode_f32(&bytes);
    let linear = Linear::from_row_major(&values, o.nrows(), o.ncols(), layer.o.bias.clone());
    // `weight_t` holds `O^T`: the same Frobenius norms.
    let change = relative_distance(linear.weight_t.as_ref(), layer.o.weight_t.as_ref());
    let (before, after) =
        moments.output_errors(layer.o.weight_t.transpose(), linear.weight_t.transpose());
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
    fn the_output_errors_from_moments_are_the_direct_ones() {
        let (tokens, width, out) = (600, 6, 4);
        let value = |seed: usize| ((seed * 7919 + 13) % 101) as f32 / 50.0 - 1.0;
        let zo = Mat::<f32>::from_fn(tokens, width, |i, j| value(i * width + j));
        let zc = Mat::<f32>::from_fn(tokens, width, |i, j| {
            zo[(i, j)] + 0.3 * value(3 * i + 5 * j + 1)
        });
        let o = Mat::<f32>::from_fn(out, width, |i, j| value(17 * i + j + 3));
        let a = Mat::<f32>::from_fn(out, width, |i, j| o[(i, j)] + 0.2 * value(i + 11 * j));
        let moments = HeadMoments::of(zo.as_ref(), zc.as_ref());
        // Directly: `||M z_c - O z_o|| / ||O z_o||` token by token, in f64.
        let direct = |m: &Mat<f32>| {
            let (mut diff, mut norm) = (0.0, 0.0);
            for t in 0..tokens {
                for r in 0..out {
                    let dot = |w: &Mat<f32>, z: &Mat<f32>| -> f64 {
                        (0..width)
                            .map(|k| f64::from(w[(r, k)]) * f64::from(z[(t, k)]))
                            .sum()
                    };
                    let (x, y) = (dot(m, &zc), dot(&o, &zo));
                    diff += (x - y) * (x - y);
                    norm += y * y;
                }
            }
            (diff / norm).sqrt()
        };
        let (before, after) = moments.output_errors(o.as_ref(), a.as_ref());
        for (got, want) in [(before, direct(&o)), (after, direct(&a))] {
            assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
            assert!(got > 0.01);
        }
        // The same heads' outputs: no error before, and the moments are one.
        let same = HeadMoments::of(zo.as_ref(), zo.as_ref());
        assert_eq!(same.output_errors(o.as_ref(), o.as_ref()).0, 0.0);
        assert_eq!(same.cross, same.compressed);
    }
}
