//! Activation-aware low-rank fits (`--fit act`): fit what a projection *outputs* on real inputs
//! instead of its weights. The math only; no I/O.
//!
//! For a (stacked) weight `W` `[m, n]`, an input covariance `C` `[n, n]` (from calibration text) and
//! an invertible left weighting `L` `[m, m]` (how much an error in each output direction costs), the
//! expected weighted output error of a replacement `W'` is `||L (W - W') C^{1/2}||_F^2`. Its rank-`r`
//! minimiser among `W' = L^{-1} U U^T L W` is given by the top-`r` eigenvectors `U` of
//! `M = (L W) C (L W)^T`: the principal directions of the weighted outputs. Factored:
//! `down = U^T L W` `[r, n]`, `up = L^{-1} U` `[m, r]`. The explained-variance ratios are `M`'s
//! eigenvalues over their sum: the share of output energy kept.
//!
//! The default weighting balances the blocks of a stack (K and V for a shared fit) to equal output
//! energy: `L = diag(s_b)` with `s_b = 1 / sqrt(tr(W_b C W_b^T))`, so neither projection dominates the
//! shared basis just because its outputs are larger. With `C = I` and one block this is `svd`.

use crate::fit::decompose::{eigh_descending, narrow, product, DecomposeError};
pub use crate::fit::weighted::{
    check_inputs, decompose_spectrum, decompose_weighted, decompose_weighted_pinned, spectrum_of,
    weighted_spectrum, LeftWeight, Weighted, WeightedSpectrum,
};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// How fit `act` weighs the errors of the outputs it fits .
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ActWeighting {
    /// Every output direction alike; stacked blocks balanced to equal output energy.
    Energy,
    /// Key errors weighted by the queries that read them, value errors through `o_proj`; blocks
    /// then balanced to equal weighted energy. The family's own score function: the queries as
    /// its scores read them (after a per-head `q_norm`) and the gains of its `k_norm` and of the
    /// norm on the attention output (Gemma's `post_attention_layernorm`), where it has them.
    #[default]
    Attention,
    /// [`ActWeighting::Attention`] from the projections alone, `W_q C W_q^T` for keys and `o_proj`
    /// for values, without the family's norms (the same for families without them).
    Projections,
}

impl ActWeighting {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            ActWeighting::Energy => "energy",
            ActWeighting::Attention => "attention",
            ActWeighting::Projections => "projections",
        }
    }
}

/// `tr(W C W^T)`: the expected squared norm of `W x` for inputs of covariance `C`.
pub fn output_energy(w: MatRef<'_, f64>, c: MatRef<'_, f64>) -> f64 {
    let wc = product(w, c);
    let mut e = 0.0;
    for i in 0..w.nrows() {
        for j in 0..w.ncols() {
            e += wc[(i, j)] * w[(i, j)];
        }
    }
    e
}

/// The block-balancing scales: row `i` of block `b` gets `1 / sqrt(tr(W_b C W_b^T))` (1 for a block
/// with no energy). `blocks` are the row counts of the stacked matrices, in order.
pub fn balance_scales(w: MatRef<'_, f64>, c: MatRef<'_, f64>, blocks: &[usize]) -> Vec<f64> {
    let mut scales = Vec::with_capacity(w.nrows());
    let mut row0 = 0;
    for &rows in blocks {
        let e = output_energy(w.subrows(row0, rows), c);
        let s = if e > 0.0 && e.is_finite() {
            1.0 / e.sqrt()
        } else {
            1.0
        };
        scales.extend(std::iter::repeat_n(s, rows));
        row0 += rows;
    }
    scales
}

/// `g / mean(diag g) + alpha I`: an output-error weighting `g` (`[m, m]`, symmetric, positive
/// semi-definite) made scale-free and shrunk toward weighting every output alike. The attention
/// weighting is measured on calibration text through the original model's queries and `o_proj`;
/// the identity term keeps every output direction at least `alpha` times the average weight, so
/// directions those calibration queries rarely read are not spent for free (held-out text and
/// the compressed model's own queries read them). An all-zero `g` gives `alpha I`.
pub fn shrink_toward_identity(g: MatRef<'_, f64>, alpha: f64) -> Mat<f64> {
    let m = g.nrows();
    let mean = (0..m).map(|i| g[(i, i)]).sum::<f64>() / m.max(1) as f64;
    let usable = mean > 0.0 && mean.is_finite();
    Mat::from_fn(m, m, |i, j| {
        let scaled = if usable { g[(i, j)] / mean } else { 0.0 };
        scaled + if i == j { alpha } else { 0.0 }
    })
}

/// The attention's head layout, for the attention-aware weightings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Heads {
    fn group(&self) -> usize {
        (self.num_heads / self.num_kv_heads.max(1)).max(1)
    }
}

/// How much an error in each key output costs in attention logits: per KV head `j`, the sum over
/// the query heads `h` that read it of the query covariance `W_q,h C W_q,h^T` (`[head_dim,
/// head_dim]`), since a key error `e` moves head `h`'s logit by `q_h . e`. Block-diagonal
/// `[kv_dim, kv_dim]`. The products in `f32` (a weighting: its rounding, about `1e-6` relative,
/// moves the fit far less than the calibration text does; four times faster, and on
/// Llama-3-8B's `q_proj` a `4096^3` product per layer), the heads summed in `f64`.
pub fn key_weight(wq: MatRef<'_, f64>, c: MatRef<'_, f64>, heads: Heads) -> Mat<f64> {
    let hd = heads.head_dim;
    let kv_dim = heads.num_kv_heads * hd;
    let (wq, c) = (narrow(wq), narrow(c));
    let mut g = Mat::<f64>::zeros(kv_dim, kv_dim);
    for h in 0..heads.num_heads {
        let j = h / heads.group();
        let wqh = wq.subrows(h * hd, hd);
        let block = product_f32(product_f32(wqh, c.as_ref()).as_ref(), wqh.transpose());
        for a in 0..hd {
            for b in 0..hd {
                g[(j * hd + a, j * hd + b)] += f64::from(block[(a, b)]);
            }
        }
    }
    g
}

/// `a b` in `f32`, on this thread (fits run in parallel across groups).
fn product_f32(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
}

/// How much an error in each value output costs in the layer's output: per KV head `j`, the sum
/// over its query heads `h` of `W_o,h^T W_o,h` (`W_o,h` the `o_proj` columns of head `h`), since a
/// value error `e` reaches the residual stream as `W_o,h e`. Block-diagonal `[kv_dim, kv_dim]`.
pub fn value_weight(wo: MatRef<'_, f64>, heads: Heads) -> Mat<f64> {
    let hd = heads.head_dim;
    let kv_dim = heads.num_kv_heads * hd;
    let mut g = Mat::<f64>::zeros(kv_dim, kv_dim);
    for h in 0..heads.num_heads {
        let j = h / heads.group();
        let woh = wo.subcols(h * hd, hd);
        let block = product(woh.transpose(), woh);
        for a in 0..hd {
            for b in 0..hd {
                g[(j * hd + a, j * hd + b)] += block[(a, b)];
            }
        }
    }
    g
}

/// The symmetric square root of a positive semi-definite `g` and its inverse, with eigenvalues
/// floored at `1e-10` of the largest so the inverse exists.
pub fn sqrt_and_inverse(g: MatRef<'_, f64>) -> Result<(Mat<f64>, Mat<f64>), DecomposeError> {
    let n = g.nrows();
    let (values, vectors) = eigh_descending(g)?;
    let floor = values.first().copied().unwrap_or(0.0).max(0.0) * 1e-10;
    let floor = if floor > 0.0 { floor } else { 1.0 };
    let root: Vec<f64> = values.iter().map(|&v| v.max(floor).sqrt()).collect();
    let scaled = |f: &dyn Fn(f64) -> f64| {
        let vs = Mat::from_fn(n, n, |i, k| vectors[(i, k)] * f(root[k]));
        product(vs.as_ref(), vectors.transpose())
    };
    Ok((scaled(&|r| r), scaled(&|r| 1.0 / r)))
}

/// The left weighting of a stack of blocks, each with its own cost matrix `g_b` (`None`: identity),
/// each block then scaled to equal weighted output energy `tr(L_b W_b C W_b^T L_b^T)`; applied
/// ([`Weighted`]): `L W` block by block and `L W C` in one product, the energies read from it.
pub fn blockwise_weight(
    w: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    blocks: &[(usize, Option<Mat<f64>>)],
) -> Result<Weighted, DecomposeError> {
    let (m, n) = (w.nrows(), w.ncols());
    let mut l = Mat::<f64>::zeros(m, m);
    let mut inverse = Mat::<f64>::zeros(m, m);
    let mut lw = Mat::<f64>::zeros(m, n);
    let mut roots = Vec::with_capacity(blocks.len());
    let mut row0 = 0;
    for (rows, g) in blocks {
        let rows = *rows;
        let (lb, ib) = match g {
            Some(g) => sqrt_and_inverse(g.as_ref())?,
            None => (Mat::identity(rows, rows), Mat::identity(rows, rows)),
        };
        let weighted = product(lb.as_ref(), w.subrows(row0, rows));
        lw.as_mut()
            .subrows_mut(row0, rows)
            .copy_from(weighted.as_ref());
        roots.push((lb, ib));
        row0 += rows;
    }
    let mut lwc = product(lw.as_ref(), c);
    let mut row0 = 0;
    for ((rows, _), (lb, ib)) in blocks.iter().zip(roots) {
        let rows = *rows;
        // `tr(L_b W_b C W_b^T L_b^T)`, as `output_energy` sums it.
        let mut e = 0.0;
        for i in row0..row0 + rows {
            for j in 0..n {
                e += lwc[(i, j)] * lw[(i, j)];
            }
        }
        let s = if e > 0.0 && e.is_finite() {
            1.0 / e.sqrt()
        } else {
            1.0
        };
        for i in 0..rows {
            for k in 0..rows {
                l[(row0 + i, row0 + k)] = s * lb[(i, k)];
                inverse[(row0 + i, row0 + k)] = ib[(i, k)] / s;
            }
            for j in 0..n {
                lw[(row0 + i, j)] *= s;
                lwc[(row0 + i, j)] *= s;
            }
        }
        row0 += rows;
    }
    Ok(Weighted {
        left: LeftWeight::Full { l, inverse },
        lw,
        lwc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::spec::Spec;

    #[test]
    fn shrinking_is_scale_free_and_adds_the_identity() {
        let g = Mat::from_fn(2, 2, |i, j| [[3.0, 1.0], [1.0, 1.0]][i][j]);
        let a = shrink_toward_identity(g.as_ref(), 1.0);
        // mean diagonal 2: g / 2 + I.
        let want = [[2.5, 0.5], [0.5, 1.5]];
        for i in 0..2 {
            for j in 0..2 {
                assert!(
                    (a[(i, j)] - want[i][j]).abs() < 1e-15,
                    "{i},{j}: {}",
                    a[(i, j)]
                );
            }
        }
        let scaled = Mat::from_fn(2, 2, |i, j| 1e6 * g[(i, j)]);
        let b = shrink_toward_identity(scaled.as_ref(), 1.0);
        assert!((0..2).all(|i| (0..2).all(|j| (a[(i, j)] - b[(i, j)]).abs() < 1e-12)));
        let zero = shrink_toward_identity(Mat::<f64>::zeros(2, 2).as_ref(), 0.5);
        assert_eq!((zero[(0, 0)], zero[(0, 1)], zero[(1, 1)]), (0.5, 0.0, 0.5));
    }
    use crate::fit::decompose::test_matrices::{max_abs_diff, noise};
    use crate::fit::decompose::{decompose, Fit};

    #[test]
    fn identity_covariance_and_one_block_equals_svd() {
        for (m, n) in [(6, 10), (10, 6)] {
            let w = noise(m, n, 3);
            let c = Mat::<f64>::identity(n, n);
            let left = LeftWeight::Diagonal(balance_scales(w.as_ref(), c.as_ref(), &[m]));
            for r in [1, 3, m.min(n)] {
                let act = decompose_weighted(w.as_ref(), c.as_ref(), &left, Spec::Rank(r)).unwrap();
                let svd = decompose(w.as_ref(), Fit::Svd, Spec::Rank(r)).unwrap();
                assert!(
                    max_abs_diff(act.reconstruction.as_ref(), svd.reconstruction.as_ref()) < 1e-10,
                    "{m}x{n} rank {r}"
                );
                assert!((act.variance_kept - svd.variance_kept).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn factors_multiply_to_the_reconstruction() {
        let w = noise(8, 12, 5);
        let x = noise(12, 40, 6);
        let c = &x * x.transpose();
        let left = LeftWeight::Diagonal(balance_scales(w.as_ref(), c.as_ref(), &[3, 5]));
        let d = decompose_weighted(w.as_ref(), c.as_ref(), &left, Spec::Rank(4)).unwrap();
        let p = &d.factors.up * &d.factors.down;
        assert!(max_abs_diff(p.as_ref(), d.reconstruction.as_ref()) < 1e-12);
        assert_eq!((d.factors.up.nrows(), d.factors.up.ncols()), (8, 4));
    }

    #[test]
    fn beats_svd_on_the_outputs_it_was_fitted_to() {
        // Inputs concentrated in a few directions: the output-aware fit must have a smaller output
        // error than the weight-only fit of the same rank (it is the minimiser of that error).
        let (m, n, samples) = (10, 16, 200);
        let w = noise(m, n, 9);
        let mut x = noise(n, samples, 10);
        for i in 4..n {
            for j in 0..samples {
                x[(i, j)] *= 0.05;
            }
        }
        let c = &x * x.transpose();
        let left = LeftWeight::Diagonal(vec![1.0; m]);
        let output_error = |w2: &Mat<f64>| {
            let d = &w - w2;
            output_energy(d.as_ref(), c.as_ref())
        };
        for r in [2, 4, 6] {
            let act = decompose_weighted(w.as_ref(), c.as_ref(), &left, Spec::Rank(r)).unwrap();
            let svd = decompose(w.as_ref(), Fit::Svd, Spec::Rank(r)).unwrap();
            assert!(
                output_error(&act.reconstruction) < output_error(&svd.reconstruction),
                "rank {r}"
            );
            // Kept share of output energy matches the spectrum.
            let kept =
                1.0 - output_error(&act.reconstruction) / output_energy(w.as_ref(), c.as_ref());
            assert!((kept - act.variance_kept).abs() < 1e-9, "rank {r}");
        }
    }

    #[test]
    fn balancing_gives_blocks_equal_energy() {
        let mut w = noise(6, 8, 2);
        for j in 0..8 {
            for i in 0..3 {
                w[(i, j)] *= 100.0;
            }
        }
        let c = Mat::<f64>::identity(8, 8);
        let s = balance_scales(w.as_ref(), c.as_ref(), &[3, 3]);
        let scaled = Mat::from_fn(6, 8, |i, j| s[i] * w[(i, j)]);
        let e1 = output_energy(scaled.subrows(0, 3), c.as_ref());
        let e2 = output_energy(scaled.subrows(3, 3), c.as_ref());
        assert!((e1 - 1.0).abs() < 1e-12 && (e2 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn attention_weights_are_block_diagonal_sums_over_query_heads() {
        let heads = Heads {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 2,
        };
        let wq = noise(8, 5, 1);
        let wo = noise(5, 8, 2);
        let c = Mat::<f64>::identity(5, 5);
        let gk = key_weight(wq.as_ref(), c.as_ref(), heads);
        let gv = value_weight(wo.as_ref(), heads);
        // KV head 1 is read by query heads 2 and 3 (rows / columns 4..8).
        let direct = |a: usize, b: usize| -> (f64, f64) {
            let (mut k, mut v) = (0.0, 0.0);
            for h in [2, 3] {
                for x in 0..5 {
                    k += wq[(h * 2 + a, x)] * wq[(h * 2 + b, x)];
                    v += wo[(x, h * 2 + a)] * wo[(x, h * 2 + b)];
                }
            }
            (k, v)
        };
        for a in 0..2 {
            for b in 0..2 {
                let (k, v) = direct(a, b);
                // The key weighting's products are `f32`.
                assert!((gk[(2 + a, 2 + b)] - k).abs() < 1e-5 * (1.0 + k.abs()));
                assert!((gv[(2 + a, 2 + b)] - v).abs() < 1e-12);
                // No coupling between KV heads.
                assert_eq!(gk[(a, 2 + b)], 0.0);
            }
        }
        let (r, ri) = sqrt_and_inverse(gk.as_ref()).unwrap();
        let back = &r * &r;
        assert!(max_abs_diff(back.as_ref(), gk.as_ref()) < 1e-9);
        let id = &r * &ri;
        assert!(max_abs_diff(id.as_ref(), Mat::<f64>::identity(4, 4).as_ref()) < 1e-9);
    }

    #[test]
    fn a_pinned_input_is_reproduced_exactly_at_any_rank() {
        let (m, n) = (8, 12);
        let w = noise(m, n, 21);
        let x = noise(n, 50, 22);
        let c = &x * x.transpose();
        let left = LeftWeight::Diagonal(balance_scales(w.as_ref(), c.as_ref(), &[4, 4]));
        let p: Vec<f64> = (0..n).map(|i| (i as f64 - 5.0) * 0.3).collect();
        let pm = Mat::from_fn(n, 1, |i, _| p[i]);
        let exact = &w * &pm;
        for r in [1, 3, 6] {
            let free = decompose_weighted(w.as_ref(), c.as_ref(), &left, Spec::Rank(r)).unwrap();
            let d = decompose_weighted_pinned(
                w.as_ref(),
                c.as_ref(),
                &left,
                Spec::Rank(r),
                std::slice::from_ref(&p),
            )
            .unwrap();
            let got = &d.reconstruction * &pm;
            assert!(
                max_abs_diff(got.as_ref(), exact.as_ref()) < 1e-9,
                "rank {r}"
            );
            // The free fit does not keep it; the pinned one keeps less energy on average.
            let miss = &free.reconstruction * &pm;
            assert!(
                max_abs_diff(miss.as_ref(), exact.as_ref()) > 1e-6,
                "rank {r}"
            );
            assert!(d.variance_kept <= free.variance_kept + 1e-12);
            assert_eq!(d.spectrum, free.spectrum);
            let p2 = &d.factors.up * &d.factors.down;
            assert!(max_abs_diff(p2.as_ref(), d.reconstruction.as_ref()) < 1e-12);
        }
    }

    #[test]
    fn full_left_weight_matches_its_diagonal_form() {
        let w = noise(5, 7, 4);
        let c = Mat::<f64>::identity(7, 7);
        let s = vec![1.0, 2.0, 0.5, 3.0, 1.5];
        let l = Mat::from_fn(5, 5, |i, j| if i == j { s[i] } else { 0.0 });
        let inverse = Mat::from_fn(5, 5, |i, j| if i == j { 1.0 / s[i] } else { 0.0 });
        let a = decompose_weighted(
            w.as_ref(),
            c.as_ref(),
            &LeftWeight::Diagonal(s),
            Spec::Rank(2),
        )
        .unwrap();
        let b = decompose_weighted(
            w.as_ref(),
            c.as_ref(),
            &LeftWeight::Full { l, inverse },
            Spec::Rank(2),
        )
        .unwrap();
        assert!(max_abs_diff(a.reconstruction.as_ref(), b.reconstruction.as_ref()) < 1e-12);
    }
}
