//! The element-wise and row-wise math of the Llama forward pass, pure and on `f32`: RMSNorm, SiLU
//! and the SwiGLU product, a masked softmax, and the negative log-likelihood of one logit row
//! (accumulated in `f64`).
//!
//! Activations are `[tokens, features]` faer matrices (column-major, so one feature of all tokens is
//! contiguous); row-wise reductions therefore walk the columns and keep one accumulator per row.

use crate::forward::buffers::Buffers;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Mat, MatMut, MatRef};
use rayon::prelude::*;

/// RMSNorm of every row of `x` (transformers' `LlamaRMSNorm`): `w * x / sqrt(mean(x^2) + eps)`.
/// The mean of squares is accumulated in `f64`.
pub fn rms_norm(x: MatRef<'_, f32>, weight: &[f32], eps: f64) -> Mat<f32> {
    rms_norm_in(x, weight, eps, &mut Buffers::default())
}

/// [`rms_norm`] into a buffer taken from `buffers`.
pub fn rms_norm_in(
    x: MatRef<'_, f32>,
    weight: &[f32],
    eps: f64,
    buffers: &mut Buffers,
) -> Mat<f32> {
    let (rows, cols) = (x.nrows(), x.ncols());
    let mut sum_sq = vec![0f64; rows];
    for j in 0..cols {
        let col = x.col(j);
        for (i, acc) in sum_sq.iter_mut().enumerate() {
            let v = col[i] as f64;
            *acc += v * v;
        }
    }
    let inv: Vec<f32> = sum_sq
        .iter()
        .map(|&s| (1.0 / (s / cols.max(1) as f64 + eps).sqrt()) as f32)
        .collect();
    let mut out = buffers.take(rows, cols);
    let weight = &weight[..cols];
    par_columns(out.as_mut(), |j, o| {
        let (col, w) = (x.col(j), weight[j]);
        for (i, (o, &inv)) in o.iter_mut().zip(&inv).enumerate() {
            *o = w * (col[i] * inv);
        }
    });
    out
}

/// Runs `f(j, column j)` on every column of `m`, columns in parallel (rayon): the element-wise
/// passes over `[tokens, width]` activations, each column one feature of every token.
pub fn par_columns(m: MatMut<'_, f32>, f: impl Fn(usize, &mut [f32]) + Sync) {
    m.par_col_iter_mut().enumerate().for_each(|(j, mut col)| {
        match col.rb_mut().try_as_col_major_mut() {
            Some(c) => f(j, c.as_slice_mut()),
            None => {
                // A strided view (not made by the pass itself): through a contiguous copy.
                let mut values: Vec<f32> = col.rb().iter().copied().collect();
                f(j, &mut values);
                col.iter_mut().zip(values).for_each(|(d, v)| *d = v);
            }
        }
    });
}

/// RMSNorm of every head of every row in place (Qwen3's `q_norm`/`k_norm`): `x` is
/// `[tokens, heads * head_dim]` with `head_dim = weight.len()`, each head normalised on its own.
pub fn head_rms_norm_in_place(x: &mut Mat<f32>, weight: &[f32], eps: f64) {
    let d = weight.len();
    if d == 0 {
        return;
    }
    for h in 0..x.ncols() / d {
        let normed = rms_norm(x.as_ref().subcols(h * d, d), weight, eps);
        x.as_mut().subcols_mut(h * d, d).copy_from(normed.as_ref());
    }
}

/// `x * sigmoid(x)` (with [`exp_f32`]).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// transformers' `gelu_pytorch_tanh`: `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// The activation of a gated MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (Llama, Qwen: SwiGLU).
    Silu,
    /// GeLU with the tanh approximation (Gemma: GeGLU).
    GeluTanh,
}

/// A gated MLP's product in place: `gate <- act(gate) * up`, element by element (same shapes),
/// columns in parallel.
pub fn gated_in_place(gate: &mut Mat<f32>, up: &Mat<f32>, act: Activation) {
    par_columns(gate.as_mut(), |j, gate| {
        dispatch(Gated {
            gate,
            up: up.col_as_slice(j),
            act,
        })
    });
}

/// `gate <- act(gate) * up` on one column.
struct Gated<'a> {
    gate: &'a mut [f32],
    up: &'a [f32],
    act: Activation,
}

impl Kernel for Gated<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let pairs = self.gate.iter_mut().zip(self.up);
        match self.act {
            Activation::Silu => pairs.for_each(|(g, &u)| *g = silu(*g) * u),
            Activation::GeluTanh => pairs.for_each(|(g, &u)| *g = gelu_tanh(*g) * u),
        }
    }
}

/// Soft-capping in place (Gemma 2's final logits): `x <- c * tanh(x / c)`.
pub fn softcap_in_place(x: &mut [f32], c: f32) {
    x.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
}

/// `h <- h + delta` (same shapes): a residual connection, columns in parallel.
pub fn add_in_place(h: MatMut<'_, f32>, delta: MatRef<'_, f32>) {
    par_columns(h, |j, c| {
        let d = delta.col(j);
        for (i, v) in c.iter_mut().enumerate() {
            *v += d[i];
        }
    });
}

/// `e^x` in `f32` without a libm call, so loops over it vectorise: Cody-Waite reduction
/// `x = n ln 2 + r` (`|r| <= ln 2 / 2`), a degree-7 Taylor polynomial for `e^r` (truncation below
/// 6e-9), and `2^n` built in the exponent bits. Relative error within a few ulp (about 3e-7) for
/// `x` in `[-87, 88]`; 0 below -87 (where `e^x` is under 1.7e-38), saturating above 88.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n, read from t's low mantissa bits (exact: |n| < 2^22), without a float-to-int
    // conversion (which would not vectorise).
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Independent accumulators of the row reductions below: sums and maxima are taken lane by lane
/// over `LANES` interleaved strands, then the lanes are combined in order, so the loops vectorise
/// (AVX-512 holds 16 `f32`) and the result does not depend on the instruction set.
const LANES: usize = 16;

/// A row kernel compiled once per instruction set: pulp's runtime dispatch runs [`Kernel::run`]
/// inlined into a function built for the widest one this CPU has (AVX2 or AVX-512), so the
/// element-wise loops (all `#[inline(always)]`) vectorise.
pub trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The kernel's work.
    fn run(self) -> Self::Output;
}

/// Carries a [`Kernel`] through [`pulp::WithSimd`].
struct Dispatched<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatched<K> {
    type Output = K::Output;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> K::Output {
        self.0.run()
    }
}

/// Runs `kernel` for the widest instruction set this CPU has.
pub fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Dispatched(kernel))
}

/// The largest value of `v` (`-inf` if empty), lane by lane.
#[inline(always)]
fn max_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    for (m, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = if x > *m { x } else { *m };
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// `v <- e^(v - shift)` in place; returns the sum of the new values, accumulated in `f64` lane by
/// lane.
#[inline(always)]
fn exp_shifted_in_place(v: &mut [f32], shift: f32) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (acc, x) in lanes.iter_mut().zip(c.iter_mut()) {
            *x = exp_f32(*x - shift);
            *acc += *x as f64;
        }
    }
    for (acc, x) in lanes.iter_mut().zip(chunks.into_remainder()) {
        *x = exp_f32(*x - shift);
        *acc += *x as f64;
    }
    lanes.iter().sum()
}

/// The sum of `e^(v - shift)` over `v`, in `f64` lane by lane (as [`exp_shifted_in_place`], without
/// writing).
#[inline(always)]
fn sum_exp_shifted(v: &[f32], shift: f32) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (acc, &x) in lanes.iter_mut().zip(c) {
            *acc += exp_f32(x - shift) as f64;
        }
    }
    for (acc, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *acc += exp_f32(x - shift) as f64;
    }
    lanes.iter().sum()
}

/// Softmax of `scores[keep]` in place, every entry outside `keep` set to 0 (the attention mask).
/// The maximum is subtracted first; the normaliser is summed in `f64`.
pub fn masked_softmax_in_place(scores: &mut [f32], keep: std::ops::Range<usize>) {
    let end = keep.end.min(scores.len());
    let keep = keep.start.min(end)..end;
    dispatch(Softmax(&mut scores[keep.clone()]));
    scores[..keep.start].fill(0.0);
    scores[keep.end..].fill(0.0);
}

/// Softmax of a whole slice in place.
struct Softmax<'a>(&'a mut [f32]);

impl Kernel for Softmax<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let max = max_of(self.0);
        let inv = (1.0 / exp_shifted_in_place(self.0, max)) as f32;
        self.0.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `-log softmax(logits)[target]`, in `f64`: `log(sum exp(l - max)) + max - l[target]`.
/// The exponentials are [`exp_f32`] of `l - max` (at most 1), summed in `f64`.
pub fn nll(logits: &[f32], target: usize) -> f64 {
    let (max, sum) = dispatch(LogSumExp(logits));
    sum.ln() + max as f64 - logits[target] as f64
}

/// The maximum of a slice and the sum of `e^(v - max)` over it.
struct LogSumExp<'a>(&'a [f32]);

impl Kernel for LogSumExp<'_> {
    type Output = (f32, f64);
    #[inline(always)]
    fn run(self) -> (f32, f64) {
        let max = max_of(self.0);
        (max, sum_exp_shifted(self.0, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_pytorch() {
        // torch.nn.functional.gelu(x, approximate="tanh") at -1, 0, 1, 3 (float32).
        for (x, want) in [
            (-1.0f32, -0.158_808),
            (0.0, 0.0),
            (1.0, 0.841_192),
            (3.0, 2.996_362_7),
        ] {
            assert!((gelu_tanh(x) - want).abs() < 1e-6, "{x}: {}", gelu_tanh(x));
        }
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!((exp_f32(1.0) as f64 - std::f64::consts::E).abs() < 3e-7);
    }

    #[test]
    fn rms_norm_golden() {
        // [1, 2, 3, 4]: mean of squares 7.5, 1/sqrt(7.5) = 0.3651483716701107.
        let x = Mat::<f32>::from_fn(2, 4, |i, j| if i == 0 { (j + 1) as f32 } else { 0.0 });
        let y = rms_norm(x.as_ref(), &[1.0, 1.0, 1.0, 2.0], 0.0);
        let want = [
            0.3651483716701107,
            0.7302967433402214,
            1.0954451150103321,
            2.0 * 1.4605934866804429,
        ];
        for (j, w) in want.iter().enumerate() {
            assert!((y[(0, j)] as f64 - w).abs() < 1e-6, "{j}");
        }
        // eps keeps a zero row finite (and zero).
        let y = rms_norm(x.as_ref(), &[1.0; 4], 1e-5);
        assert_eq!(y[(1, 2)], 0.0);
        assert!((y[(0, 0)] as f64 - 1.0 / (7.5f64 + 1e-5).sqrt()).abs() < 1e-7);
    }

    #[test]
    fn silu_golden() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) as f64 - 0.7310585786300049).abs() < 1e-7);
        assert!((silu(-2.0) as f64 - -0.2384058440442351).abs() < 1e-7);
        assert_eq!(silu(100.0), 100.0);
        assert!(silu(-100.0).abs() < 1e-30);
        let mut g = Mat::<f32>::from_fn(1, 2, |_, j| j as f32);
        let u = Mat::<f32>::from_fn(1, 2, |_, _| 3.0);
        gated_in_place(&mut g, &u, Activation::Silu);
        assert_eq!(g[(0, 0)], 0.0);
        assert!((g[(0, 1)] - 3.0 * 0.7310586).abs() < 1e-6);
    }

    #[test]
    fn masked_softmax_rows_sum_to_one() {
        let mut s = vec![1.0f32, 2.0, 3.0, 100.0, -4.0];
        masked_softmax_in_place(&mut s, 0..3);
        let total: f32 = s.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(&s[3..], &[0.0, 0.0]);
        // softmax([1, 2, 3]) = e^(x-3) / (e^-2 + e^-1 + 1)
        let z = (-2f64).exp() + (-1f64).exp() + 1.0;
        assert!((s[2] as f64 - 1.0 / z).abs() < 1e-6);
        assert!((s[0] as f64 - (-2f64).exp() / z).abs() < 1e-6);
        let mut s = vec![5.0f32, 7.0, 9.0];
        masked_softmax_in_place(&mut s, 1..2);
        assert_eq!(s, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn nll_golden() {
        // logits log 1, log 2, log 3: p = [1/6, 2/6, 3/6].
        let l = [0.0f32, 2f32.ln(), 3f32.ln()];
        assert!((nll(&l, 2) - 2f64.ln()).abs() < 1e-7);
        assert!((nll(&l, 0) - 6f64.ln()).abs() < 1e-7);
        // Shift invariance with large logits (no overflow).
        let l = [1000.0f32, 1000.0 + 2f32.ln(), 1000.0 + 3f32.ln()];
        assert!((nll(&l, 1) - 3f64.ln()).abs() < 1e-4);
    }

    #[test]
    fn residual_add() {
        let mut h = Mat::<f32>::from_fn(2, 2, |i, j| (i + 2 * j) as f32);
        let d = Mat::<f32>::from_fn(2, 2, |_, _| 0.5);
        add_in_place(h.as_mut(), d.as_ref());
        assert_eq!(h[(1, 1)], 3.5);
    }
}
