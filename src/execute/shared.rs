//! The calibrated fit of a group spanning several layers (`--share-layers`): its stacked matrix
//! split back into layers, each with its calibration moments and fit `act`'s weighting, handed to
//! [`crate::fit::shared`].

use super::weighting::layer_weight;
use super::FitInputs;
use crate::error::{Error, Result};
use crate::fit::compensate::compensate;
use crate::fit::shared::{shared_basis, shared_latent_from, LayerTerm, SharedDecomposition};
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::plan::{GroupPlan, Share};
use crate::scratch::Moment;
use faer::{Mat, MatRef};
use std::borrow::Cow;

/// One layer of a group as its fit reads it.
struct LayerInputs<'a> {
    /// The layer's stacked members.
    members: Vec<usize>,
    /// Its rows of the stacked weight.
    w: MatRef<'a, f64>,
    /// Sequential calibration, shared basis: `w` refitted to the compressed model's inputs.
    refit: Option<Mat<f64>>,
    /// The moment its output energy is measured under.
    c: Cow<'a, Mat<f64>>,
    /// Its cross moment with the group's latent input (`None`: `c` itself).
    cross: Option<Cow<'a, Mat<f64>>>,
}

/// Layer `layer`'s weight and moments (`c` its one-shot covariance): one-shot, the layer's own
/// (its cross moment with the source for a later layer of a latent); sequential, the source's
/// cross moment with the compressed source input, a basis layer refitted to its compressed input.
fn layer_inputs<'a>(
    group: &GroupPlan,
    share: Share,
    inputs: &'a FitInputs,
    layer: usize,
    w: MatRef<'a, f64>,
    c: &'a Moment,
    fail: &dyn Fn(String) -> Error,
) -> Result<LayerInputs<'a>> {
    let plain = |c: Cow<'a, Mat<f64>>, cross: Option<Cow<'a, Mat<f64>>>| LayerInputs {
        members: Vec::new(),
        w,
        refit: None,
        c,
        cross,
    };
    Ok(
        match (share, layer == group.layer, inputs.sequential_at(layer)) {
            (Share::Latent, false, _) => {
                let cross = inputs.cross.get(&(layer, group.layer)).ok_or_else(|| {
                    Error::bug(format!(
                        "no cross moment of layers {layer} and {}",
                        group.layer
                    ))
                })?;
                plain(c.load()?, Some(cross.load()?))
            }
            (Share::Latent, true, Some(m)) => plain(c.load()?, Some(m.target.load()?)),
            (Share::Basis, _, Some(m)) => {
                let compressed = m.compressed.load()?;
                let refit = compensate(w, (*m.target.load()?).as_ref(), (*compressed).as_ref())
                    .map_err(|e| fail(format!("layer {layer}: {e}")))?;
                LayerInputs {
                    refit: Some(refit),
                    ..plain(compressed, None)
                }
            }
            (_, _, None) => plain(c.load()?, None),
        },
    )
}

/// Fits `group` (stacked as `w`, every layer's members in turn) with the shared basis or latent.
pub(crate) fn fit_shared(
    checkpoint: &Checkpoint,
    group: &GroupPlan,
    share: Share,
    inputs: &FitInputs,
    w: MatRef<'_, f64>,
    spec: Spec,
) -> Result<SharedDecomposition> {
    let first = &checkpoint.tensors[group.members[0]];
    let fail = |message: String| {
        Error::tensor(
            &checkpoint.shards[first.shard].path,
            &first.name,
            format!(
                "layers {}-{}: cannot decompose: {message}",
                group.layer,
                group.layer + group.layers - 1
            ),
        )
    };
    let covariances = inputs
        .covariances
        .as_ref()
        .ok_or_else(|| fail("fit act needs calibration statistics".into()))?;
    let mut layers: Vec<LayerInputs<'_>> = Vec::with_capacity(group.layers);
    let mut row0 = 0;
    for layer in group.layer_range() {
        let members: Vec<usize> = group
            .members
            .iter()
            .copied()
            .filter(|&i| checkpoint.tensors[i].class.layer == Some(layer))
            .collect();
        let rows: usize = members
            .iter()
            .map(|&i| checkpoint.tensors[i].shape[0])
            .sum();
        let c = covariances
            .get(layer)
            .ok_or_else(|| fail(format!("no calibration statistics for layer {layer}")))?;
        let mut l = layer_inputs(group, share, inputs, layer, w.subrows(row0, rows), c, &fail)?;
        l.members = members;
        layers.push(l);
        row0 += rows;
    }
    let mut terms = Vec::with_capacity(group.layers);
    for (layer, l) in group.layer_range().zip(&layers) {
        let w_l = l.refit.as_ref().map_or(l.w, Mat::as_ref);
        let left = layer_weight(
            checkpoint,
            layer,
            &l.members,
            inputs.weighting,
            w_l,
            (*l.c).as_ref(),
            inputs.attention.get(layer),
        )?
        .left;
        terms.push(LayerTerm {
            w: w_l,
            c: (*l.c).as_ref(),
            cross: l.cross.as_deref().unwrap_or(&l.c).as_ref(),
            left,
        });
    }
    // The latent is computed from the source layer's input: the compressed model's, when
    // calibration is sequential.
    let predictor = match inputs.sequential_at(group.layer) {
        Some(m) => m.compressed.load()?,
        None => covariances
            .get(group.layer)
            .ok_or_else(|| fail("no calibration statistics for the source layer".into()))?
            .load()?,
    };
    // The BOS position's latent (where calibration keeps it exact): every layer's own input for
    // a basis, the source's for a latent.
    let sink = |l: usize| inputs.attention.get(l).and_then(|s| s.sink.clone());
    let fitted = match share {
        Share::Basis => {
            let pinned: Vec<Vec<f64>> = group.layer_range().filter_map(sink).collect();
            shared_basis(&terms, spec, &pinned)
        }
        Share::Latent => {
            let pinned: Vec<Vec<f64>> = sink(group.layer).into_iter().collect();
            shared_latent_from(&terms, (*predictor).as_ref(), spec, &pinned)
        }
    };
    fitted.map_err(|e| fail(e.to_string()))
}
