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

use crate::fit::basis::{basis_of_centred, check_fittable, checked_centre, Basis};
use crate::fit::spec::Spec;
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// Which low-rank reconstruction to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Centred PCA, mean row restored.
    Pca,
    /// The reference experiment's reconstruction: centred PCA, mean row dropped.
    Seed,
    /// Uncentred truncated SVD.
    Svd,
    /// Activation-aware: fits the outputs on calibration inputs (`weighted`); needs a covariance,
    /// so [`decompose`] refuses it.
    Act,
}

impl Fit {
    /// Whether the fit subtracts the mean row before decomposing.
    pub fn is_centred(self) -> bool {
        matches!(self, Fit::Pca | Fit::Seed)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fit::Pca => "pca",
            Fit::Seed => "seed",
            Fit::Svd => "svd",
            Fit::Act => "act",
        }
    }

    /// Extra latent dimensions the fit needs for the mean row (one for `pca`, which restores it).
    pub fn mean_dims(self) -> usize {
        usize::from(self == Fit::Pca)
    }
}

/// Why a matrix could not be decomposed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecomposeError {
    /// The matrix holds NaN or infinite values.
    #[error("{count} NaN or infinite values")]
    NonFinite {
        /// How many values are not finite.
        count: usize,
    },
    /// The eigen solver did not converge.
    #[error("the eigendecomposition did not converge")]
    NoConvergence,
    /// The matrix has no rows or no columns.
    #[error("the matrix is empty")]
    Empty,
    /// A second moment's shape does not match the matrix it weighs.
    #[error("a {rows}x{cols} moment for a matrix of {n} columns")]
    MomentShape {
        /// The moment's rows.
        rows: usize,
        /// The moment's columns.
        cols: usize,
        /// The matrix's columns.
        n: usize,
    },
    /// The fit needs calibration statistics that were not given.
    #[error("fit `act` needs an input covariance (--calibrate)")]
    NeedsCalibration,
}

/// The rank a SPEC selects on a spectrum, and whether a fixed rank had to be clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankChoice {
    /// Components kept.
    pub rank: usize,
    /// Components available (`min(rows, cols)`).
    pub full_rank: usize,
    /// `rank:N` asked for more than `full_rank`.
    pub clamped: bool,
}

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

/// Explained-variance ratios `lambda_i / sum lambda`, in descending order, from eigenvalues of a Gram
/// matrix (negative rounding noise clamped to zero). An all-zero spectrum gives all-zero ratios.
pub fn explained_variance_ratios(eigenvalues_desc: &[f64]) -> Vec<f64> {
    let clamped: Vec<f64> = eigenvalues_desc.iter().map(|&l| l.max(0.0)).collect();
    let total: f64 = clamped.iter().sum();
    if total > 0.0 {
        clamped.iter().map(|l| l / total).collect()
    } else {
        vec![0.0; clamped.len()]
    }
}

/// The reference rank rule: the smallest count whose cumulative ratio is `>= threshold`. A threshold
/// of 1.0 keeps every component (rounding could otherwise stop the sum a component early or never
/// reach 1.0); so does a sum that rounding keeps below the threshold.
pub fn rank_for_threshold(ratios: &[f64], threshold: f64) -> usize {
    if threshold >= 1.0 {
        return ratios.len();
    }
    let mut cumulative = 0.0;
    for (i, r) in ratios.iter().enumerate() {
        cumulative += r;
        if cumulative >= threshold {
            return i + 1;
        }
    }
    ratios.len()
}

/// Applies a SPEC to a descending ratio spectrum (a `budget:F` must be resolved to `rank:N` per
/// group first, see `budget`).
pub fn choose_rank(ratios: &[f64], spec: Spec) -> RankChoice {
    let full_rank = ratios.len();
    match spec {
        Spec::Threshold(t) => RankChoice {
            rank: rank_for_threshold(ratios, t),
            full_rank,
            clamped: false,
        },
        Spec::Rank(n) => RankChoice {
            rank: n.min(full_rank),
            full_rank,
            clamped: n > full_rank,
        },
        // Budgets are turned into ranks before fitting (`budget::allocate`); on its own a budget
        // keeps every component.
        Spec::Budget(_) => RankChoice {
            rank: full_rank,
            full_rank,
            clamped: false,
        },
    }
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

/// Symmetric eigendecomposition, eigenvalues returned in descending order with matching columns.
pub(crate) fn eigh_descending(
    gram: MatRef<'_, f64>,
) -> Result<(Vec<f64>, Mat<f64>), DecomposeError> {
    let n = gram.nrows();
    let mut s = Diag::<f64>::zeros(n);
    let mut u = Mat::<f64>::zeros(n, n);
    let par = Par::Seq;
    let scratch =
        evd::self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::Yes, par, Default::default());
    let mut buffer = MemBuffer::new(scratch);
    evd::self_adjoint_evd(
        gram,
        s.as_mut(),
        Some(u.as_mut()),
        par,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .map_err(|_| DecomposeError::NoConvergence)?;
    drop(buffer);
    // faer sorts eigenvalues in nondecreasing order: reverse both (the columns in place, so a
    // large decomposition holds one n x n matrix, not two).
    let values: Vec<f64> = (0..n).rev().map(|i| s[i]).collect();
    for j in 0..n / 2 {
        faer::perm::swap_cols_idx(u.as_mut(), j, n - 1 - j);
    }
    Ok((values, u))
}

/// The sign convention that makes factors deterministic: every column's largest-magnitude entry
/// (the first, on ties) is made positive.
pub(crate) fn fix_signs(basis: &mut Mat<f64>) {
    for j in 0..basis.ncols() {
        let mut best = 0;
        for i in 0..basis.nrows() {
            if basis[(i, j)].abs() > basis[(best, j)].abs() {
                best = i;
            }
        }
        if basis[(best, j)] < 0.0 {
            for i in 0..basis.nrows() {
                basis[(i, j)] = -basis[(i, j)];
            }
        }
    }
}

/// Counts NaN and infinite entries.
pub(crate) fn count_non_finite(w: MatRef<'_, f64>) -> usize {
    (0..w.ncols())
        .flat_map(|j| (0..w.nrows()).map(move |i| (i, j)))
        .filter(|&(i, j)| !w[(i, j)].is_finite())
        .count()
}

/// Fits `w` (`[rows, cols]`) with `fit`, keeping the rank that `spec` selects.
pub fn decompose(
    w: MatRef<'_, f64>,
    fit: Fit,
    spec: Spec,
) -> Result<Decomposition, DecomposeError> {
    decompose_owned(w.to_owned(), fit, spec)
}

/// `a @ b` in `f64`, single-threaded: parallelism is across matrices, so results never depend on
/// the thread count. The one product of the fits and the executor.
pub fn product(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
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
}
