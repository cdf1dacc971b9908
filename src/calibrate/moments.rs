//! The moments calibration accumulates, in `f64`: `X^T X` of a layer's attention input (a
//! symmetric rank-k update), `A^T B` of two activations (a shared latent's cross moments, the
//! `o_proj` refit's), and what a family's score function needs beyond them ([`attention_stats`]).
//! Every sum runs over fixed column blocks, each summed single-threaded in row order, so the
//! moments do not depend on the thread count.

use crate::error::Result;
use crate::execute::AttentionStats;
use crate::scratch::Scratch;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// `sum_h Q_h^T Q_h / n` over the query heads, each added to its KV head's diagonal block:
/// `[kv_heads * head_dim]` square.
fn query_moment(
    q: MatRef<'_, f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    n: f64,
) -> Mat<f64> {
    let group = (heads / kv_heads.max(1)).max(1);
    let mut m = Mat::<f64>::zeros(kv_heads * head_dim, kv_heads * head_dim);
    for h in 0..heads {
        let j = h / group;
        let mut block = Mat::<f64>::zeros(head_dim, head_dim);
        accumulate(&mut block, q.subcols(h * head_dim, head_dim));
        for a in 0..head_dim {
            for b in 0..head_dim {
                m[(j * head_dim + a, j * head_dim + b)] += block[(a, b)] / n;
            }
        }
    }
    m
}

/// One layer's [`AttentionStats`] on its attention input `x` (`sink`: a BOS leads the windows).
pub(crate) fn attention_stats(
    layer: &crate::forward::Layer,
    x: MatRef<'_, f32>,
    sink: bool,
    scratch: &Scratch,
) -> Result<AttentionStats> {
    let widen = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let s = &layer.shape;
    let queries = match &layer.qk_norm {
        Some(_) => {
            let q = layer.normed_queries(x);
            let m = query_moment(
                q.as_ref(),
                s.num_heads,
                s.num_kv_heads,
                s.head_dim,
                x.nrows() as f64,
            );
            Some(scratch.matrix(&m)?)
        }
        None => None,
    };
    Ok(AttentionStats {
        queries,
        key_gain: layer.qk_norm.as_ref().map(|(_, k)| widen(k)),
        output_gain: layer.output_norms.as_ref().map(|n| widen(&n.attention)),
        sink: (sink && x.nrows() > 0)
            .then(|| (0..x.ncols()).map(|j| f64::from(x[(0, j)])).collect()),
    })
}

/// Columns of a moment computed by one task of [`accumulate`] and [`accumulate_cross`].
const BLOCK_COLUMNS: usize = 32;

/// `x` widened to `f64`.
fn widen(x: MatRef<'_, f32>) -> Mat<f64> {
    Mat::<f64>::from_fn(x.nrows(), x.ncols(), |i, j| f64::from(x[(i, j)]))
}

/// `a^T b` by fixed blocks of `BLOCK_COLUMNS` columns of `b` (`cols` columns; `b(start, n)` gives
/// columns `start..start + n` in `f64`, so `b` is never widened whole), computed in parallel, each
/// summed single-threaded, so the sums do not depend on the thread count. With `lower`, `b` is `a`
/// and only each block's rows from its first column down are computed (the product is symmetric):
/// half the work. Returns each block's first column and its rows from `row0` (0, or with `lower`
/// the block's first column).
fn column_blocks(
    a: MatRef<'_, f64>,
    cols: usize,
    b: impl Fn(usize, usize) -> Mat<f64> + Sync,
    lower: bool,
) -> Vec<(usize, Mat<f64>)> {
    use rayon::prelude::*;
    (0..cols)
        .step_by(BLOCK_COLUMNS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let n = BLOCK_COLUMNS.min(cols - start);
            let row0 = if lower { start } else { 0 };
            let left = a.subcols(row0, a.ncols() - row0);
            let mut out = Mat::<f64>::zeros(left.ncols(), n);
            matmul(
                out.as_mut(),
                Accum::Replace,
                left.transpose(),
                b(start, n).as_ref(),
                1.0,
                Par::Seq,
            );
            (start, out)
        })
        .collect()
}

/// `acc +=` the lower-triangle blocks of a symmetric product (each block's first column and its
/// rows from that column down), mirrored: the result is exactly symmetric.
fn add_lower(acc: &mut Mat<f64>, blocks: Vec<(usize, Mat<f64>)>) {
    for (start, block) in blocks {
        for j in 0..block.ncols() {
            for i in j..block.nrows() {
                let (row, col) = (start + i, start + j);
                let v = block[(i, j)];
                acc[(row, col)] += v;
                if row != col {
                    acc[(col, row)] += v;
                }
            }
        }
    }
}

/// `acc +=` column blocks of a product (each block's first column and all its rows).
fn add_blocks(acc: &mut Mat<f64>, blocks: Vec<(usize, Mat<f64>)>) {
    for (start, block) in blocks {
        for j in 0..block.ncols() {
            for i in 0..block.nrows() {
                acc[(i, start + j)] += block[(i, j)];
            }
        }
    }
}

/// `acc += x^T x` in `f64` (`x` `[rows, hidden]`): a symmetric rank-k update, the lower triangle
/// computed (in parallel over fixed column blocks, see [`column_blocks`]) and mirrored, so the
/// result is exactly symmetric and does not depend on the thread count.
pub fn accumulate(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
    let x64 = widen(x);
    let columns = |start: usize, n: usize| x64.subcols(start, n).to_owned();
    add_lower(acc, column_blocks(x64.as_ref(), x64.ncols(), columns, true));
}

/// Whether two activations are the same, bit for bit.
pub fn identical(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> bool {
    a.nrows() == b.nrows()
        && a.ncols() == b.ncols()
        && (0..a.ncols())
            .all(|j| (0..a.nrows()).all(|i| a[(i, j)].to_bits() == b[(i, j)].to_bits()))
}

/// `acc += a^T b` in `f64` (`a`, `b` `[rows, hidden]`), in parallel over fixed blocks of
/// columns, each summed single-threaded in row order: the sums do not depend on the thread count.
pub fn accumulate_cross(acc: &mut Mat<f64>, a: MatRef<'_, f32>, b: MatRef<'_, f32>) {
    let a64 = widen(a);
    let columns = |start: usize, n: usize| widen(b.subcols(start, n));
    add_blocks(acc, column_blocks(a64.as_ref(), b.ncols(), columns, false));
}

/// Rows of one `f32` product of [`products_f32`]: each such partial sum is exact to `f32`'s
/// precision (about `1e-6` relative), and the partial sums are added in `f64`.
const CHUNK_ROWS: usize = 512;

/// Columns of a moment computed by one task of [`products_f32`].
const CHUNK_COLUMNS: usize = 256;

/// `a^T b` (`[a.ncols(), b.ncols()]`) as `f32` products of [`CHUNK_ROWS`] rows each, summed in
/// `f64` in row order; with `lower`, `b` is `a` and each block's rows above its first column are
/// left zero (the product is symmetric). In parallel over fixed blocks of [`CHUNK_COLUMNS`]
/// columns, each single-threaded: the sums do not depend on the thread count. Returns each
/// block's first column and its rows from `row0` (0, or with `lower` the block's first column).
fn products_f32(a: MatRef<'_, f32>, b: MatRef<'_, f32>, lower: bool) -> Vec<(usize, Mat<f64>)> {
    use rayon::prelude::*;
    (0..b.ncols())
        .step_by(CHUNK_COLUMNS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let n = CHUNK_COLUMNS.min(b.ncols() - start);
            let row0 = if lower { start } else { 0 };
            let left = a.subcols(row0, a.ncols() - row0);
            let mut sum = Mat::<f64>::zeros(left.ncols(), n);
            let mut part = Mat::<f32>::zeros(left.ncols(), n);
            for r in (0..a.nrows()).step_by(CHUNK_ROWS) {
                let rows = CHUNK_ROWS.min(a.nrows() - r);
                matmul(
                    part.as_mut(),
                    Accum::Replace,
                    left.subrows(r, rows).transpose(),
                    b.subrows(r, rows).subcols(start, n),
                    1.0,
                    Par::Seq,
                );
                for j in 0..n {
                    let (sum, part) = (sum.col_as_slice_mut(j), part.col_as_slice(j));
                    sum.iter_mut()
                        .zip(part)
                        .for_each(|(s, &p)| *s += f64::from(p));
                }
            }
            (start, sum)
        })
        .collect()
}

/// `acc += x^T x` as [`accumulate`] does, but from `f32` products of [`CHUNK_ROWS`] rows summed
/// in `f64` ([`products_f32`]): about four times faster, each entry within about `1e-6` of its
/// `f64` sum relative to the column norms: the `o_proj` refit's moments and the one-shot pass's
/// input moments (on both real models, perplexity moved by at most 4e-7 relative).
pub fn accumulate_f32(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
    add_lower(acc, products_f32(x, x, true));
}

/// `acc += a^T b` as [`accumulate_cross`] does, from `f32` products ([`accumulate_f32`]).
pub fn accumulate_cross_f32(acc: &mut Mat<f64>, a: MatRef<'_, f32>, b: MatRef<'_, f32>) {
    add_blocks(acc, products_f32(a, b, false));
}

/// Divides every entry of `m` by `n`.
pub(crate) fn scale(m: &mut Mat<f64>, n: f64) {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            m[(i, j)] /= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_equals_the_direct_sum() {
        let x = Mat::<f32>::from_fn(7, 3, |i, j| (i as f32 - 2.5) * (j as f32 + 0.5));
        let mut acc = Mat::<f64>::zeros(3, 3);
        // Two chunks accumulate to the same as one pass over all rows.
        accumulate(&mut acc, x.subrows(0, 4));
        accumulate(&mut acc, x.subrows(4, 3));
        for a in 0..3 {
            for b in 0..3 {
                let direct: f64 = (0..7)
                    .map(|i| f64::from(x[(i, a)]) * f64::from(x[(i, b)]))
                    .sum();
                assert!((acc[(a, b)] - direct).abs() < 1e-9, "({a}, {b})");
            }
        }
    }

    #[test]
    fn f32_products_equal_the_f64_sums_and_are_symmetric() {
        // More rows than one chunk and more columns than one block, with ragged ends.
        let (rows, cols) = (CHUNK_ROWS * 2 + 37, CHUNK_COLUMNS + 45);
        let a = Mat::<f32>::from_fn(rows, cols, |i, j| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let b = Mat::<f32>::from_fn(rows, cols, |i, j| ((i * 5 + j * 2) % 13) as f32 * 0.25);
        let mut exact = Mat::<f64>::zeros(cols, cols);
        let mut fast = Mat::<f64>::zeros(cols, cols);
        accumulate_cross(&mut exact, a.as_ref(), b.as_ref());
        accumulate_cross_f32(&mut fast, a.as_ref(), b.as_ref());
        let (mut sym_exact, mut sym_fast) = (exact.clone() * 0.0, exact.clone() * 0.0);
        accumulate(&mut sym_exact, a.as_ref());
        accumulate_f32(&mut sym_fast, a.as_ref());
        for p in 0..cols {
            for q in 0..cols {
                let scale = rows as f64;
                assert!(
                    (fast[(p, q)] - exact[(p, q)]).abs() < 1e-5 * scale,
                    "({p}, {q})"
                );
                assert!((sym_fast[(p, q)] - sym_exact[(p, q)]).abs() < 1e-5 * scale);
                assert_eq!(sym_fast[(p, q)].to_bits(), sym_fast[(q, p)].to_bits());
            }
        }
        // Nonzero everywhere the exact sum is: every block and chunk was added.
        assert!((0..cols).all(|q| exact[(cols - 1, q)] == 0.0 || fast[(cols - 1, q)] != 0.0));
    }

    #[test]
    fn cross_accumulation_equals_the_direct_sum() {
        let a = Mat::<f32>::from_fn(9, 40, |i, j| ((i * 7 + j * 3) % 11) as f32 - 5.0);
        let b = Mat::<f32>::from_fn(9, 40, |i, j| ((i * 5 + j * 2) % 13) as f32 * 0.25);
        let mut acc = Mat::<f64>::zeros(40, 40);
        accumulate_cross(&mut acc, a.as_ref(), b.as_ref());
        for p in 0..40 {
            for q in 0..40 {
                let direct: f64 = (0..9)
                    .map(|i| f64::from(a[(i, p)]) * f64::from(b[(i, q)]))
                    .sum();
                assert!((acc[(p, q)] - direct).abs() < 1e-9, "({p}, {q})");
            }
        }
    }
}
