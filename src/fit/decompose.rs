//! Low-rank fits of a weight matrix: the math, apart from all I/O.
//!
//! A Hugging Face linear weight `W` is `[out, in]`; its rows are treated as samples (as the reference
//! experiment's scikit-learn PCA does). Three fits are offered (see `docs/design.md`):
//!
//! * [`Fit::Pca`]: centred PCA with the mean row restored, `W' = 1 mu^T + Wc P_r P_r^T`;
//! * [`Fit::Seed`]: the reference script's exact reconstruction, mean dropped, `W' = Wc P_r P_r^T`;
//! * [`Fit::Svd`]: uncentred truncated SVD, `W' = U_r S_r V_r^T` (the Frobenius-optimal rank-r fit).
//!
//! All three are computed the same way: the eigendecomposition of the smaller Gram matrix of the
//! (centred) matrix gives its singular subspace and squared singular values; the reconstruction is the
//! orthogonal projection onto the top-`r` subspace. Everything runs in `f64` and single-threaded inside
//! one matrix, so the result does not depend on the thread count (parallelism is across matrices).

pub use crate::fit::common::{
    choose_rank, explained_variance_ratios, product, rank_for_threshold, DecomposeError, Fit,
    RankChoice,
};
pub(crate) use crate::fit::common::{count_non_finite, eigh_descending, fix_signs, narrow};

use crate::fit::basis::{basis_of_centred, check_fittable, checked_centre, Basis};
use crate::fit::spec::Spec;
use faer::{Mat, MatRef};

/// A low-rank reconstruction and what it kept.
#[derive(Debug, Clone)]
pub struct Decomposition {
    /// The rank chosen.
    pub choice: RankChoice,
    /// Sum of the explained-variance ratios of the kept components, in [0, 1].
    pub variance_kept: f64,
    /// Every component's explained-variance ratio, descending (for rank allocation).
    pub spectrum: Vec<f64>,
    /// The reconstructed matrix, same shape as the input.
    pub reconstruction: Mat<f64>,
    /// The same as a product of two thin matrices.
    pub factors: Factors,
}

/// A reconstruction as `up * down`: `down` `[latent, cols]` maps an input to the latent, `up`
/// `[rows, latent]` maps the latent back out. `latent` is the rank, plus one for [`Fit::Pca`]
/// (the mean direction).
#[derive(Debug, Clone)]
pub struct Factors {
    /// `[rows, latent]`.
    pub up: Mat<f64>,
    /// `[latent, cols]`.
    pub down: Mat<f64>,
}

/// Builds a matrix from row-major values.
pub fn matrix_from_rows(rows: usize, cols: usize, values: &[f64]) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// The matrix's values in row-major order.
pub fn matrix_to_rows(m: MatRef<'_, f64>) -> Vec<f64> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// `||a - b||_F / ||a||_F` over two equally long value lists (0 when `a` is all zero and `b == a`).
pub fn relative_error(original: &[f64], approx: &[f64]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in original.iter().zip(approx) {
        diff += (a - b) * (a - b);
        norm += a * a;
    }
    error_ratio(diff, norm)
}

/// `sqrt(diff / norm)` from the squared error and squared norm sums of a relative error (0 when
/// both are zero, infinite when only the norm is).
pub fn error_ratio(diff: f64, norm: f64) -> f64 {
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else if diff > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Fits `w` (`[rows, cols]`) with `fit`, keeping the rank that `spec` selects.
pub fn decompose(
    w: MatRef<'_, f64>,
    fit: Fit,
    spec: Spec,
) -> Result<Decomposition, DecomposeError> {
    decompose_owned(w.to_owned(), fit, spec)
}

/// [`decompose`], consuming `w`: it is centred in place, so a large fit holds one copy of the
/// matrix fewer.
pub fn decompose_owned(
    mut w: Mat<f64>,
    fit: Fit,
    spec: Spec,
) -> Result<Decomposition, DecomposeError> {
    check_fittable(w.as_ref(), fit)?;
    let mean = checked_centre(&mut w, fit)?;
    let basis = basis_of_centred(w.as_ref(), fit, spec)?;
    Ok(finish(w, &mean, basis, spec))
}

/// [`decompose_owned`] of `w` with its decomposing half already done: `basis`, as
/// [`fit_basis`](crate::fit::basis::fit_basis) gave it for the same matrix. The same bits as
/// [`decompose_owned`]; a basis that does not [serve](Basis::serves) `w` and `spec` is computed
/// afresh.
pub fn decompose_with_basis(
    mut w: Mat<f64>,
    basis: Basis,
    spec: Spec,
) -> Result<Decomposition, DecomposeError> {
    let fit = basis.fit();
    check_fittable(w.as_ref(), fit)?;
    let mean = checked_centre(&mut w, fit)?;
    let basis = if basis.serves(w.nrows(), w.ncols(), fit, spec) {
        basis
    } else {
        basis_of_centred(w.as_ref(), fit, spec)?
    };
    Ok(finish(w, &mean, basis, spec))
}

/// The second half of a weight-only fit: the centred matrix projected on its basis, the factors
/// and the reconstruction (the mean row restored for fit `pca`).
fn finish(centred: Mat<f64>, mean: &[f64], basis: Basis, spec: Spec) -> Decomposition {
    let (m, n) = (centred.nrows(), centred.ncols());
    let fit = basis.fit();
    let rows_side = m <= n;
    let choice = choose_rank(&basis.spectrum, spec);
    let r = choice.rank;
    let variance_kept = basis.spectrum[..r].iter().sum::<f64>().min(1.0);
    let (ratios, basis) = (basis.spectrum, basis.vectors);

    // W' = up * down, with up [m, r] and down [r, n].
    let (up, down) = if rows_side {
        // up = U_r, down = U_r^T Wc
        let down = product(basis.transpose(), centred.as_ref());
        (basis, down)
    } else {
        // up = Wc V_r, down = V_r^T
        (
            product(centred.as_ref(), basis.as_ref()),
            basis.transpose().to_owned(),
        )
    };
    drop(centred);
    let mut reconstruction = product(up.as_ref(), down.as_ref());
    if fit == Fit::Pca {
        for j in 0..n {
            for i in 0..m {
                reconstruction[(i, j)] += mean[j];
            }
        }
    }
    Decomposition {
        choice,
        variance_kept,
        spectrum: ratios,
        reconstruction,
        factors: factors_with_mean(&up, &down, mean, fit),
    }
}

/// The factored form: for fit `pca` the mean as one more latent direction (a row mu^T in `down`
/// and a column of ones in `up`), so that up * down equals the reconstruction.
fn factors_with_mean(up: &Mat<f64>, down: &Mat<f64>, mean: &[f64], fit: Fit) -> Factors {
    let (m, r, n) = (up.nrows(), up.ncols(), down.ncols());
    let extra = fit.mean_dims();
    Factors {
        up: Mat::from_fn(m, r + extra, |i, j| if j < r { up[(i, j)] } else { 1.0 }),
        down: Mat::from_fn(
            r + extra,
            n,
            |i, j| if i < r { down[(i, j)] } else { mean[j] },
        ),
    }
}

/// Matrices and comparisons shared by the math modules' unit tests.
#[cfg(test)]
pub(crate) mod test_matrices {
    use faer::{Mat, MatRef};

    /// `x y^T / n` for `n` samples as columns: the (cross) second moment of two sample sets.
    pub(crate) fn moment(x: &Mat<f64>, y: &Mat<f64>) -> Mat<f64> {
        let n = x.ncols() as f64;
        let m = x * y.transpose();
        Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] / n)
    }

    /// A deterministic pseudo-random matrix (xorshift), values in [-1, 1).
    pub(crate) fn noise(m: usize, n: usize, seed: u64) -> Mat<f64> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Mat::from_fn(m, n, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
    }

    pub(crate) fn max_abs_diff(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
        let mut d = 0.0f64;
        for i in 0..a.nrows() {
            for j in 0..a.ncols() {
                d = d.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::test_matrices::{max_abs_diff, noise};
    use super::*;
    use crate::fit::basis::fit_basis;

    #[test]
    fn rank_rule_golden_values() {
        let ratios = [0.5, 0.25, 0.125, 0.0625, 0.0625];
        assert_eq!(rank_for_threshold(&ratios, 0.3), 1);
        assert_eq!(rank_for_threshold(&ratios, 0.5), 1);
        assert_eq!(rank_for_threshold(&ratios, 0.51), 2);
        assert_eq!(rank_for_threshold(&ratios, 0.75), 2);
        assert_eq!(rank_for_threshold(&ratios, 0.9), 4);
        assert_eq!(rank_for_threshold(&ratios, 1.0), 5);
        // Rounding leaves the cumulative sum short of 1.0: keep everything.
        assert_eq!(
            rank_for_threshold(&[0.3333333, 0.3333333, 0.3333333], 1.0),
            3
        );
    }

    #[test]
    fn fixed_ranks_are_clamped_and_flagged() {
        let ratios = [0.6, 0.3, 0.1];
        assert_eq!(
            choose_rank(&ratios, Spec::Rank(2)),
            RankChoice {
                rank: 2,
                full_rank: 3,
                clamped: false
            }
        );
        assert_eq!(
            choose_rank(&ratios, Spec::Rank(99)),
            RankChoice {
                rank: 3,
                full_rank: 3,
                clamped: true
            }
        );
    }

    #[test]
    fn full_rank_pca_and_svd_return_the_input() {
        for (m, n) in [(6, 10), (10, 6), (8, 8)] {
            let w = noise(m, n, 7);
            for fit in [Fit::Pca, Fit::Svd] {
                let d = decompose(w.as_ref(), fit, Spec::Threshold(1.0)).unwrap();
                assert_eq!(d.choice.rank, m.min(n));
                assert!(
                    max_abs_diff(w.as_ref(), d.reconstruction.as_ref()) < 1e-12,
                    "{fit:?} {m}x{n}"
                );
            }
        }
    }

    #[test]
    fn seed_fit_drops_the_mean() {
        let w = noise(6, 10, 3);
        let d = decompose(w.as_ref(), Fit::Seed, Spec::Threshold(1.0)).unwrap();
        for j in 0..10 {
            let mean: f64 = (0..6).map(|i| w[(i, j)]).sum::<f64>() / 6.0;
            for i in 0..6 {
                assert!((d.reconstruction[(i, j)] - (w[(i, j)] - mean)).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn exact_low_rank_matrix_is_recovered_at_its_rank() {
        // W = A B with A [8, 3], B [3, 12]: rank 3, so rank:3 SVD is exact and keeps all variance.
        let a = noise(8, 3, 11);
        let b = noise(3, 12, 12);
        let w = &a * &b;
        let d = decompose(w.as_ref(), Fit::Svd, Spec::Rank(3)).unwrap();
        assert!(max_abs_diff(w.as_ref(), d.reconstruction.as_ref()) < 1e-10);
        assert!((d.variance_kept - 1.0).abs() < 1e-12);
        let d = decompose(w.as_ref(), Fit::Svd, Spec::Threshold(0.999_999)).unwrap();
        assert_eq!(d.choice.rank, 3);
    }

    #[test]
    fn truncation_error_equals_discarded_energy() {
        // Eckart-Young: ||W - W_r||_F^2 = sum of the discarded squared singular values.
        let w = noise(9, 14, 5);
        let full = decompose(w.as_ref(), Fit::Svd, Spec::Threshold(1.0)).unwrap();
        assert!(full.variance_kept > 0.999_999);
        let d = decompose(w.as_ref(), Fit::Svd, Spec::Rank(4)).unwrap();
        let values = matrix_to_rows(w.as_ref());
        let approx = matrix_to_rows(d.reconstruction.as_ref());
        let err = relative_error(&values, &approx);
        assert!((err * err - (1.0 - d.variance_kept)).abs() < 1e-10);
    }

    #[test]
    fn factors_multiply_to_the_reconstruction_with_fixed_signs() {
        for (m, n) in [(6, 10), (10, 6)] {
            let w = noise(m, n, 21);
            for fit in [Fit::Pca, Fit::Seed, Fit::Svd] {
                let d = decompose(w.as_ref(), fit, Spec::Rank(3)).unwrap();
                let latent = 3 + usize::from(fit == Fit::Pca);
                assert_eq!((d.factors.up.nrows(), d.factors.up.ncols()), (m, latent));
                assert_eq!(
                    (d.factors.down.nrows(), d.factors.down.ncols()),
                    (latent, n)
                );
                let product = &d.factors.up * &d.factors.down;
                assert!(
                    max_abs_diff(product.as_ref(), d.reconstruction.as_ref()) < 1e-12,
                    "{fit:?} {m}x{n}"
                );
                // The eigenvector side of each kept direction has its largest entry positive.
                let basis = if m <= n {
                    d.factors.up.transpose().to_owned()
                } else {
                    d.factors.down.clone()
                };
                for k in 0..3 {
                    let row = basis.row(k);
                    let (mut best, mut arg) = (0.0f64, 0);
                    for j in 0..row.ncols() {
                        if row[j].abs() > best {
                            best = row[j].abs();
                            arg = j;
                        }
                    }
                    assert!(row[arg] > 0.0, "{fit:?} direction {k}");
                }
            }
        }
    }

    #[test]
    fn non_finite_values_are_counted() {
        let mut w = noise(4, 5, 1);
        w[(0, 0)] = f64::NAN;
        w[(3, 4)] = f64::INFINITY;
        let err = decompose(w.as_ref(), Fit::Pca, Spec::Threshold(0.9)).unwrap_err();
        assert_eq!(err, DecomposeError::NonFinite { count: 2 });
    }

    #[test]
    fn zero_matrix_keeps_full_rank_without_failing() {
        let w = Mat::<f64>::zeros(3, 4);
        let d = decompose(w.as_ref(), Fit::Pca, Spec::Threshold(0.5)).unwrap();
        assert_eq!(d.choice.rank, 3);
        assert_eq!(
            relative_error(&[0.0; 12], &matrix_to_rows(d.reconstruction.as_ref())),
            0.0
        );
    }

    // `basis` (the decomposing half), tested here beside the whole fit it must match.

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
