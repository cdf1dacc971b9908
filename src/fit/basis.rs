//! The decomposing half of a weight-only fit, apart from the rest: the centring, the Gram matrix of
//! the smaller side and its eigendecomposition give a [`Basis`] (the explained-variance spectrum and
//! the kept singular directions, signs fixed), which
//! [`decompose_with_basis`](crate::fit::decompose::decompose_with_basis) finishes into factors.
//! [`decompose_owned`](crate::fit::decompose::decompose_owned) runs both halves on one centred
//! copy; the factored layout's width pass runs the first on its own, to learn a threshold's rank
//! before any fit, and hands the basis on so the write pass's fit does not decompose again. Its
//! unit tests are `decompose`'s, beside the whole fit they compare it with.

use crate::fit::common::{
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
        crate::fit::common::product(w, w.transpose())
    } else {
        crate::fit::common::product(w.transpose(), w)
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
