//! `o_proj` compensation (`--compensate o_proj`): after a layer's fits replace its projections,
//! its `o_proj` is refitted on the calibration tokens so that the attention block's output from
//! the compressed heads matches the original model's. The refit is [`crate::fit::compensate`]'s
//! regularised least squares with the heads' outputs as inputs: `z_c` the compressed layer's (on
//! the compressed stream), `y_o = O z_o` the original block's output (on the original stream,
//! through the original weight `O`, without its bias), `O' = O + (T - O S_cc)(S_cc + λI)^{-1}`
//! with `T = E[y_o z_c^T]`, `S_cc = E[z_c z_c^T]` ([`compensate_outputs`]: `T = O E[z_o z_c^T]`,
//! measured from the outputs the pass computes anyway instead of from a second moment of the
//! original heads).

use super::moments::{accumulate_cross_f32, accumulate_f32, scale};
use crate::error::{Error, Result};
use crate::execute::{CompensatedProjection, CompensationReport};
use crate::fit::compensate::{compensate_outputs, Product};
use crate::fit::decompose::{narrow, DecomposeError};
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

/// What the refit and its report read, on the calibration tokens: `S_cc = E[z_c z_c^T]` of the
/// compressed heads' outputs, `T = E[y_o z_c^T]` of the original block's outputs against them,
/// and `E||y_o||^2`.
struct OutputMoments {
    compressed: Mat<f64>,
    cross: Mat<f64>,
    energy: f64,
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

/// `m` in `f64`.
fn widen(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| f64::from(m[(i, j)]))
}

/// `sqrt(error / reference)`, `0` when `reference` is not positive.
fn relative(error: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        (error.max(0.0) / reference).sqrt()
    } else {
        0.0
    }
}

/// `output` (`[tokens, out]`) less `bias` from every row.
fn without_bias(output: MatRef<'_, f32>, bias: &[f32]) -> Mat<f32> {
    Mat::from_fn(output.nrows(), output.ncols(), |i, j| {
        output[(i, j)] - bias[j]
    })
}

impl OutputMoments {
    /// The moments of the original outputs `original` (`[tokens, out]`, no bias) and the
    /// compressed heads' outputs `compressed` (`[tokens, width]`), from `f32` products summed in
    /// `f64` ([`accumulate_f32`]).
    fn of(original: MatRef<'_, f32>, compressed: MatRef<'_, f32>) -> Self {
        let n = original.nrows() as f64;
        let width = compressed.ncols();
        let mut s_cc = Mat::<f64>::zeros(width, width);
        accumulate_f32(&mut s_cc, compressed);
        scale(&mut s_cc, n);
        let mut t = Mat::<f64>::zeros(original.ncols(), width);
        accumulate_cross_f32(&mut t, original, compressed);
        scale(&mut t, n);
        let energy = (0..original.ncols())
            .map(|j| {
                (0..original.nrows())
                    .map(|i| f64::from(original[(i, j)]).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n;
        OutputMoments {
            compressed: s_cc,
            cross: t,
            energy,
        }
    }

    /// `||M z_c - y_o|| / ||y_o||` over the tokens for `M = O` (before the refit; `o_cc` is
    /// `O S_cc`) and `M = A` (after it), from the moments:
    /// `E||M z_c - y_o||^2 = tr(M S_cc M^T) - 2 tr(M T^T) + E||y_o||^2`. No pass over the tokens:
    /// one `[out, width] x [width, width]` product in `f32` besides `o_cc` (the report's
    /// figures, good to about five digits), each inner product summed in `f64`.
    fn output_errors(
        &self,
        (o, o_cc): (MatRef<'_, f32>, MatRef<'_, f32>),
        a: MatRef<'_, f32>,
    ) -> (f64, f64) {
        let (cc, t) = (
            narrow(self.compressed.as_ref()),
            narrow(self.cross.as_ref()),
        );
        let reference = self.energy;
        let before = inner(o_cc, o) - 2.0 * inner(t.as_ref(), o);
        let after = inner(product_f32(a, cc.as_ref()).as_ref(), a) - 2.0 * inner(t.as_ref(), a);
        (
            relative(before + reference, reference),
            relative(after + reference, reference),
        )
    }
}

/// Refits `layer`'s `o_proj` (the compressed layer, whose `o` is still the original weight) from
/// the original block's attention output `original` (`[tokens, hidden]`, what the original
/// `o_proj` computed on the original stream, its bias included: [`Layer::attention_output`]) and
/// the compressed heads' outputs `compressed` (`[tokens, heads * head_dim]`). Returns the refit,
/// encoded as written, and the map decoded from it (the original bias kept) for the rest of the
/// pass; the bytes are kept in `scratch`.
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
    // `weight_t` is `O^T` (`[in, out]`).
    let o32 = layer.o.weight_t.transpose();
    if original.ncols() != o32.nrows() || compressed.ncols() != o32.ncols() {
        return Err(Error::bug(format!(
            "layer {}: o_proj refit on outputs of width {} and heads of width {} for a {}x{} o_proj",
            layer.index,
            original.ncols(),
            compressed.ncols(),
            o32.nrows(),
            o32.ncols()
        )));
    }
    let unbiased = layer.o.bias.as_deref().map(|b| without_bias(original, b));
    let moments = OutputMoments::of(unbiased.as_ref().map_or(original, Mat::as_ref), compressed);
    drop(unbiased);
    let o_cc = product_f32(o32, narrow(moments.compressed.as_ref()).as_ref());
    let o = widen(o32);
    let refit = compensate_outputs(
        o.as_ref(),
        (moments.cross.as_ref(), widen(o_cc.as_ref()).as_ref()),
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
    let (before, after) = moments.output_errors((o32, o_cc.as_ref()), linear.weight_t.transpose());
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
        let yo = product_f32(zo.as_ref(), o.transpose());
        let moments = OutputMoments::of(yo.as_ref(), zc.as_ref());
        let o_cc = product_f32(o.as_ref(), narrow(moments.compressed.as_ref()).as_ref());
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
        let (before, after) = moments.output_errors((o.as_ref(), o_cc.as_ref()), a.as_ref());
        for (got, want) in [(before, direct(&o)), (after, direct(&a))] {
            assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
            assert!(got > 0.01);
        }
    }

    #[test]
    fn a_bias_is_taken_off_every_row() {
        let y = Mat::<f32>::from_fn(3, 2, |i, j| (i * 2 + j) as f32);
        let u = without_bias(y.as_ref(), &[1.0, -2.0]);
        assert_eq!((u[(2, 0)], u[(2, 1)]), (3.0, 7.0));
    }
}
