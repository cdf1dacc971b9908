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

use crate::fit::decompose::{count_non_finite, eigh_descending, product, DecomposeError};
use crate::fit::shared::{regularised_by, RIDGE};
use faer::{Mat, MatRef};

/// `(c + ridge)^{-1}` of a positive semi-definite `c`, by its eigen-decomposition (`ridge`
/// relative to `c`'s mean eigenvalue).
fn regularised_inverse(c: MatRef<'_, f64>, ridge: f64) -> Result<Mat<f64>, DecomposeError> {
    let n = c.nrows();
    let (values, vectors) = eigh_descending(regularised_by(c, ridge).as_ref())?;
    let floor = values.first().copied().unwrap_or(0.0).max(0.0) * 1e-12;
    let floor = if floor > 0.0 { floor } else { 1.0 };
    let scaled = Mat::from_fn(n, n, |i, k| vectors[(i, k)] / values[k].max(floor));
    Ok(product(scaled.as_ref(), vectors.transpose()))
}

/// The refit `W + W (target - c)(c + λI)^{-1}` of `w` (`[m, n]`) for inputs of second moment `c`
/// whose cross moment with the original inputs is `target` (`E[x_o x_c^T]`, both `[n, n]`); `w`
/// unchanged when `target == c`.
pub fn compensate(
    w: MatRef<'_, f64>,
    target: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
) -> Result<Mat<f64>, DecomposeError> {
    compensate_by(w, target, c, RIDGE)
}

/// [`compensate`] with the ridge `λ = ridge * tr(c)/n` (`ridge` relative to `c`'s mean
/// eigenvalue).
pub fn compensate_by(
    w: MatRef<'_, f64>,
    target: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    ridge: f64,
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
    let x = product(d.as_ref(), regularised_inverse(c, ridge)?.as_ref());
    let wx = product(w, x.as_ref());
    Ok(Mat::from_fn(w.nrows(), n, |i, j| w[(i, j)] + wx[(i, j)]))
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
}
