//! The calibrated fit of a group spanning several layers ([`super::shared`]) through the executor:
//! one down-projection and an up-projection per member, on the tiny model.

use super::{fit_and_encode, FitInputs};
use crate::error::Error;
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::plan::{groups, Emit, LayerSharing, Share, Surgery};
use crate::test_support::{open_tiny, HIDDEN, KV_DIM};
use faer::Mat;
use safetensors::Dtype;
use std::num::NonZeroUsize;

/// Calibration statistics with whitened inputs: every moment the identity.
fn white_inputs(cross: bool) -> FitInputs {
    let id = || Mat::<f64>::identity(HIDDEN, HIDDEN);
    FitInputs {
        covariances: Some(vec![id().into(), id().into()]),
        cross: if cross {
            [((1, 0), id().into())].into()
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
        compensate: None,
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
