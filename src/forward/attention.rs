//! Causal grouped-query attention, as transformers' Llama computes it: per head
//! `softmax(q k^T / sqrt(head_dim) + causal mask) v`, query head `h` reading key/value head
//! `h / (num_heads / num_kv_heads)`. Token rows are split into independent windows (positions
//! restart at 0 in each; no token sees another window); heads and windows run in parallel (rayon),
//! each product single-threaded.

use crate::forward::buffers::Buffers;
use crate::forward::ops::masked_softmax_in_place;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;
use std::ops::Range;

/// The head layout of a layer's attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Mistral's sliding window: a query attends to at most this many keys (itself included).
    pub sliding_window: Option<usize>,
    /// The scale of the scores (Gemma's `query_pre_attn_scalar^-1/2`); `None`: `head_dim^-1/2`.
    pub scale: Option<f32>,
    /// Gemma 2's soft-capping of the scores, `c * tanh(s / c)` before the mask.
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// The scale of the scores.
    fn score_scale(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim.max(1) as f32).sqrt())
    }
}

/// The row ranges of consecutive windows of `ctx` rows covering `0..rows` (the last may be
/// shorter); `ctx == 0` means one window of all rows.
pub fn windows(rows: usize, ctx: usize) -> impl Iterator<Item = Range<usize>> {
    let step = if ctx == 0 { rows.max(1) } else { ctx };
    (0..rows)
        .step_by(step)
        .map(move |start| start..(start + step).min(rows))
}

/// Query rows per block of scores: a block's queries see the keys up to its last row only, so
/// most of the masked upper triangle is never computed (about 56% of the full products remain at
/// 512 tokens).
const QUERY_BLOCK: usize = 64;

/// One head over one window: `q`, `k`, `v` are `[len, head_dim]` (already rotated), row `i` at
/// position `i`; the scores scaled, soft-capped and windowed as `shape` says. Returns
/// `[len, head_dim]`.
pub fn head_attention(
    q: MatRef<'_, f32>,
    k: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    shape: &AttentionShape,
) -> Mat<f32> {
    let len = q.nrows();
    let scale = shape.score_scale();
    let first_key = |i: usize| {
        shape
            .sliding_window
            .map_or(0, |w| (i + 1).saturating_sub(w))
    };
    let mut out = Mat::<f32>::zeros(len, v.ncols());
    for start in (0..len).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(len - start);
        // Keys from the block's first query's window start to its last query.
        let keys = first_key(start)..start + rows;
        // Column c holds query start + c's scores against the keys, so its softmax is over a
        // contiguous slice.
        let mut scores = Mat::<f32>::zeros(keys.len(), rows);
        matmul(
            scores.as_mut(),
            Accum::Replace,
            k.subrows(keys.start, keys.len()),
            q.subrows(start, rows).transpose(),
            scale,
            Par::Seq,
        );
        for c in 0..rows {
            let col = scores.col_as_slice_mut(c);
            if let Some(cap) = shape.softcap {
                col.iter_mut().for_each(|s| *s = (*s / cap).tanh() * cap);
            }
            let i = start + c;
            masked_softmax_in_place(col, first_key(i) - keys.start..i + 1 - keys.start);
        }
        matmul(
            out.as_mut().subrows_mut(start, rows),
            Accum::Replace,
            scores.transpose(),
            v.subrows(keys.start, keys.len()),
            1.0,
            Par::Seq,
        );
    }
    out
}

/// Attention of every head in every window of `ctx` rows: `q` is `[T, num_heads * head_dim]`, `k`
/// and `v` are `[T, num_kv_heads * head_dim]`, all rotated with positions restarting per window.
/// Returns `[T, num_heads * head_dim]`, heads side by side (the input of `o_proj`), in a buffer of
/// `buffers`.
pub fn attend(
    q: MatRef<'_, f32>,
    k: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    shape: &AttentionShape,
    ctx: usize,
    buffers: &mut Buffers,
) -> Mat<f32> {
    let hd = shape.head_dim;
    let group = (shape.num_heads / shape.num_kv_heads.max(1)).max(1);
    let tasks: Vec<(Range<usize>, usize)> = windows(q.nrows(), ctx)
        .flat_map(|w| (0..shape.num_heads).map(move |h| (w.clone(), h)))
        .collect();
    let results: Vec<Mat<f32>> = tasks
        .par_iter()
        .map(|(w, h)| {
            let kv = h / group;
            head_attention(
                q.submatrix(w.start, h * hd, w.len(), hd),
                k.submatrix(w.start, kv * hd, w.len(), hd),
                v.submatrix(w.start, kv * hd, w.len(), hd),
                shape,
            )
        })
        .collect();
    // Every (window, head) block is written below.
    let mut out = buffers.take(q.nrows(), shape.num_heads * hd);
    for ((w, h), r) in tasks.iter().zip(&results) {
        out.as_mut()
            .submatrix_mut(w.start, h * hd, w.len(), hd)
            .copy_from(r.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, seed: usize) -> Mat<f32> {
        Mat::from_fn(rows, cols, |i, j| {
            (((i * 31 + j * 17 + seed * 7) % 23) as f32 - 11.0) / 10.0
        })
    }

    /// Straightforward attention of one query row against keys `lo..=i`, in f64.
    fn naive(q: MatRef<f32>, k: MatRef<f32>, v: MatRef<f32>, i: usize, lo: usize) -> Vec<f64> {
        let d = q.ncols();
        let scores: Vec<f64> = (lo..=i)
            .map(|j| {
                (0..d)
                    .map(|c| q[(i, c)] as f64 * k[(j, c)] as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..v.ncols())
            .map(|c| {
                (lo..=i)
                    .zip(&e)
                    .map(|(j, w)| w / z * v[(j, c)] as f64)
                    .sum()
            })
            .collect()
    }

    /// One head of `head_dim` with an optional sliding window, Llama's scale, no soft-capping.
    fn one_head(head_dim: usize, sliding_window: Option<usize>) -> AttentionShape {
        AttentionShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim,
            sliding_window,
            scale: None,
            softcap: None,
        }
    }

    #[test]
    fn scale_and_softcap_change_the_scores_as_gemma_does() {
        let (q, k, v) = (mat(5, 4, 7), mat(5, 4, 8), mat(5, 3, 9));
        // Scaling q by 2 is the same as a scale of 2 / sqrt(4) = 1.
        let doubled = Mat::from_fn(5, 4, |i, j| 2.0 * q[(i, j)]);
        let a = head_attention(doubled.as_ref(), k.as_ref(), v.as_ref(), &one_head(4, None));
        let scaled = AttentionShape {
            scale: Some(1.0),
            ..one_head(4, None)
        };
        let b = head_attention(q.as_ref(), k.as_ref(), v.as_ref(), &scaled);
        assert!((0..5).all(|i| (0..3).all(|c| (a[(i, c)] - b[(i, c)]).abs() < 1e-6)));
        // A soft cap far above the scores changes nothing visible; a small one flattens them.
        let capped = |c| AttentionShape {
            softcap: Some(c),
            ..one_head(4, None)
        };
        let plain = head_attention(q.as_ref(), k.as_ref(), v.as_ref(), &one_head(4, None));
        let loose = head_attention(q.as_ref(), k.as_ref(), v.as_ref(), &capped(1e4));
        let tight = head_attention(q.as_ref(), k.as_ref(), v.as_ref(), &capped(1e-3));
        assert!((plain[(4, 0)] - loose[(4, 0)]).abs() < 1e-5);
        let mean: f32 = (0..5).map(|j| v[(j, 0)]).sum::<f32>() / 5.0;
        assert!(
            (tight[(4, 0)] - mean).abs() < 1e-3,
            "scores capped to ~0: uniform weights"
        );
    }

    #[test]
    fn windows_cover_the_rows() {
        let w: Vec<_> = windows(10, 4).collect();
        assert_eq!(w, vec![0..4, 4..8, 8..10]);
        assert_eq!(windows(10, 0).collect::<Vec<_>>(), vec![0..10]);
        assert_eq!(windows(0, 3).count(), 0);
    }

    #[test]
    fn first_query_sees_only_itself_and_rows_match_naive() {
        let (q, k, v) = (mat(6, 4, 1), mat(6, 4, 2), mat(6, 3, 3));
        let out = head_attention(q.as_ref(), k.as_ref(), v.as_ref(), &one_head(4, None));
        for c in 0..3 {
            assert!((out[(0, c)] - v[(0, c)]).abs() < 1e-6);
        }
        for i in 0..6 {
            let want = naive(q.as_ref(), k.as_ref(), v.as_ref(), i, 0);
            for (c, w) in want.iter().enumerate() {
                assert!((out[(i, c)] as f64 - w).abs() < 1e-5, "row {i} col {c}");
            }
        }
        // A sliding window of 2: each query sees itself and the one before.
        let out = head_attention(q.as_ref(), k.as_ref(), v.as_ref(), &one_head(4, Some(2)));
        let want = naive(q.as_ref(), k.as_ref(), v.as_ref(), 5, 4);
        for (c, w) in want.iter().enumerate() {
            assert!((out[(5, c)] as f64 - w).abs() < 1e-5);
        }
    }

    #[test]
    fn grouped_heads_and_independent_windows() {
        // 4 query heads on 2 kv heads of dim 2; 7 rows in windows of 3 (3, 3, 1).
        let shape = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 2,
            sliding_window: None,
            scale: None,
            softcap: None,
        };
        let (q, k, v) = (mat(7, 8, 4), mat(7, 4, 5), mat(7, 4, 6));
        let out = attend(
            q.as_ref(),
            k.as_ref(),
            v.as_ref(),
            &shape,
            3,
            &mut Buffers::default(),
        );
        for h in 0..4 {
            let kv = h / 2;
            for w in windows(7, 3) {
                let (start, len) = (w.start, w.len());
                let want = head_attention(
                    q.as_ref().submatrix(start, h * 2, len, 2),
                    k.as_ref().submatrix(start, kv * 2, len, 2),
                    v.as_ref().submatrix(start, kv * 2, len, 2),
                    &shape,
                );
                for i in 0..w.len() {
                    for c in 0..2 {
                        assert_eq!(out[(w.start + i, h * 2 + c)], want[(i, c)]);
                    }
                }
            }
        }
        // The single-row last window attends to itself only.
        assert_eq!(out[(6, 5)], v[(6, 3)]);
    }
}
