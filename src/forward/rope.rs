//! Rotary position embeddings as transformers' Llama applies them: inverse frequencies from
//! `rope_theta` and the `rope_scaling` type (default, linear, dynamic NTK, llama3, Phi-3's
//! longrope), cos/sin tables for positions `0..len`, and the rotation of the two halves of each
//! head's rotated part (`rotate_half`).
//!
//! Frequencies and angles are computed in `f64` and rounded once to `f32` (transformers computes
//! them in `f32`; the difference is far below the model's own rounding).

use faer::MatMut;
use std::sync::Arc;

/// How the inverse frequencies are scaled (`rope_scaling.rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `null` or `"default"`: plain RoPE.
    None,
    /// `"linear"`: every inverse frequency divided by `factor` (positions interpolated).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// `"dynamic"` (NTK-aware): for a sequence longer than `max_position_embeddings`, the base is
    /// raised to `theta * (factor * len / max - (factor - 1))^(d / (d - 2))`.
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// `max_position_embeddings`.
        max_position_embeddings: usize,
    },
    /// `"llama3"` (Llama 3.1): low frequencies divided by `factor`, high ones kept, the band in
    /// between interpolated smoothly.
    Llama3 {
        /// The scaling factor for low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
    },
    /// `"longrope"` (Phi-3-128k, Phi-3.5, Phi-4-mini): frequency `i` divided by `short_factor[i]`,
    /// or by `long_factor[i]` for a sequence longer than `original_max_position_embeddings`
    /// (transformers' `longrope_frequency_update` picks by the longest position), and cos/sin
    /// multiplied by `attention_factor`.
    LongRope {
        /// `short_factor`, one per frequency.
        short_factor: Arc<[f64]>,
        /// `long_factor`, one per frequency.
        long_factor: Arc<[f64]>,
        /// Sequences longer than this use `long_factor`.
        original_max_position_embeddings: usize,
        /// The scale of cos and sin.
        attention_factor: f64,
    },
}

/// The resolved RoPE of a model: base, rotated dimension and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `rope_theta`.
    pub theta: f64,
    /// The head dimension: the stride between heads.
    pub head_dim: usize,
    /// The rotated dimension (even, at most `head_dim`): the first `rotary_dim` values of each
    /// head are rotated, the rest pass through (`partial_rotary_factor`, Phi-3); else `head_dim`.
    pub rotary_dim: usize,
    /// The scaling rule.
    pub scaling: RopeScaling,
}

impl Rope {
    /// The `rotary_dim / 2` inverse frequencies used for a sequence of `seq_len` positions (only
    /// the dynamic scaling depends on it).
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f64> {
        let d = self.rotary_dim as f64;
        let theta = match &self.scaling {
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } if seq_len > *max_position_embeddings => {
                let ratio =
                    factor * seq_len as f64 / *max_position_embeddings as f64 - (factor - 1.0);
                self.theta * ratio.powf(d / (d - 2.0))
            }
            _ => self.theta,
        };
        let plain = (0..self.rotary_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / d));
        match &self.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                ..
            } => {
                let ext = match seq_len > *original_max_position_embeddings {
                    true => long_factor,
                    false => short_factor,
                };
                plain.zip(ext.iter()).map(|(f, e)| f / e).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low_freq_factor, high_freq_factor) =
                    (*factor, *low_freq_factor, *high_freq_factor);
                let old = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The cos/sin table for positions `0..len` of a sequence of `len` tokens.
    pub fn table(&self, len: usize) -> RopeTable {
        let inv_freq = self.inv_freq(len);
        let half = inv_freq.len();
        let scale = match self.scaling {
            RopeScaling::LongRope {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        };
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in 0..len {
            for &f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
        RopeTable {
            half,
            head_dim: self.head_dim,
            cos,
            sin,
        }
    }
}

/// cos and sin of `position * inv_freq[i]`, row-major by position (`half` values per row).
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    /// The stride between heads (at least `2 * half`).
    head_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Number of positions covered.
    pub fn len(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(0)
    }

    /// Rotates, in place, every head of `x` (rows: positions `0..x.nrows()`, at most
    /// [`Self::len`]; columns: heads of `head_dim` values side by side). Within a head, value `i`
    /// and value `i + half` (`i < half`) form a pair: `(a, b) -> (a cos - b sin, b cos + a sin)`,
    /// which is `x * cos + rotate_half(x) * sin` with transformers' duplicated
    /// `cat(freqs, freqs)` angles; values from `2 * half` on pass through (partial rotary).
    pub fn rotate(&self, mut x: MatMut<'_, f32>) {
        let half = self.half;
        let head_dim = self.head_dim;
        if half == 0 || head_dim < 2 * half {
            return;
        }
        let rows = x.nrows().min(self.len());
        for head in 0..x.ncols() / head_dim {
            for i in 0..half {
                let (c1, c2) = (head * head_dim + i, head * head_dim + i + half);
                for pos in 0..rows {
                    let (c, s) = (self.cos[pos * half + i], self.sin[pos * half + i]);
                    let a = x[(pos, c1)];
                    let b = x[(pos, c2)];
                    x[(pos, c1)] = a * c - b * s;
                    x[(pos, c2)] = b * c + a * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    fn rope(theta: f64, head_dim: usize, scaling: RopeScaling) -> Rope {
        Rope {
            theta,
            head_dim,
            rotary_dim: head_dim,
            scaling,
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-30)
    }

    #[test]
    fn default_inv_freq_is_theta_to_minus_2i_over_d() {
        // head_dim 8, theta 10^4: 10^4^(-2i/8) = 10^-i.
        let f = rope(1e4, 8, RopeScaling::None).inv_freq(10);
        let want = [1.0, 0.1, 0.01, 0.001];
        assert_eq!(f.len(), 4);
        for (got, want) in f.iter().zip(want) {
            assert!(close(*got, want, 1e-12), "{got} vs {want}");
        }
    }

    #[test]
    fn linear_divides_by_factor() {
        let f = rope(1e4, 8, RopeScaling::Linear { factor: 4.0 }).inv_freq(10);
        assert!(close(f[1], 0.025, 1e-12));
        assert!(close(f[3], 0.00025, 1e-12));
    }

    #[test]
    fn llama3_inv_freq_matches_hand_computed_values() {
        // head_dim 8, theta 1e4: plain frequencies 1, 0.1, 0.01, 0.001 with wavelengths 2*pi/f =
        // 6.28, 62.8, 628.3, 6283. factor 8, low 1, high 4, original context 1024: high-frequency
        // cutoff 1024/4 = 256, low-frequency cutoff 1024/1 = 1024. So 1 and 0.1 are kept, 0.001 is
        // divided by 8, and 0.01 is in the band: smooth = (1024 / 628.3185 - 1) / 3 = 0.2099155391,
        // value = (1 - smooth) * 0.01 / 8 + smooth * 0.01 = 0.003086760967.
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 1024,
        };
        let f = rope(1e4, 8, scaling).inv_freq(10);
        let want = [1.0, 0.1, 0.003086760967011274, 0.000125];
        for (got, want) in f.iter().zip(want) {
            assert!(close(*got, want, 1e-12), "{got} vs {want}");
        }
    }

    #[test]
    fn dynamic_only_changes_long_sequences() {
        let scaling = RopeScaling::Dynamic {
            factor: 2.0,
            max_position_embeddings: 16,
        };
        let r = rope(1e4, 8, scaling);
        assert_eq!(r.inv_freq(16), rope(1e4, 8, RopeScaling::None).inv_freq(16));
        // len 32: base 1e4 * (2 * 32/16 - 1)^(8/6) = 1e4 * 3^(4/3); frequency 1 = base^(-2/8).
        let base = 1e4 * 3f64.powf(4.0 / 3.0);
        let f = r.inv_freq(32);
        assert!(close(f[0], 1.0, 1e-12));
        assert!(close(f[1], base.powf(-0.25), 1e-12), "{}", f[1]);
    }

    #[test]
    fn rotation_of_a_known_vector() {
        // head_dim 4, theta 1e4: frequencies 1 and 0.01. Position 0 is the identity; at position 1
        // the pair (x0, x2) turns by 1 radian and (x1, x3) by 0.01 radian.
        let table = rope(1e4, 4, RopeScaling::None).table(2);
        assert_eq!(table.len(), 2);
        let mut x = Mat::<f32>::from_fn(2, 8, |_, j| [1.0, 2.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0][j]);
        table.rotate(x.as_mut());
        let row0 = [1.0, 2.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0];
        for (j, want) in row0.iter().enumerate() {
            assert_eq!(x[(0, j)], *want);
        }
        let (c1, s1) = (1f64.cos(), 1f64.sin());
        let (c2, s2) = (0.01f64.cos(), 0.01f64.sin());
        let row1 = [
            c1,
            2.0 * c2 - 0.5 * s2,
            s1,
            0.5 * c2 + 2.0 * s2,
            // second head: (0, 1) paired with (1, 0)
            -s1,
            c2,
            c1,
            s2,
        ];
        for (j, want) in row1.iter().enumerate() {
            assert!(
                (x[(1, j)] as f64 - want).abs() < 1e-6,
                "col {j}: {} vs {want}",
                x[(1, j)]
            );
        }
    }

    #[test]
    fn rotation_preserves_pair_norms() {
        let table = rope(500.0, 8, RopeScaling::None).table(40);
        let mut x = Mat::<f32>::from_fn(40, 16, |i, j| ((i * 7 + j * 3) % 11) as f32 - 5.0);
        let before = x.clone();
        table.rotate(x.as_mut());
        for pos in 0..40 {
            for head in 0..2 {
                for i in 0..4 {
                    let (a, b) = (head * 8 + i, head * 8 + i + 4);
                    let n0 = before[(pos, a)].hypot(before[(pos, b)]);
                    let n1 = x[(pos, a)].hypot(x[(pos, b)]);
                    assert!((n0 - n1).abs() < 1e-4, "pos {pos} head {head} pair {i}");
                }
            }
        }
    }

    #[test]
    fn partial_rotary_rotates_the_first_values_of_each_head_only() {
        // Two heads of 6 values, the first 4 rotated (partial_rotary_factor 2/3): frequencies from
        // the rotated dimension (theta^(-2i/4)), pairs (0, 2) and (1, 3) of each head.
        let partial = Rope {
            rotary_dim: 4,
            ..rope(100.0, 6, RopeScaling::None)
        };
        assert_eq!(partial.inv_freq(3), vec![1.0, 0.1]);
        let table = partial.table(3);
        let mut x = Mat::<f32>::from_fn(3, 12, |r, c| (r * 12 + c) as f32 + 1.0);
        let before = x.clone();
        table.rotate(x.as_mut());
        for pos in 0..3 {
            for head in 0..2 {
                let at = |c: usize| head * 6 + c;
                for (i, f) in [(0, 1.0f64), (1, 0.1)] {
                    let (c, s) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
                    let (a, b) = (before[(pos, at(i))] as f64, before[(pos, at(i + 2))] as f64);
                    assert!((x[(pos, at(i))] as f64 - (a * c - b * s)).abs() < 1e-4);
                    assert!((x[(pos, at(i + 2))] as f64 - (b * c + a * s)).abs() < 1e-4);
                }
                for c in 4..6 {
                    assert_eq!(x[(pos, at(c))], before[(pos, at(c))], "pass-through value");
                }
            }
        }
    }

    #[test]
    fn longrope_divides_by_short_or_long_factors_and_scales_cos_sin() {
        // rotary 4 of head 4, theta 100: plain frequencies 1 and 0.1. Short factors (1, 2) up to
        // 8 positions, long (4, 8) beyond; cos/sin scaled by 1.5.
        let longrope = rope(
            100.0,
            4,
            RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0].into(),
                long_factor: vec![4.0, 8.0].into(),
                original_max_position_embeddings: 8,
                attention_factor: 1.5,
            },
        );
        assert_eq!(longrope.inv_freq(8), vec![1.0, 0.05]);
        assert_eq!(longrope.inv_freq(9), vec![0.25, 0.0125]);
        let table = longrope.table(9);
        // Row-major by position, 2 frequencies a row: position 1 frequency 0, position 2 frequency 1.
        assert!((table.cos[2] as f64 - 1.5 * 0.25f64.cos()).abs() < 1e-6);
        assert!((table.sin[2 * 2 + 1] as f64 - 1.5 * (2.0 * 0.0125f64).sin()).abs() < 1e-6);
    }
}
