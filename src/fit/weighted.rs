//! The activation-aware fit of [`super::act`] for a given left weighting `L`: the spectrum of the
//! weighted outputs (`M = (L W) C (L W)^T` and its eigenpairs: [`WeightedSpectrum`], the same for
//! every rank) and the fit at a rank from it ([`decompose_spectrum`]). The math only; no I/O.

use crate::fit::decompose::{
    choose_rank, count_non_finite, eigh_descending, explained_variance_ratios, fix_signs, product,
    DecomposeError, Decomposition, Factors,
};
use crate::fit::pinned::{basis_with_pinned, kept_share};
use crate::fit::spec::Spec;
use faer::{Mat, MatRef};

/// The left weighting of a fit: a diagonal of per-row scales, or a general invertible matrix given
/// with its inverse.
#[derive(Debug, Clone)]
pub enum LeftWeight {
    /// `L = diag(scales)`.
    Diagonal(Vec<f64>),
    /// `L` and `L^{-1}`, both `[m, m]`.
    Full {
        /// `L`.
        l: Mat<f64>,
        /// `L^{-1}`.
        inverse: Mat<f64>,
    },
}

impl LeftWeight {
    /// `L w`.
    pub fn apply(&self, w: MatRef<'_, f64>) -> Mat<f64> {
        match self {
            LeftWeight::Diagonal(s) => Mat::from_fn(w.nrows(), w.ncols(), |i, j| s[i] * w[(i, j)]),
            LeftWeight::Full { l, .. } => product(l.as_ref(), w),
        }
    }

    /// `L^{-1} u`.
    pub fn apply_inverse(&self, u: MatRef<'_, f64>) -> Mat<f64> {
        match self {
            LeftWeight::Diagonal(s) => Mat::from_fn(u.nrows(), u.ncols(), |i, j| u[(i, j)] / s[i]),
            LeftWeight::Full { inverse, .. } => product(inverse.as_ref(), u),
        }
    }
}

/// Fits `w` `[m, n]` to its outputs under input covariance `c` `[n, n]` and left weighting `left`,
/// keeping the rank `spec` selects on the output-energy spectrum.
pub fn decompose_weighted(
    w: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    left: &LeftWeight,
    spec: Spec,
) -> Result<Decomposition, DecomposeError> {
    decompose_weighted_pinned(w, c, left, spec, &[])
}

/// [`decompose_weighted`] with the outputs of the `pinned` inputs (each of length `n`) kept
/// exactly: their weighted outputs `L W p` are spanned first, and the rest of the rank goes to
/// the top eigenvectors of `M` with those directions projected out ([`basis_with_pinned`]). The
/// rank is chosen, and the spectrum reported, on `M` itself; the share kept is the basis's own.
pub fn decompose_weighted_pinned(
    w: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    left: &LeftWeight,
    spec: Spec,
    pinned: &[Vec<f64>],
) -> Result<Decomposition, DecomposeError> {
    decompose_spectrum(&weighted_spectrum(w, c, left.clone())?, spec, pinned)
}

/// What a weighted fit computes before it knows its rank: the left weighting, the weighted
/// weight `L W`, the Gram matrix `M = (L W) C (L W)^T` of its outputs and `M`'s eigenpairs,
/// descending. The same for every SPEC, so a fit made at several ranks (budgets' spectra, then
/// the fit itself) computes it once ([`weighted_spectrum`], then [`decompose_spectrum`]).
#[derive(Debug, Clone)]
pub struct WeightedSpectrum {
    /// `L`.
    pub left: LeftWeight,
    /// `L W`, `[m, n]`.
    pub weighted: Mat<f64>,
    /// `M`, `[m, m]`, exactly symmetric.
    pub gram: Mat<f64>,
    /// `M`'s eigenvalues, descending.
    pub eigenvalues: Vec<f64>,
    /// `M`'s eigenvectors, in the eigenvalues' order, `[m, m]`.
    pub vectors: Mat<f64>,
}

/// A fit's left weighting applied: `L`, `L W` and `L W C`, what its Gram matrix is computed
/// from ([`spectrum_of`]).
#[derive(Debug, Clone)]
pub struct Weighted {
    /// `L`.
    pub left: LeftWeight,
    /// `L W`, `[m, n]`.
    pub lw: Mat<f64>,
    /// `L W C`, `[m, n]`.
    pub lwc: Mat<f64>,
}

impl Weighted {
    /// `left` applied to `w` under `c`.
    pub fn of(w: MatRef<'_, f64>, c: MatRef<'_, f64>, left: LeftWeight) -> Self {
        let lw = left.apply(w);
        let lwc = product(lw.as_ref(), c);
        Weighted { left, lw, lwc }
    }
}

/// Refuses an empty `w` or a non-finite `w` or `c`: what a weighted fit checks first.
pub fn check_inputs(w: MatRef<'_, f64>, c: MatRef<'_, f64>) -> Result<(), DecomposeError> {
    if w.nrows() == 0 || w.ncols() == 0 {
        return Err(DecomposeError::Empty);
    }
    let bad = count_non_finite(w) + count_non_finite(c);
    if bad > 0 {
        return Err(DecomposeError::NonFinite { count: bad });
    }
    Ok(())
}

/// The rank-independent part of fitting `w` `[m, n]` under input covariance `c` and left
/// weighting `left` ([`decompose_weighted_pinned`] is this, then [`decompose_spectrum`]).
pub fn weighted_spectrum(
    w: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    left: LeftWeight,
) -> Result<WeightedSpectrum, DecomposeError> {
    check_inputs(w, c)?;
    spectrum_of(Weighted::of(w, c, left))
}

/// The spectrum of an applied weighting ([`weighted_spectrum`] of inputs [`check_inputs`]
/// passed).
pub fn spectrum_of(weighted: Weighted) -> Result<WeightedSpectrum, DecomposeError> {
    let Weighted { left, lw, lwc } = weighted;
    let m = lw.nrows();
    let mut gram = product(lwc.as_ref(), lw.transpose());
    drop(lwc);
    // Symmetrise away rounding so the solver sees an exactly symmetric matrix.
    for i in 0..m {
        for j in 0..i {
            let v = 0.5 * (gram[(i, j)] + gram[(j, i)]);
            gram[(i, j)] = v;
            gram[(j, i)] = v;
        }
    }
    let (eigenvalues, vectors) = eigh_descending(gram.as_ref())?;
    Ok(WeightedSpectrum {
        left,
        weighted: lw,
        gram,
        eigenvalues,
        vectors,
    })
}

/// The fit at the rank `spec` selects on `spectrum` (with the outputs of `pinned` kept, as in
/// [`decompose_weighted_pinned`]).
pub fn decompose_spectrum(
    spectrum: &WeightedSpectrum,
    spec: Spec,
    pinned: &[Vec<f64>],
) -> Result<Decomposition, DecomposeError> {
    let lw = &spectrum.weighted;
    let (m, n) = (lw.nrows(), lw.ncols());
    let gram = &spectrum.gram;
    let ratios = explained_variance_ratios(&spectrum.eigenvalues);
    let choice = choose_rank(&ratios, spec);
    let r = choice.rank;
    let mut variance_kept = ratios[..r].iter().sum::<f64>().min(1.0);
    let mut basis = spectrum.vectors.subcols(0, r).to_owned();
    if !pinned.is_empty() && r > 0 {
        let outputs: Vec<Vec<f64>> = pinned
            .iter()
            .map(|p| {
                let y = product(lw.as_ref(), Mat::from_fn(n, 1, |i, _| p[i]).as_ref());
                (0..m).map(|i| y[(i, 0)]).collect()
            })
            .collect();
        basis = basis_with_pinned(gram.as_ref(), &outputs, r)?;
        variance_kept = kept_share(gram.as_ref(), basis.as_ref());
    }
    fix_signs(&mut basis);
    let down = product(basis.transpose(), lw.as_ref());
    let up = spectrum.left.apply_inverse(basis.as_ref());
    let reconstruction = product(up.as_ref(), down.as_ref());
    Ok(Decomposition {
        choice,
        variance_kept,
        spectrum: ratios,
        reconstruction,
        factors: Factors { up, down },
    })
}
