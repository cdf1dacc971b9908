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
use crate::fit::decompose::DecomposeError;
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
    let target = if identical(original, compressed) {
        c.clone()
    } else {
        let mut target = Mat::<f64>::zeros(original.ncols(), compressed.ncols());
        accumulate_cross(&mut target, original, compressed);
        scale(&mut target, n);
        target
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
    let reference = layer.o.apply(original);
    let report = CompensationReport {
        layer: layer.index,
        tensor: name,
        relative_change: change,
        calibration_error_before: relative_distance(
            layer.o.apply(compressed).as_ref(),
            reference.as_ref(),
        ),
        calibration_error_after: relative_distance(
            linear.apply(compressed).as_ref(),
            reference.as_ref(),
        ),
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
