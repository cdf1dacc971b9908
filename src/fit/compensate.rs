//! The least-squares refit behind sequential calibration (`--calibrate-mode sequential`).
//!
//! A layer of the compressed model reads inputs `x_c` that differ from the original model's `x_o`
//! (the layers below it were compressed). The map `W'` that best reproduces the original outputs,
//! `min E||W x_o - W' x_c||^2`, is `W S_oc S_cc^{-1}` with `S_oc = E[x_o x_c^T]` and
//! `S_cc = E[x_c x_c^T]`. Regularised towards the original weight (a ridge `λ||W' - W||^2`, `λ`
//! relative to `S_cc`'s mean eigenvalue) it is
//!
//! `W' = W (S_oc + λI)(S_cc + λI)^{-1} = W + W (S_oc - S_cc)(S_cc + λI)^{-1}`,
//!
//! which is `W` itself, bit for bit, when the two inputs coincide (`S_oc = S_cc`). The rank-`r`
//! optimum of the same cost is then the best rank-`r` fit of `W'` under `S_cc`: the cost splits
//! into `E||W x_o - W' x_c||^2 + E||(W' - W'_r) x_c||^2` (fit `act` applied to `W'`, `S_cc`).

use crate::fit::decompose::{count_non_finite, eigh_descending, narrow, product, DecomposeError};
use crate::fit::shared::{regularised_by, RIDGE};
use faer::linalg::solvers::Solve;
use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Mat, MatRef, Par, Side};

/// `y (c + ridge)^{-1}` of a positive semi-definite `c` (`ridge` relative to `c`'s mean
/// eigenvalue): by the Cholesky factor of `c + ridge`, which the ridge makes positive definite;
/// by the eigen-decomposition (eigenvalues floored) only where the factorisation fails (no ridge
/// on a singular `c`, or rounding on a near-singular one).
fn solve_regularised(
    y: Mat<f64>,
    c: MatRef<'_, f64>,
    (ridge, precision): (f64, Product),
) -> Result<Mat<f64>, DecomposeError> {
    let regularised = regularised_by(c, ridge);
    if let Ok(factor) = regularised.as_ref().llt(Side::Lower) {
        let mut y = y;
        match precision {
            Product::F64 => factor.rsolve_in_place(y.as_mut()),
            Product::F32 => y = rsolve_f32(factor.L(), y.as_ref()),
        }
        return Ok(y);
    }
    rsolve_by_eigh(y, regularised.as_ref())
}

/// `y m^{-1}` of a symmetric positive semi-definite `m` by its eigen-decomposition, eigenvalues
/// floored at `1e-12` of the largest.
fn rsolve_by_eigh(y: Mat<f64>, m: MatRef<'_, f64>) -> Result<Mat<f64>, DecomposeError> {
    let n = m.nrows();
    let (values, vectors) = eigh_descending(m)?;
    let floor = values.first().copied().unwrap_or(0.0).max(0.0) * 1e-12;
    let floor = if floor > 0.0 { floor } else { 1.0 };
    let scaled = Mat::from_fn(n, n, |i, k| vectors[(i, k)] / values[k].max(floor));
    let inverse = product(scaled.as_ref(), vectors.transpose());
    Ok(product(y.as_ref(), inverse.as_ref()))
}

/// The refit `W + W (target - c)(c + λI)^{-1}` of `w` (`[m, n]`) for inputs of second moment `c`
/// whose cross moment with the original inputs is `target` (`E[x_o x_c^T]`, both `[n, n]`); `w`
/// unchanged when `target == c`.
pub fn compensate(
    w: MatRef<'_, f64>,
    target: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
) -> Result<Mat<f64>, DecomposeError> {
    compensate_by(w, target, c, (RIDGE, Product::F64))
}

/// The precision of the refit's product `W (target - c)` and of its solve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// In `f64`.
    F64,
    /// In `f32`, and the triangular solves after the `f64` Cholesky factorisation too (four
    /// times faster on AVX2): their rounding, about `1e-6` relative, is amplified by the solve at
    /// most `cond(c + λI)` times, so only for a ridge that bounds that well (the `o_proj`
    /// refit's, 0.1 of the mean eigenvalue: `cond <= 10 n`).
    F32,
}

/// `a b` at `precision`.
fn product_at(a: MatRef<'_, f64>, b: MatRef<'_, f64>, precision: Product) -> Mat<f64> {
    match precision {
        Product::F64 => product(a, b),
        Product::F32 => {
            let p = narrow(a) * narrow(b);
            Mat::from_fn(p.nrows(), p.ncols(), |i, j| f64::from(p[(i, j)]))
        }
    }
}

/// `y (L L^T)^{-1}` by two triangular solves in `f32` (`l` lower triangular): `U^T = L^{-1} y^T`,
/// then `X^T = L^{-T} U^T`.
fn rsolve_f32(l: MatRef<'_, f64>, y: MatRef<'_, f64>) -> Mat<f64> {
    let l = narrow(l);
    let mut x = narrow(y.transpose());
    solve_lower_triangular_in_place(l.as_ref(), x.as_mut(), Par::rayon(0));
    solve_upper_triangular_in_place(l.transpose(), x.as_mut(), Par::rayon(0));
    Mat::from_fn(y.nrows(), y.ncols(), |i, j| f64::from(x[(j, i)]))
}

/// [`compensate`] with the ridge `λ = ridge * tr(c)/n` (`ridge` relative to `c`'s mean
/// eigenvalue), its product `W (target - c)` at `precision`.
pub fn compensate_by(
    w: MatRef<'_, f64>,
    target: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    (ridge, precision): (f64, Product),
) -> Result<Mat<f64>, DecomposeError> {
    let n = w.ncols();
    for m in [target, c] {
        if m.nrows() != n || m.ncols() != n {
            return Err(DecomposeError::MomentShape {
                rows: m.nrows(),
                cols: m.ncols(),
                n,
            });
        }
    }
    let bad = count_non_finite(w) + count_non_finite(target) + count_non_finite(c);
    if bad > 0 {
        return Err(DecomposeError::NonFinite { count: bad });
    }
    let d = Mat::from_fn(n, n, |i, j| target[(i, j)] - c[(i, j)]);
    if (0..n).all(|j| (0..n).all(|i| d[(i, j)] == 0.0)) {
        return Ok(w.to_owned());
    }
    // `W D (c + λI)^{-1}`: one product and two triangular solves with `m` right-hand sides.
    let wx = solve_regularised(product_at(w, d.as_ref(), precision), c, (ridge, precision))?;
    Ok(Mat::from_fn(w.nrows(), n, |i, j| w[(i, j)] + wx[(i, j)]))
}

/// The same refit from the original outputs' moment instead of the inputs': `W + (T - W C)(C +
/// λI)^{-1}`, with `T = E[y_o x_c^T] = W S_oc` (`y_o = W x_o` the original outputs, `[m, n]`)
/// and `wc = W C` (`[m, n]`, the caller's: it reports with it too), `λ` as in
/// [`compensate_by`]. What the `o_proj` refit measures when the original outputs are at hand:
/// no `S_oc`, no `W S_oc`. `w` unchanged when `T == W C`; the solve at `precision`.
pub fn compensate_outputs(
    w: MatRef<'_, f64>,
    (t, wc): (MatRef<'_, f64>, MatRef<'_, f64>),
    c: MatRef<'_, f64>,
    (ridge, precision): (f64, Product),
) -> Result<Mat<f64>, DecomposeError> {
    let (m, n) = (w.nrows(), w.ncols());
    if c.nrows() != n || c.ncols() != n {
        return Err(DecomposeError::MomentShape {
            rows: c.nrows(),
            cols: c.ncols(),
            n,
        });
    }
    for x in [t, wc] {
        if x.nrows() != m || x.ncols() != n {
            return Err(DecomposeError::MomentShape {
                rows: x.nrows(),
                cols: x.ncols(),
                n,
            });
        }
    }
    let bad =
        count_non_finite(w) + count_non_finite(t) + count_non_finite(wc) + count_non_finite(c);
    if bad > 0 {
        return Err(DecomposeError::NonFinite { count: bad });
    }
    let residual = Mat::from_fn(m, n, |i, j| t[(i, j)] - wc[(i, j)]);
    if (0..n).all(|j| (0..m).all(|i| residual[(i, j)] == 0.0)) {
        return Ok(w.to_owned());
    }
    let wx = solve_regularised(residual, c, (ridge, precision))?;
    Ok(Mat::from_fn(m, n, |i, j| w[(i, j)] + wx[(i, j)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::decompose::test_matrices::{max_abs_diff, moment, noise};

    #[test]
    fn coinciding_inputs_leave_the_weight_unchanged() {
        let x = noise(6, 200, 1);
        let c = moment(&x, &x);
        let w = noise(4, 6, 2);
        let out = compensate(w.as_ref(), c.as_ref(), c.as_ref()).unwrap();
        assert_eq!(max_abs_diff(out.as_ref(), w.as_ref()), 0.0);
    }

    #[test]
    fn recovers_the_map_from_moved_inputs() {
        // x_o = M x_c exactly: the refit is W M (up to the ridge).
        let (n, samples) = (6, 400);
        let xc = noise(n, samples, 3);
        let m = Mat::<f64>::identity(n, n) + noise(n, n, 4) * 0.2;
        let xo = &m * &xc;
        let w = noise(3, n, 5);
        let out = compensate(
            w.as_ref(),
            moment(&xo, &xc).as_ref(),
            moment(&xc, &xc).as_ref(),
        )
        .unwrap();
        let expected = &w * &m;
        let diff = max_abs_diff(out.as_ref(), expected.as_ref());
        assert!(diff < 1e-3, "{diff}");
        // And it reproduces the original outputs far better than the unchanged weight does.
        let err = |v: &Mat<f64>| (&w * &xo - v * &xc).norm_l2();
        assert!(err(&out) < 1e-2 * err(&w), "{} vs {}", err(&out), err(&w));
    }

    #[test]
    fn the_cholesky_solve_is_the_eigendecomposition_one_and_f32_is_close() {
        let (n, samples) = (12, 300);
        let xc = noise(n, samples, 7);
        let xo = &xc + noise(n, samples, 8) * 0.3;
        let (target, c) = (moment(&xo, &xc), moment(&xc, &xc));
        let w = noise(5, n, 9);
        let exact = compensate(w.as_ref(), target.as_ref(), c.as_ref()).unwrap();
        let d = &target - &c;
        let y = &w * &d;
        let by_eigh =
            rsolve_by_eigh(y.clone(), regularised_by(c.as_ref(), RIDGE).as_ref()).unwrap();
        let expected = &w + &by_eigh;
        assert!(max_abs_diff(exact.as_ref(), expected.as_ref()) < 1e-9);
        let fast =
            compensate_by(w.as_ref(), target.as_ref(), c.as_ref(), (0.1, Product::F32)).unwrap();
        let slow =
            compensate_by(w.as_ref(), target.as_ref(), c.as_ref(), (0.1, Product::F64)).unwrap();
        let diff = max_abs_diff(fast.as_ref(), slow.as_ref());
        assert!(diff > 0.0 && diff < 1e-4 * slow.norm_max(), "{diff}");
    }

    #[test]
    fn a_singular_moment_without_ridge_falls_back_to_the_eigendecomposition() {
        // `c` is exactly singular: no Cholesky factor without a ridge.
        let c = Mat::<f64>::from_fn(4, 4, |i, j| if i == j && i < 2 { 1.0 } else { 0.0 });
        assert!(c.as_ref().llt(Side::Lower).is_err());
        let target = Mat::<f64>::from_fn(4, 4, |i, j| if i == j && i < 2 { 2.0 } else { 0.0 });
        let w = noise(3, 4, 10);
        let out =
            compensate_by(w.as_ref(), target.as_ref(), c.as_ref(), (0.0, Product::F64)).unwrap();
        // On the directions `c` spans the refit doubles `w`; elsewhere it is unchanged.
        for i in 0..3 {
            for j in 0..4 {
                let want = if j < 2 { 2.0 * w[(i, j)] } else { w[(i, j)] };
                assert!((out[(i, j)] - want).abs() < 1e-9, "({i}, {j})");
            }
        }
    }

    #[test]
    fn refuses_non_finite_and_mismatched_moments() {
        let w = noise(3, 4, 6);
        let c = Mat::<f64>::identity(4, 4);
        let mut bad = c.clone();
        bad[(1, 2)] = f64::NAN;
        assert!(matches!(
            compensate(w.as_ref(), bad.as_ref(), c.as_ref()),
            Err(DecomposeError::NonFinite { count: 1 })
        ));
        let small = Mat::<f64>::identity(3, 3);
        assert!(compensate(w.as_ref(), small.as_ref(), c.as_ref()).is_err());
    }

    #[test]
    fn the_refit_from_outputs_is_the_refit_from_inputs() {
        let (m, n, tokens) = (5, 7, 400);
        let (xo, jitter) = (noise(n, tokens, 3), noise(n, tokens, 4));
        let xc = Mat::from_fn(n, tokens, |i, j| xo[(i, j)] + 0.3 * jitter[(i, j)]);
        let w = noise(m, n, 5);
        let (c, soc) = (moment(&xc, &xc), moment(&xo, &xc));
        let t = product(w.as_ref(), soc.as_ref());
        let wc = product(w.as_ref(), c.as_ref());
        for precision in [Product::F64, Product::F32] {
            let a = compensate_by(w.as_ref(), soc.as_ref(), c.as_ref(), (0.1, precision)).unwrap();
            let b = compensate_outputs(
                w.as_ref(),
                (t.as_ref(), wc.as_ref()),
                c.as_ref(),
                (0.1, precision),
            )
            .unwrap();
            let tolerance = if precision == Product::F64 {
                1e-12
            } else {
                1e-5
            };
            assert!(
                max_abs_diff(a.as_ref(), b.as_ref()) < tolerance,
                "{precision:?}"
            );
            assert!(max_abs_diff(a.as_ref(), w.as_ref()) > 1e-3);
        }
        let same = compensate_outputs(
            w.as_ref(),
            (wc.as_ref(), wc.as_ref()),
            c.as_ref(),
            (0.1, Product::F32),
        )
        .unwrap();
        assert_eq!(max_abs_diff(same.as_ref(), w.as_ref()), 0.0);
        let short = Mat::<f64>::zeros(m, n - 1);
        let e = compensate_outputs(
            w.as_ref(),
            (short.as_ref(), wc.as_ref()),
            c.as_ref(),
            (0.1, Product::F64),
        );
        assert!(matches!(e, Err(DecomposeError::MomentShape { .. })));
    }
}
