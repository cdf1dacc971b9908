//! A weight-only fit's explained-variance spectrum from the eigenvalues alone, and the centring and
//! Gram matrix it shares with the fit itself (`decompose`): what the factored layout's width pass
//! reads to turn a threshold into a rank before any fit runs.

use crate::fit::decompose::{count_non_finite, explained_variance_ratios, DecomposeError, Fit};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::{Mat, MatRef, Par};

/// The explained-variance spectrum [`decompose_owned`](crate::fit::decompose::decompose_owned) ranks for `w` and `fit` (the same centring
/// and Gram matrix), from the eigenvalues alone: what the factored layout needs to know of a
/// threshold SPEC before any fit runs. The eigenvalues come from a solver that skips the
/// eigenvectors, so they may differ from [`decompose_owned`](crate::fit::decompose::decompose_owned)'s in the last bits.
pub fn spectrum_owned(mut w: Mat<f64>, fit: Fit) -> Result<Vec<f64>, DecomposeError> {
    if w.nrows() == 0 || w.ncols() == 0 {
        return Err(DecomposeError::Empty);
    }
    if fit == Fit::Act {
        return Err(DecomposeError::NeedsCalibration);
    }
    checked_centre(&mut w, fit)?;
    let gram = smaller_gram(w.as_ref());
    drop(w);
    let n = gram.nrows();
    let mut s = Diag::<f64>::zeros(n);
    let par = Par::Seq;
    let scratch =
        evd::self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::No, par, Default::default());
    let mut buffer = MemBuffer::new(scratch);
    evd::self_adjoint_evd(
        gram.as_ref(),
        s.as_mut(),
        None,
        par,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .map_err(|_| DecomposeError::NoConvergence)?;
    let values: Vec<f64> = (0..n).rev().map(|i| s[i]).collect();
    Ok(explained_variance_ratios(&values))
}

/// Refuses non-finite values, then centres `w` in place for the centred fits; returns the mean.
pub(crate) fn checked_centre(w: &mut Mat<f64>, fit: Fit) -> Result<Vec<f64>, DecomposeError> {
    let bad = count_non_finite(w.as_ref());
    if bad > 0 {
        return Err(DecomposeError::NonFinite { count: bad });
    }
    Ok(centre_in_place(w, fit))
}

/// The Gram matrix of the smaller side of `w` (`w w^T` for `rows <= cols`, else `w^T w`): its
/// eigenvectors span the singular subspace on that side.
pub(crate) fn smaller_gram(w: MatRef<'_, f64>) -> Mat<f64> {
    if w.nrows() <= w.ncols() {
        crate::fit::decompose::product(w, w.transpose())
    } else {
        crate::fit::decompose::product(w.transpose(), w)
    }
}

/// Subtracts the mean row from `w` for the centred fits; returns it (zeros for the others).
fn centre_in_place(w: &mut Mat<f64>, fit: Fit) -> Vec<f64> {
    let (m, n) = (w.nrows(), w.ncols());
    let mean: Vec<f64> = if fit.is_centred() {
        (0..n)
            .map(|j| (0..m).map(|i| w[(i, j)]).sum::<f64>() / m as f64)
            .collect()
    } else {
        vec![0.0; n]
    };
    for j in 0..n {
        for i in 0..m {
            w[(i, j)] -= mean[j];
        }
    }
    mean
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::decompose::test_matrices::noise;
    use crate::fit::decompose::{decompose, rank_for_threshold};
    use crate::fit::spec::Spec;

    #[test]
    fn eigenvalue_only_spectrum_matches_the_fit_and_its_rank_decisions() {
        for (m, n) in [(7, 12), (12, 7)] {
            let w = noise(m, n, 5);
            for fit in [Fit::Pca, Fit::Seed, Fit::Svd] {
                let fast = spectrum_owned(w.clone(), fit).unwrap();
                let full = decompose(w.as_ref(), fit, Spec::Rank(1)).unwrap().spectrum;
                assert_eq!(fast.len(), full.len());
                for (a, b) in fast.iter().zip(&full) {
                    assert!((a - b).abs() < 1e-12, "{fit:?} {m}x{n}: {a} vs {b}");
                }
                for t in [0.3, 0.5, 0.9, 0.99] {
                    assert_eq!(
                        rank_for_threshold(&fast, t),
                        rank_for_threshold(&full, t),
                        "{fit:?} {t}"
                    );
                }
            }
        }
        assert_eq!(
            spectrum_owned(Mat::zeros(0, 3), Fit::Pca),
            Err(DecomposeError::Empty)
        );
        let mut bad = noise(3, 3, 1);
        bad[(1, 1)] = f64::NAN;
        assert_eq!(
            spectrum_owned(bad, Fit::Svd),
            Err(DecomposeError::NonFinite { count: 1 })
        );
    }
}
