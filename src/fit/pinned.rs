//! Keeping given directions exactly: the basis of a fit whose first columns span `pinned`
//! vectors and whose other columns are the top eigenvectors of the Gram matrix with those
//! directions projected out. The calibrated fits use it for the attention sink: where every window
//! starts with a BOS, the BOS position's input is the same in every window and every query reads
//! its key, so its keys and values are kept exactly at the cost of one component. The math only.

use crate::fit::decompose::{eigh_descending, product, DecomposeError};
use faer::{Mat, MatRef};

/// Relative size below which a pinned vector adds no direction (it lies in the span of the ones
/// before it).
const DEPENDENT: f64 = 1e-9;

/// An orthonormal basis (columns, at most `limit`) of the span of `vectors` (each of the same
/// length), by modified Gram-Schmidt in order.
pub fn orthonormal(vectors: &[Vec<f64>], limit: usize) -> Mat<f64> {
    let mut cols: Vec<Vec<f64>> = Vec::new();
    for v in vectors {
        if cols.len() >= limit {
            break;
        }
        let norm0 = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let mut r = v.clone();
        for u in &cols {
            let d: f64 = r.iter().zip(u).map(|(a, b)| a * b).sum();
            r.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
        }
        let norm = r.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm0 > 0.0 && norm > DEPENDENT * norm0 {
            cols.push(r.iter().map(|a| a / norm).collect());
        }
    }
    let m = vectors.first().map_or(0, Vec::len);
    Mat::from_fn(m, cols.len(), |i, j| cols[j][i])
}

/// `r` orthonormal columns: a basis of `pinned`'s span first, then the top eigenvectors of `gram`
/// (`[m, m]`, symmetric) deflated by it, `(I - P P^T) gram (I - P P^T)`. With nothing pinned, the
/// top `r` eigenvectors of `gram` as `eigh_descending` returns them.
pub fn basis_with_pinned(
    gram: MatRef<'_, f64>,
    pinned: &[Vec<f64>],
    r: usize,
) -> Result<Mat<f64>, DecomposeError> {
    let m = gram.nrows();
    let fixed = orthonormal(pinned, r);
    let k = fixed.ncols();
    let gram = if k == 0 {
        gram.to_owned()
    } else {
        let projector = Mat::from_fn(m, m, |i, j| {
            let identity = if i == j { 1.0 } else { 0.0 };
            identity - (0..k).map(|c| fixed[(i, c)] * fixed[(j, c)]).sum::<f64>()
        });
        let deflated = product(
            product(projector.as_ref(), gram).as_ref(),
            projector.as_ref(),
        );
        Mat::from_fn(m, m, |i, j| 0.5 * (deflated[(i, j)] + deflated[(j, i)]))
    };
    let (_, vectors) = eigh_descending(gram.as_ref())?;
    Ok(Mat::from_fn(m, r, |i, j| {
        if j < k {
            fixed[(i, j)]
        } else {
            vectors[(i, j - k)]
        }
    }))
}

/// The share of `gram`'s trace the columns of `basis` keep, `tr(B^T G B) / tr(G)` in `[0, 1]`.
pub fn kept_share(gram: MatRef<'_, f64>, basis: MatRef<'_, f64>) -> f64 {
    let total: f64 = (0..gram.nrows()).map(|i| gram[(i, i)]).sum();
    let kept = product(product(basis.transpose(), gram).as_ref(), basis);
    let kept: f64 = (0..kept.nrows()).map(|i| kept[(i, i)]).sum();
    if total > 0.0 {
        (kept / total).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::decompose::test_matrices::{max_abs_diff, noise};

    #[test]
    fn the_pinned_direction_comes_first_and_the_rest_is_orthogonal() {
        let x = noise(6, 20, 3);
        let gram = &x * x.transpose();
        let p = vec![1.0, 2.0, 0.0, -1.0, 0.5, 0.0];
        let b = basis_with_pinned(gram.as_ref(), std::slice::from_ref(&p), 3).unwrap();
        let norm = p.iter().map(|a| a * a).sum::<f64>().sqrt();
        for i in 0..6 {
            assert!((b[(i, 0)] - p[i] / norm).abs() < 1e-12);
        }
        let btb = b.transpose() * &b;
        assert!(max_abs_diff(btb.as_ref(), Mat::<f64>::identity(3, 3).as_ref()) < 1e-10);
        // Nothing pinned: the plain top eigenvectors, and more energy kept than with a pin.
        let free = basis_with_pinned(gram.as_ref(), &[], 3).unwrap();
        let (_, v) = eigh_descending(gram.as_ref()).unwrap();
        assert!(max_abs_diff(free.as_ref(), v.subcols(0, 3)) == 0.0);
        assert!(kept_share(gram.as_ref(), free.as_ref()) >= kept_share(gram.as_ref(), b.as_ref()));
    }

    #[test]
    fn dependent_and_zero_vectors_add_nothing() {
        let a = vec![1.0, 0.0, 0.0];
        let q = orthonormal(
            &[
                a.clone(),
                vec![2.0, 0.0, 0.0],
                vec![0.0; 3],
                vec![0.0, 3.0, 0.0],
            ],
            5,
        );
        assert_eq!(q.ncols(), 2);
        assert_eq!(orthonormal(&[a.clone(), vec![0.0, 1.0, 0.0]], 1).ncols(), 1);
        assert_eq!(orthonormal(&[], 2).ncols(), 0);
    }
}
