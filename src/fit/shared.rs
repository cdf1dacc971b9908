//! Calibrated fits shared by a group of adjacent layers (`--share-layers G --fit act`). The math
//! only; no I/O.
//!
//! Layer `l` of a group has a stacked K/V weight `W_l` `[m_l, n]`, an input second moment
//! `C_l = E[x_l x_l^T]` and a left weighting `L_l` (fit `act`'s attention weighting, its K and V
//! balanced to unit weighted energy, so every layer counts alike). Both fits return one
//! down-projection `A` `[r, n]` for the group and one up-projection `B_l` `[m_l, r]` per layer,
//! stacked in layer order.
//!
//! **Shared basis** (`basis`): layer `l` computes `B_l A x_l` from its own input. The cost
//! `sum_l E||L_l (W_l - B_l A) x_l||^2` has no closed-form minimiser over a shared `A` when the
//! `C_l` differ; with the group's pooled moment `C = mean_l C_l` in place of each `C_l` it does:
//! `A = V_r^T C^{-1/2}` with `V_r` the top-`r` right singular vectors of the stack
//! `[L_l W_l C^{1/2}]_l` (for one layer this is fit `act`'s own minimiser written in input space).
//! Given `A`, each `B_l` is then the exact least-squares up-projection for the layer's own inputs,
//! `B_l = W_l C_l A^T (A C_l A^T)^{-1}`.
//!
//! **Shared latent** (`latent`): ONE latent `c = A x_s` per token from the source layer `s` (the
//! group's first); layer `l` computes `B_l c`. Fitting it is a reduced-rank regression of every
//! layer's weighted outputs `y_l = L_l W_l x_l` on `x_s`: with the cross moments
//! `C_ls = E[x_l x_s^T]`, the whitened coefficient is `Q = [L_l W_l C_ls]_l C_s^{-1/2}` and the rank-`r`
//! optimum is `A = V_r^T C_s^{-1/2}`, `B_l = L_l^{-1} (Q V_r)_l` with `V_r` the top-`r` right
//! singular vectors of `Q`. Its spectrum is `Q^T Q`'s eigenvalues over the group's total weighted
//! output energy `sum_l tr(L_l W_l C_l W_l^T L_l^T)`: the share of the outputs a component
//! predicts, which need not reach 1 (layer `l`'s outputs are not a function of `x_s`). For one
//! layer `C_ss = C_s` and this is fit `act`.
//!
//! The inverse square roots are regularised: `C + RIDGE * tr(C)/n * I`.
//!
//! Both take `pinned` inputs whose latent must be kept whole (the BOS position's, the attention
//! sink): their whitened directions `C^{-1/2} p` are the first columns of `V_r`
//! ([`crate::fit::pinned`]), so the latent of such an input loses nothing to the rank.

use crate::fit::act::{output_energy, sqrt_and_inverse, LeftWeight};
use crate::fit::decompose::{
    choose_rank, count_non_finite, eigh_descending, explained_variance_ratios, fix_signs, product,
    DecomposeError, Decomposition, Factors,
};
use crate::fit::pinned::basis_with_pinned;
use crate::fit::spec::Spec;
use faer::{Mat, MatRef};

/// The ridge added to a second moment before its inverse square root, relative to its mean
/// eigenvalue.
pub const RIDGE: f64 = 1e-4;

/// One layer of a group fitted together.
#[derive(Debug, Clone)]
pub struct LayerTerm<'a> {
    /// The layer's stacked `[W_k; W_v]`, `[m_l, n]`.
    pub w: MatRef<'a, f64>,
    /// `E[x_l x_l^T]`, `[n, n]`.
    pub c: MatRef<'a, f64>,
    /// `E[x_l x_s^T]` with the group's source layer (the source's own `c` for the source); only
    /// the shared latent reads it.
    pub cross: MatRef<'a, f64>,
    /// How the layer's output errors are weighted.
    pub left: LeftWeight,
}

/// A group's fit and how much of each layer's weighted output energy it keeps on the
/// calibration inputs.
#[derive(Debug)]
pub struct SharedDecomposition {
    /// Factors (`down` = `A`, `up` = the `B_l` stacked), spectrum, rank.
    pub decomposition: Decomposition,
    /// Per layer: `1 - E||L_l (y_l - y'_l)||^2 / E||L_l y_l||^2`.
    pub layer_energy_kept: Vec<f64>,
}

/// `c + RIDGE * tr(c)/n * I`, symmetrised.
pub(crate) fn regularised(c: MatRef<'_, f64>) -> Mat<f64> {
    regularised_by(c, RIDGE)
}

/// `c + relative * tr(c)/n * I`, symmetrised.
pub(crate) fn regularised_by(c: MatRef<'_, f64>, relative: f64) -> Mat<f64> {
    let n = c.nrows();
    let trace: f64 = (0..n).map(|i| c[(i, i)]).sum();
    let ridge = relative * (trace / n.max(1) as f64).max(f64::MIN_POSITIVE);
    Mat::from_fn(n, n, |i, j| {
        0.5 * (c[(i, j)] + c[(j, i)]) + if i == j { ridge } else { 0.0 }
    })
}

/// Rows of `blocks` stacked.
fn stack(blocks: &[Mat<f64>]) -> Mat<f64> {
    let rows = blocks.iter().map(Mat::nrows).sum();
    let cols = blocks.first().map_or(0, Mat::ncols);
    let mut out = Mat::<f64>::zeros(rows, cols);
    let mut row0 = 0;
    for b in blocks {
        out.as_mut()
            .subrows_mut(row0, b.nrows())
            .copy_from(b.as_ref());
        row0 += b.nrows();
    }
    out
}

/// `q^T q`'s first `min(rows, n)` eigenvalues, its eigenvectors and itself.
type RightSpectrum = (Vec<f64>, Mat<f64>, Mat<f64>);

/// The eigen-decomposition of `q^T q` (`[n, n]`), its first `min(rows, n)` eigenvalues, and
/// `q^T q` itself.
fn right_spectrum(q: MatRef<'_, f64>) -> Result<RightSpectrum, DecomposeError> {
    let mut gram = product(q.transpose(), q);
    let n = gram.nrows();
    for i in 0..n {
        for j in 0..i {
            let v = 0.5 * (gram[(i, j)] + gram[(j, i)]);
            gram[(i, j)] = v;
            gram[(j, i)] = v;
        }
    }
    let (mut values, vectors) = eigh_descending(gram.as_ref())?;
    values.truncate(q.nrows().min(n));
    Ok((values, vectors, gram))
}

/// The checks every fit starts with.
fn check_terms(terms: &[LayerTerm<'_>]) -> Result<(), DecomposeError> {
    let Some(first) = terms.first() else {
        return Err(DecomposeError::Empty);
    };
    if first.w.ncols() == 0 || terms.iter().any(|t| t.w.nrows() == 0) {
        return Err(DecomposeError::Empty);
    }
    let bad: usize = terms
        .iter()
        .map(|t| count_non_finite(t.w) + count_non_finite(t.c) + count_non_finite(t.cross))
        .sum();
    if bad > 0 {
        return Err(DecomposeError::NonFinite { count: bad });
    }
    Ok(())
}

/// The top-`r` right singular vectors (the columns of `vectors`, eigenvectors of `gram`), with
/// the whitened `pinned` inputs (`inverse_root p`) spanned first when there are any; sign-fixed.
fn kept_basis(
    gram: MatRef<'_, f64>,
    vectors: &Mat<f64>,
    r: usize,
    pinned: &[Vec<f64>],
    inverse_root: MatRef<'_, f64>,
) -> Result<Mat<f64>, DecomposeError> {
    let mut basis = if pinned.is_empty() || r == 0 {
        vectors.subcols(0, r).to_owned()
    } else {
        let n = inverse_root.nrows();
        let whitened: Vec<Vec<f64>> = pinned
            .iter()
            .map(|p| {
                let z = product(inverse_root, Mat::from_fn(n, 1, |i, _| p[i]).as_ref());
                (0..n).map(|i| z[(i, 0)]).collect()
            })
            .collect();
        basis_with_pinned(gram, &whitened, r)?
    };
    fix_signs(&mut basis);
    Ok(basis)
}

/// The fraction of weighted output energy `left (w - w') c (w - w')^T left^T` leaves of
/// `left w c w^T left^T`.
fn energy_kept(term: &LayerTerm<'_>, written: MatRef<'_, f64>, c: MatRef<'_, f64>) -> f64 {
    let total = output_energy(term.left.apply(term.w).as_ref(), term.c);
    let diff = Mat::from_fn(term.w.nrows(), term.w.ncols(), |i, j| {
        term.w[(i, j)] - written[(i, j)]
    });
    let error = output_energy(term.left.apply(diff.as_ref()).as_ref(), c);
    if total > 0.0 {
        1.0 - error / total
    } else {
        0.0
    }
}

/// The shared basis of a group (see the module docs), the latents of the `pinned` inputs kept.
pub fn shared_basis(
    terms: &[LayerTerm<'_>],
    spec: Spec,
    pinned: &[Vec<f64>],
) -> Result<SharedDecomposition, DecomposeError> {
    check_terms(terms)?;
    let n = terms[0].w.ncols();
    let mut pooled = Mat::<f64>::zeros(n, n);
    for t in terms {
        pooled += t.c;
    }
    let pooled = Mat::from_fn(n, n, |i, j| pooled[(i, j)] / terms.len() as f64);
    let (root, inverse_root) = sqrt_and_inverse(regularised(pooled.as_ref()).as_ref())?;
    let weighted: Vec<Mat<f64>> = terms
        .iter()
        .map(|t| product(t.left.apply(t.w).as_ref(), root.as_ref()))
        .collect();
    let (values, vectors, gram) = right_spectrum(stack(&weighted).as_ref())?;
    let ratios = explained_variance_ratios(&values);
    let choice = choose_rank(&ratios, spec);
    let basis = kept_basis(
        gram.as_ref(),
        &vectors,
        choice.rank,
        pinned,
        inverse_root.as_ref(),
    )?;
    let down = product(basis.transpose(), inverse_root.as_ref());
    let mut ups = Vec::with_capacity(terms.len());
    let mut kept = Vec::with_capacity(terms.len());
    for t in terms {
        let ac = product(down.as_ref(), t.c);
        let gram = regularised(product(ac.as_ref(), down.transpose()).as_ref());
        let (_, gram_inverse_root) = sqrt_and_inverse(gram.as_ref())?;
        let gram_inverse = product(gram_inverse_root.as_ref(), gram_inverse_root.as_ref());
        let up = product(product(t.w, ac.transpose()).as_ref(), gram_inverse.as_ref());
        kept.push(energy_kept(
            t,
            product(up.as_ref(), down.as_ref()).as_ref(),
            t.c,
        ));
        ups.push(up);
    }
    Ok(finish(choice, ratios, ups, down, kept))
}

/// The shared latent of a group whose first term is the source layer (see the module docs).
pub fn shared_latent(
    terms: &[LayerTerm<'_>],
    spec: Spec,
) -> Result<SharedDecomposition, DecomposeError> {
    let source = terms.first().ok_or(DecomposeError::Empty)?.c;
    shared_latent_from(terms, source, spec, &[])
}

/// [`shared_latent`] with the latent computed from inputs of second moment `predictor` rather than
/// the source layer's own `c` (sequential calibration: the compressed model's source input; each
/// term's `cross` is then `E[x_l x_pred^T]`, the source's included), the latents of the
/// `pinned` predictor inputs kept.
pub fn shared_latent_from(
    terms: &[LayerTerm<'_>],
    predictor: MatRef<'_, f64>,
    spec: Spec,
    pinned: &[Vec<f64>],
) -> Result<SharedDecomposition, DecomposeError> {
    check_terms(terms)?;
    let n = terms[0].w.ncols();
    if predictor.nrows() != n || predictor.ncols() != n {
        return Err(DecomposeError::MomentShape {
            rows: predictor.nrows(),
            cols: predictor.ncols(),
            n,
        });
    }
    let bad = count_non_finite(predictor);
    if bad > 0 {
        return Err(DecomposeError::NonFinite { count: bad });
    }
    let (_, inverse_root) = sqrt_and_inverse(regularised(predictor).as_ref())?;
    let whitened: Vec<Mat<f64>> = terms
        .iter()
        .map(|t| {
            let p = product(t.left.apply(t.w).as_ref(), t.cross);
            product(p.as_ref(), inverse_root.as_ref())
        })
        .collect();
    let (values, vectors, gram) = right_spectrum(stack(&whitened).as_ref())?;
    let energies: Vec<f64> = terms
        .iter()
        .map(|t| output_energy(t.left.apply(t.w).as_ref(), t.c))
        .collect();
    let total: f64 = energies.iter().sum();
    let ratios: Vec<f64> = values
        .iter()
        .map(|&v| if total > 0.0 { v.max(0.0) / total } else { 0.0 })
        .collect();
    let choice = choose_rank(&ratios, spec);
    let basis = kept_basis(
        gram.as_ref(),
        &vectors,
        choice.rank,
        pinned,
        inverse_root.as_ref(),
    )?;
    let down = product(basis.transpose(), inverse_root.as_ref());
    let mut ups = Vec::with_capacity(terms.len());
    let mut kept = Vec::with_capacity(terms.len());
    for ((t, q), energy) in terms.iter().zip(&whitened).zip(&energies) {
        let predicted = product(q.as_ref(), basis.as_ref());
        let captured: f64 = (0..predicted.ncols())
            .map(|j| predicted.col(j).squared_norm_l2())
            .sum();
        kept.push(if *energy > 0.0 {
            captured / energy
        } else {
            0.0
        });
        ups.push(t.left.apply_inverse(predicted.as_ref()));
    }
    Ok(finish(choice, ratios, ups, down, kept))
}

/// Assembles a group's result.
fn finish(
    choice: crate::fit::decompose::RankChoice,
    ratios: Vec<f64>,
    ups: Vec<Mat<f64>>,
    down: Mat<f64>,
    layer_energy_kept: Vec<f64>,
) -> SharedDecomposition {
    let variance_kept = ratios[..choice.rank].iter().sum::<f64>().min(1.0);
    let up = stack(&ups);
    let reconstruction = product(up.as_ref(), down.as_ref());
    SharedDecomposition {
        decomposition: Decomposition {
            choice,
            variance_kept,
            spectrum: ratios,
            reconstruction,
            factors: Factors { up, down },
        },
        layer_energy_kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::act::decompose_weighted;
    use crate::fit::decompose::test_matrices::{max_abs_diff, moment, noise};

    /// Two layers' inputs (`[n, samples]` each): the second a noisy linear map of the first.
    fn inputs(n: usize, samples: usize) -> (Mat<f64>, Mat<f64>) {
        let x0 = noise(n, samples, 21);
        let mix = noise(n, n, 22);
        let x1 = &mix * &x0 + noise(n, samples, 23) * 0.1;
        (x0, x1)
    }

    fn unweighted(m: usize) -> LeftWeight {
        LeftWeight::Diagonal(vec![1.0; m])
    }

    #[test]
    fn one_layer_equals_act() {
        let (n, m) = (12, 8);
        let (x0, _) = inputs(n, 300);
        let c = moment(&x0, &x0);
        let w = noise(m, n, 5);
        let term = LayerTerm {
            w: w.as_ref(),
            c: c.as_ref(),
            cross: c.as_ref(),
            left: unweighted(m),
        };
        for r in [2, 5] {
            let act =
                decompose_weighted(w.as_ref(), c.as_ref(), &unweighted(m), Spec::Rank(r)).unwrap();
            let basis = |t: &[LayerTerm<'_>], s| shared_basis(t, s, &[]);
            for fit in [basis, shared_latent] {
                let d = fit(std::slice::from_ref(&term), Spec::Rank(r)).unwrap();
                // The ridge moves the optimum slightly.
                let diff = max_abs_diff(
                    d.decomposition.reconstruction.as_ref(),
                    act.reconstruction.as_ref(),
                );
                assert!(diff < 1e-3, "rank {r}: {diff}");
                assert!((d.decomposition.variance_kept - act.variance_kept).abs() < 1e-3);
                assert!((d.layer_energy_kept[0] - act.variance_kept).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn latent_predicts_a_later_layer_from_the_source_input() {
        let (n, m, samples) = (10, 6, 400);
        let (x0, x1) = inputs(n, samples);
        let (w0, w1) = (noise(m, n, 7), noise(m, n, 8));
        let (c0, c1, c10) = (moment(&x0, &x0), moment(&x1, &x1), moment(&x1, &x0));
        let terms = [
            LayerTerm {
                w: w0.as_ref(),
                c: c0.as_ref(),
                cross: c0.as_ref(),
                left: unweighted(m),
            },
            LayerTerm {
                w: w1.as_ref(),
                c: c1.as_ref(),
                cross: c10.as_ref(),
                left: unweighted(m),
            },
        ];
        // The rank is clamped to the input width.
        let d = shared_latent(&terms, Spec::Rank(2 * m)).unwrap();
        let f = &d.decomposition.factors;
        assert_eq!((f.down.nrows(), f.up.nrows(), f.up.ncols()), (n, 2 * m, n));
        // The empirical error of predicting layer 1's outputs from x0 matches the energy kept.
        let latent = &f.down * &x0;
        let predicted = f.up.subrows(m, m) * &latent;
        let truth = &w1 * &x1;
        let err = (&truth - &predicted).squared_norm_l2();
        let kept = 1.0 - err / truth.squared_norm_l2();
        assert!(
            (kept - d.layer_energy_kept[1]).abs() < 1e-3,
            "{kept} vs {:?}",
            d.layer_energy_kept
        );
        // x1 is mostly a function of x0: most of layer 1's output energy is predicted.
        assert!(d.layer_energy_kept[1] > 0.9);
        assert!(d.layer_energy_kept[0] > 0.999);
        // Fewer components keep less, and the spectrum never claims more than the outputs hold.
        let small = shared_latent(&terms, Spec::Rank(3)).unwrap();
        assert!(small.decomposition.variance_kept < d.decomposition.variance_kept);
        assert!(d.decomposition.spectrum.iter().sum::<f64>() <= 1.0 + 1e-9);
    }

    #[test]
    fn basis_up_projections_are_least_squares_for_each_layer() {
        let (n, m, samples) = (10, 6, 400);
        let (x0, x1) = inputs(n, samples);
        let (w0, w1) = (noise(m, n, 9), noise(m, n, 10));
        let (c0, c1) = (moment(&x0, &x0), moment(&x1, &x1));
        let terms = [
            LayerTerm {
                w: w0.as_ref(),
                c: c0.as_ref(),
                cross: c0.as_ref(),
                left: unweighted(m),
            },
            LayerTerm {
                w: w1.as_ref(),
                c: c1.as_ref(),
                cross: c1.as_ref(),
                left: unweighted(m),
            },
        ];
        let d = shared_basis(&terms, Spec::Rank(4), &[]).unwrap();
        let f = &d.decomposition.factors;
        // Perturbing layer 1's up-projection can only increase its output error.
        let error = |up: MatRef<'_, f64>| {
            let diff = &w1 - up * &f.down;
            output_energy(diff.as_ref(), c1.as_ref())
        };
        let best = error(f.up.subrows(m, m));
        let nudged = f.up.subrows(m, m).to_owned() + noise(m, 4, 11) * 1e-3;
        assert!(error(nudged.as_ref()) > best);
        assert!(d
            .layer_energy_kept
            .iter()
            .all(|&k| (0.0..=1.0).contains(&k)));
    }

    #[test]
    fn pinned_inputs_keep_their_latent_whole() {
        let (n, m, samples) = (10, 6, 400);
        let (x0, x1) = inputs(n, samples);
        let (w0, w1) = (noise(m, n, 12), noise(m, n, 13));
        let (c0, c1, c10) = (moment(&x0, &x0), moment(&x1, &x1), moment(&x1, &x0));
        fn term<'a>(w: &'a Mat<f64>, c: &'a Mat<f64>, cross: &'a Mat<f64>) -> LayerTerm<'a> {
            LayerTerm {
                w: w.as_ref(),
                c: c.as_ref(),
                cross: cross.as_ref(),
                left: unweighted(w.nrows()),
            }
        }
        let p: Vec<f64> = (0..n)
            .map(|i| if i % 3 == 0 { 2.0 } else { -0.5 })
            .collect();
        let pm = Mat::from_fn(n, 1, |i, _| p[i]);
        // A latent: the source layer's outputs for p as its full-rank prediction (the ridge aside).
        let terms = [term(&w0, &c0, &c0), term(&w1, &c1, &c10)];
        for pinned in [false, true] {
            let pins = if pinned { vec![p.clone()] } else { Vec::new() };
            let d = shared_latent_from(&terms, c0.as_ref(), Spec::Rank(2), &pins).unwrap();
            let f = &d.decomposition.factors;
            let got = f.up.subrows(0, m) * (&f.down * &pm);
            let err = max_abs_diff(got.as_ref(), (&w0 * &pm).as_ref());
            assert_eq!(err < 1e-2, pinned, "pinned {pinned}: {err}");
        }
        // A basis: every layer's own pinned input.
        let terms = [term(&w0, &c0, &c0), term(&w1, &c1, &c1)];
        let d = shared_basis(&terms, Spec::Rank(3), std::slice::from_ref(&p)).unwrap();
        let latent = &d.decomposition.factors.down * &pm;
        let free = shared_basis(&terms, Spec::Rank(3), &[]).unwrap();
        let free_latent = &free.decomposition.factors.down * &pm;
        // The pinned latent holds all of p's whitened length; the free one loses some.
        let inverse_root = sqrt_and_inverse(
            regularised(Mat::from_fn(n, n, |i, j| 0.5 * (c0[(i, j)] + c1[(i, j)])).as_ref())
                .as_ref(),
        )
        .unwrap()
        .1;
        let whole = (&inverse_root * &pm).squared_norm_l2();
        assert!((latent.squared_norm_l2() / whole - 1.0).abs() < 1e-9);
        assert!(free_latent.squared_norm_l2() / whole < 0.999);
    }
}
