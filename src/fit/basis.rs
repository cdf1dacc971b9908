//! The decomposing half of a weight-only fit, apart from the rest: the centring, the Gram matrix of
//! the smaller side and its eigendecomposition give a [`Basis`] (the explained-variance spectrum and
//! the kept singular directions, signs fixed), which
//! [`decompose_with_basis`](crate::fit::decompose::decompose_with_basis) finishes into factors.
//! [`decompose_owned`](crate::fit::decompose::decompose_owned) runs both halves on one centred
//! copy; the factored layout's width pass runs the first on its own, to learn a threshold's rank
//! before any fit, and hands the basis on so the write pass's fit does not decompose again.

use crate::fit::decompose::{
    choose_rank, count_non_finite, eigh_descending, explained_variance_ratios, fix_signs,
    DecomposeError, Fit,
};
use crate::fit::spec::Spec;
use faer::{Mat, MatRef};

/// What a weight-only fit of one `[rows, cols]` matrix decomposed: everything it keeps of the
/// eigendecomposition.
#[derive(Debug, Clone)]
pub struct Basis {
    fit: Fit,
    rows: usize,
    cols: usize,
    /// Every component's explained-variance ratio, descending.
    pub(crate) spectrum: Vec<f64>,
    /// The kept eigenvectors of the smaller Gram matrix (`[rows, r]` for `rows <= cols`, else
    /// `[cols, r]`), each column's sign fixed.
    pub(crate) vectors: Mat<f64>,
}

impl Basis {
    /// The fit it is a basis of.
    pub fn fit(&self) -> Fit {
        self.fit
    }

    /// The rank it kept.
    pub fn rank(&self) -> usize {
        self.vectors.ncols()
    }

    /// Every component's explained-variance ratio, descending.
    pub fn spectrum(&self) -> &[f64] {
        &self.spectrum
    }

    /// Bytes its vectors hold.
    pub fn bytes(&self) -> u64 {
        let values = self.vectors.nrows() as u64 * self.vectors.ncols() as u64;
        values.saturating_mul(std::mem::size_of::<f64>() as u64)
    }

    /// Whether it is the basis `fit` would decompose a `[rows, cols]` matrix to with `spec`: the
    /// same fit and shape, and `spec` keeps its rank on its spectrum.
    pub fn serves(&self, rows: usize, cols: usize, fit: Fit, spec: Spec) -> bool {
        self.fit == fit
            && (self.rows, self.cols) == (rows, cols)
            && choose_rank(&self.spectrum, spec).rank == self.rank()
    }
}

/// The first half of a weight-only fit of `w` (consumed: centred in place) with `fit` and `spec`.
pub fn fit_basis(mut w: Mat<f64>, fit: Fit, spec: Spec) -> Result<Basis, DecomposeError> {
    check_fittable(w.as_ref(), fit)?;
    checked_centre(&mut w, fit)?;
    basis_of_centred(w.as_ref(), fit, spec)
}

/// Refuses what no weight-only fit takes: an empty matrix, or fit `act`.
pub(crate) fn check_fittable(w: MatRef<'_, f64>, fit: Fit) -> Result<(), DecomposeError> {
    if w.nrows() == 0 || w.ncols() == 0 {
        return Err(DecomposeError::Empty);
    }
    if fit == Fit::Act {
        return Err(DecomposeError::NeedsCalibration);
    }
    Ok(())
}

/// The basis of an already centred matrix: the smaller Gram matrix's eigendecomposition, the rank
/// `spec` selects on its spectrum, those eigenvectors with fixed signs.
pub(crate) fn basis_of_centred(
    centred: MatRef<'_, f64>,
    fit: Fit,
    spec: Spec,
) -> Result<Basis, DecomposeError> {
    let gram = smaller_gram(centred);
    let (eigenvalues, vectors) = eigh_descending(gram.as_ref())?;
    drop(gram);
    let spectrum = explained_variance_ratios(&eigenvalues);
    let r = choose_rank(&spectrum, spec).rank;
    let mut kept = vectors.subcols(0, r).to_owned();
    drop(vectors);
    fix_signs(&mut kept);
    Ok(Basis {
        fit,
        rows: centred.nrows(),
        cols: centred.ncols(),
        spectrum,
        vectors: kept,
    })
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
fn smaller_gram(w: MatRef<'_, f64>) -> Mat<f64> {
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
    use crate::fit::decompose::test_matrices::{max_abs_diff, noise};
    use crate::fit::decompose::{decompose, decompose_with_basis};

    #[test]
    fn a_basis_finished_gives_the_same_bits_as_the_whole_fit() {
        for (m, n) in [(7, 12), (12, 7)] {
            let w = noise(m, n, 5);
            for fit in [Fit::Pca, Fit::Seed, Fit::Svd] {
                for t in [0.3, 0.9, 1.0] {
                    let basis = fit_basis(w.clone(), fit, Spec::Threshold(t)).unwrap();
                    let whole = decompose(w.as_ref(), fit, Spec::Threshold(t)).unwrap();
                    assert_eq!(basis.rank(), whole.choice.rank, "{fit:?} {t}");
                    assert_eq!(basis.spectrum(), &whole.spectrum[..]);
                    // The write pass finishes it with the threshold pinned to its rank.
                    let pinned = Spec::Rank(basis.rank());
                    assert!(basis.serves(m, n, fit, pinned));
                    let again = decompose(w.as_ref(), fit, pinned).unwrap();
                    let done = decompose_with_basis(w.clone(), basis, pinned).unwrap();
                    assert_eq!(done.choice, again.choice);
                    assert_eq!(done.variance_kept.to_bits(), again.variance_kept.to_bits());
                    assert_eq!(
                        max_abs_diff(done.reconstruction.as_ref(), again.reconstruction.as_ref()),
                        0.0
                    );
                    assert_eq!(
                        max_abs_diff(done.factors.up.as_ref(), again.factors.up.as_ref()),
                        0.0
                    );
                    assert_eq!(
                        max_abs_diff(done.factors.down.as_ref(), again.factors.down.as_ref()),
                        0.0
                    );
                }
            }
        }
    }

    #[test]
    fn a_basis_serves_only_its_fit_shape_and_rank() {
        let w = noise(6, 9, 2);
        let basis = fit_basis(w.clone(), Fit::Pca, Spec::Rank(2)).unwrap();
        assert!(basis.serves(6, 9, Fit::Pca, Spec::Rank(2)));
        assert!(!basis.serves(6, 9, Fit::Svd, Spec::Rank(2)));
        assert!(!basis.serves(9, 6, Fit::Pca, Spec::Rank(2)));
        assert!(!basis.serves(6, 9, Fit::Pca, Spec::Rank(3)));
        // One that does not serve is decomposed afresh: the same bits as the whole fit.
        let done = decompose_with_basis(w.clone(), basis, Spec::Rank(3)).unwrap();
        let whole = decompose(w.as_ref(), Fit::Pca, Spec::Rank(3)).unwrap();
        assert_eq!(done.choice.rank, 3);
        assert_eq!(
            max_abs_diff(done.reconstruction.as_ref(), whole.reconstruction.as_ref()),
            0.0
        );
    }

    #[test]
    fn bad_matrices_are_refused_before_decomposing() {
        assert_eq!(
            fit_basis(Mat::zeros(0, 3), Fit::Pca, Spec::Rank(1)).unwrap_err(),
            DecomposeError::Empty
        );
        assert_eq!(
            fit_basis(noise(3, 3, 1), Fit::Act, Spec::Rank(1)).unwrap_err(),
            DecomposeError::NeedsCalibration
        );
        let mut bad = noise(3, 3, 1);
        bad[(1, 1)] = f64::NAN;
        assert_eq!(
            fit_basis(bad, Fit::Svd, Spec::Rank(1)).unwrap_err(),
            DecomposeError::NonFinite { count: 1 }
        );
    }
}
