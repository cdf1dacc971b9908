//! What the two halves of a weight-only fit share, apart from both so that each imports it and
//! neither the other: the fits ([`Fit`]), why a matrix could not be decomposed
//! ([`DecomposeError`]), explained-variance ratios and the rank a SPEC selects on them
//! ([`choose_rank`]), the symmetric eigendecomposition and its sign rule, and the one matrix
//! product. [`basis`](super::basis) decomposes with them and [`decompose`](super::decompose)
//! finishes; `decompose` re-exports them, where the rest of the crate imports them from.

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
    /// so [`decompose`](super::decompose::decompose) refuses it.
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

/// `a @ b` in `f64`, single-threaded: parallelism is across matrices, so results never depend on
/// the thread count. The one product of the fits and the executor.
pub fn product(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
}

/// `m` in `f32`.
pub(crate) fn narrow(m: MatRef<'_, f64>) -> Mat<f32> {
    Mat::<f32>::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}
