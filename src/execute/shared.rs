//! The calibrated fit of a group spanning several layers (`--share-layers`): its stacked matrix
//! split back into layers, each with its calibration moments and fit `act`'s weighting, handed to
//! [`crate::fit::shared`].

use super::group::layer_weight;
use super::FitInputs;
use crate::error::{Error, Result};
use crate::fit::shared::{shared_basis, shared_latent, LayerTerm, SharedDecomposition};
use crate::fit::spec::Spec;
use crate::input::checkpoint::Checkpoint;
use crate::plan::{GroupPlan, Share};
use faer::MatRef;

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
    let mut terms = Vec::with_capacity(group.layers);
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
        let cross = match (share, layer == group.layer) {
            (Share::Latent, false) => inputs.cross.get(&(layer, group.layer)).ok_or_else(|| {
                Error::bug(format!(
                    "no cross moment of layers {layer} and {}",
                    group.layer
                ))
            })?,
            _ => c,
        };
        let w_l = w.subrows(row0, rows);
        let left = layer_weight(
            checkpoint,
            layer,
            &members,
            inputs.weighting,
            w_l,
            c.as_ref(),
        )?;
        terms.push(LayerTerm {
            w: w_l,
            c: c.as_ref(),
            cross: cross.as_ref(),
            left,
        });
        row0 += rows;
    }
    let fitted = match share {
        Share::Basis => shared_basis(&terms, spec),
        Share::Latent => shared_latent(&terms, spec),
    };
    fitted.map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execute::{fit_and_encode, FitInputs};
    use crate::fit::decompose::Fit;
    use crate::plan::{groups, Emit, LayerSharing, Surgery};
    use crate::test_support::{open_tiny, HIDDEN, KV_DIM};
    use faer::Mat;
    use safetensors::Dtype;
    use std::num::NonZeroUsize;

    /// Calibration statistics with whitened inputs: every moment the identity.
    fn white_inputs(cross: bool) -> FitInputs {
        let id = || Mat::<f64>::identity(HIDDEN, HIDDEN);
        FitInputs {
            covariances: Some(vec![id(), id()]),
            cross: if cross {
                [((1, 0), id())].into()
            } else {
                Default::default()
            },
            ..FitInputs::default()
        }
    }

    fn surgery(share: Share) -> Surgery {
        Surgery {
            q: None,
            k: None,
            v: None,
            shared_kv: Some(Spec::Rank(3)),
            fit: Fit::Act,
            sharing: Some(LayerSharing {
                layers: NonZeroUsize::new(2).unwrap(),
                share,
            }),
        }
    }

    #[test]
    fn a_group_of_two_layers_fits_one_down_projection_and_four_ups() {
        let (_dir, ck) = open_tiny(Dtype::F32, false);
        for share in [Share::Latent, Share::Basis] {
            let group = &groups(&ck, &surgery(share))[0];
            let inputs = white_inputs(share == Share::Latent);
            let (report, pieces) = fit_and_encode(&ck, group, Emit::Factored, &inputs).unwrap();
            assert_eq!(report.layers, [0, 1]);
            assert_eq!(report.share, Some(share.name()));
            assert_eq!((report.rank, report.shape), (3, [4 * KV_DIM, HIDDEN]));
            let sizes: Vec<usize> = pieces.iter().map(|p| p.len() / 4).collect();
            assert_eq!(
                sizes,
                [3 * HIDDEN, KV_DIM * 3, KV_DIM * 3, KV_DIM * 3, KV_DIM * 3]
            );
            assert_eq!(report.layer_energy_kept.len(), 2);
            assert!(report
                .layer_energy_kept
                .iter()
                .all(|k| (0.0..=1.0 + 1e-9).contains(k)));
        }
    }

    #[test]
    fn a_missing_cross_moment_is_a_bug_not_bad_input() {
        let (_dir, ck) = open_tiny(Dtype::F32, false);
        let group = &groups(&ck, &surgery(Share::Latent))[0];
        let err = fit_and_encode(&ck, group, Emit::Factored, &white_inputs(false)).unwrap_err();
        assert!(matches!(err, Error::Bug { .. }), "{err}");
    }
}
