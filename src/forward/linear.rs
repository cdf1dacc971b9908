//! Linear maps of the forward pass in `f32`: a dense weight (optionally with a bias), a factored
//! projection `b(a(x))` of the factored format, and the key/value pair, whose factors may share one
//! latent. Each applies to `[tokens, in]` activations with a multi-threaded faer product, into a
//! buffer of the pass's [`Buffers`] where the pass has them.

use crate::forward::buffers::Buffers;
use crate::forward::ops::par_columns;
use crate::model::dtype::FloatType;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// `y = x W^T + bias` for a Hugging Face weight `W` `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W^T`, `[in, out]` (the row-major `[out, in]` bytes read column-major).
    pub weight_t: Mat<f32>,
    /// The bias, `out` values.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Builds the map from `W`'s values, row-major `[out, in]`.
    pub fn from_row_major(
        values: &[f32],
        out: usize,
        input: usize,
        bias: Option<Vec<f32>>,
    ) -> Self {
        Linear {
            weight_t: MatRef::from_column_major_slice(values, input, out).to_owned(),
            bias,
        }
    }

    /// Builds the map from `W`'s stored little-endian bytes (`ty`, row-major `[out, in]`),
    /// decoding each row of `W` straight into its column of `W^T`, rows in parallel.
    pub fn decode(
        ty: FloatType,
        bytes: &[u8],
        out: usize,
        input: usize,
        bias: Option<Vec<f32>>,
    ) -> Self {
        let mut weight_t = Mat::<f32>::zeros(input, out);
        let row_bytes = input * ty.size();
        par_columns(weight_t.as_mut(), |j, col| {
            ty.decode_f32_into(&bytes[j * row_bytes..(j + 1) * row_bytes], col)
        });
        Linear { weight_t, bias }
    }

    /// How many of the weight's values are NaN or infinite.
    pub fn non_finite(&self) -> usize {
        let w = self.weight_t.as_ref();
        (0..w.ncols())
            .map(|j| w.col(j).iter().filter(|v| !v.is_finite()).count())
            .sum()
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight_t.ncols()
    }

    /// `x W^T + bias` for `x` `[tokens, in]`: `[tokens, out]`.
    pub fn apply(&self, x: MatRef<'_, f32>) -> Mat<f32> {
        self.apply_in(x, &mut Buffers::default())
    }

    /// [`Linear::apply`] into a buffer taken from `buffers`.
    pub fn apply_in(&self, x: MatRef<'_, f32>, buffers: &mut Buffers) -> Mat<f32> {
        let mut y = buffers.take(x.nrows(), self.out_features());
        matmul(
            y.as_mut(),
            Accum::Replace,
            x,
            self.weight_t.as_ref(),
            1.0,
            Par::rayon(0),
        );
        if let Some(bias) = &self.bias {
            for (j, b) in bias.iter().enumerate() {
                y.col_as_slice_mut(j).iter_mut().for_each(|v| *v += b);
            }
        }
        y
    }
}

/// A query, key or value projection: dense, or factored as `up(down(x))` (the up-projection
/// carries the projection's bias, if any).
#[derive(Debug, Clone)]
pub enum Projection {
    /// `q_proj` / `k_proj` / `v_proj`.
    Dense(Linear),
    /// `*_a_proj` (down, to the latent) then `*_b_proj` (up).
    Factored {
        /// The down-projection `[L, in]`.
        down: Linear,
        /// The up-projection `[out, L]`.
        up: Linear,
    },
}

impl Projection {
    /// The projection of `x` `[tokens, in]`.
    pub fn apply(&self, x: MatRef<'_, f32>) -> Mat<f32> {
        self.apply_in(x, &mut Buffers::default())
    }

    /// [`Projection::apply`] with its products in buffers of `buffers`.
    pub fn apply_in(&self, x: MatRef<'_, f32>, buffers: &mut Buffers) -> Mat<f32> {
        match self {
            Projection::Dense(w) => w.apply_in(x, buffers),
            Projection::Factored { down, up } => {
                let latent = down.apply_in(x, buffers);
                let y = up.apply_in(latent.as_ref(), buffers);
                buffers.give(latent);
                y
            }
        }
    }
}

/// The key and value projections of a layer.
#[derive(Debug, Clone)]
pub enum KeyValue {
    /// Each on its own (dense or factored).
    Separate {
        /// Keys.
        k: Projection,
        /// Values.
        v: Projection,
    },
    /// One latent `kv_a_proj(x)` shared by `k_b_proj` and `v_b_proj` (`kv == "shared"`; with
    /// `kv_share: "basis"` the down-projection is the group's, applied to this layer's input).
    Shared {
        /// `kv_a_proj` `[L, in]`.
        down: Linear,
        /// `k_b_proj` `[kv_dim, L]`.
        k_up: Linear,
        /// `v_b_proj` `[kv_dim, L]`.
        v_up: Linear,
    },
    /// The source layer of a shared latent group (`kv_share: "latent"`): its latent is computed
    /// from its input and kept for the group's later layers.
    Source {
        /// `kv_a_proj` `[L, in]`.
        down: Linear,
        /// `k_b_proj` `[kv_dim, L]`.
        k_up: Linear,
        /// `v_b_proj` `[kv_dim, L]`.
        v_up: Linear,
    },
    /// A later layer of a shared latent group: keys and values from the source's latent.
    FromSource {
        /// `k_b_proj` `[kv_dim, L]`.
        k_up: Linear,
        /// `v_b_proj` `[kv_dim, L]`.
        v_up: Linear,
    },
}

/// What the layer-wise pass carries between layers besides the hidden states: the latent of the
/// current shared latent group, `[tokens, L]`, set by the group's source layer, and the activation
/// buffers the layers reuse.
#[derive(Debug, Default)]
pub struct PassState {
    latent: Option<Mat<f32>>,
    /// Activation buffers, handed from layer to layer.
    pub(crate) buffers: Buffers,
}

impl PassState {
    /// Swaps the activation buffers with `other`'s: two streams of one pass (sequential
    /// calibration) hand one pool back and forth instead of keeping one each.
    pub fn swap_buffers(&mut self, other: &mut PassState) {
        std::mem::swap(&mut self.buffers, &mut other.buffers);
    }
}

impl KeyValue {
    /// Keys and values of `x` `[tokens, in]` (before RoPE); a shared latent group's source keeps
    /// its latent in `state`, where the group's later layers read it.
    pub fn apply(
        &self,
        x: MatRef<'_, f32>,
        state: &mut PassState,
    ) -> crate::error::Result<(Mat<f32>, Mat<f32>)> {
        let buffers = &mut state.buffers;
        Ok(match self {
            KeyValue::Separate { k, v } => (k.apply_in(x, buffers), v.apply_in(x, buffers)),
            KeyValue::Shared { down, k_up, v_up } => {
                let latent = down.apply_in(x, buffers);
                let kv = (
                    k_up.apply_in(latent.as_ref(), buffers),
                    v_up.apply_in(latent.as_ref(), buffers),
                );
                buffers.give(latent);
                kv
            }
            KeyValue::Source { down, k_up, v_up } => {
                let latent = down.apply_in(x, buffers);
                let kv = (
                    k_up.apply_in(latent.as_ref(), buffers),
                    v_up.apply_in(latent.as_ref(), buffers),
                );
                if let Some(old) = state.latent.replace(latent) {
                    state.buffers.give(old);
                }
                kv
            }
            KeyValue::FromSource { k_up, v_up } => {
                let latent = state
                    .latent
                    .as_ref()
                    .filter(|l| l.nrows() == x.nrows() && l.ncols() == k_up.weight_t.nrows());
                let latent = latent.ok_or_else(|| {
                    crate::error::Error::bug(
                        "a layer reads its group's shared latent before the group's source layer ran",
                    )
                })?;
                (
                    k_up.apply_in(latent.as_ref(), buffers),
                    v_up.apply_in(latent.as_ref(), buffers),
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_with_bias_and_factored_agree_with_hand_products() {
        // W = [[1, 2, 3], [4, 5, 6]] (out 2, in 3), bias [10, 20]; x = [[1, 0, -1], [2, 1, 0]].
        let w = Linear::from_row_major(
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            2,
            3,
            Some(vec![10.0, 20.0]),
        );
        assert_eq!((w.weight_t.nrows(), w.out_features()), (3, 2));
        let x = Mat::<f32>::from_fn(2, 3, |i, j| [[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]][i][j]);
        let y = w.apply(x.as_ref());
        assert_eq!(
            [y[(0, 0)], y[(0, 1)], y[(1, 0)], y[(1, 1)]],
            [
                1.0 - 3.0 + 10.0,
                4.0 - 6.0 + 20.0,
                2.0 + 2.0 + 10.0,
                8.0 + 5.0 + 20.0
            ]
        );
        // W = b @ a with a = [[1, 1, 1]] and b = [[1], [2]]: W = [[1, 1, 1], [2, 2, 2]].
        let p = Projection::Factored {
            down: Linear::from_row_major(&[1.0, 1.0, 1.0], 1, 3, None),
            up: Linear::from_row_major(&[1.0, 2.0], 2, 1, None),
        };
        let y = p.apply(x.as_ref());
        assert_eq!(
            [y[(0, 0)], y[(0, 1)], y[(1, 0)], y[(1, 1)]],
            [0.0, 0.0, 3.0, 6.0]
        );
        let kv = KeyValue::Shared {
            down: Linear::from_row_major(&[1.0, 1.0, 1.0], 1, 3, None),
            k_up: Linear::from_row_major(&[1.0, 2.0], 2, 1, None),
            v_up: Linear::from_row_major(&[-1.0], 1, 1, None),
        };
        let mut state = PassState::default();
        let (k, v) = kv.apply(x.as_ref(), &mut state).unwrap();
        assert_eq!((k[(1, 1)], v[(1, 0)]), (6.0, -3.0));
        // A later layer of a shared latent group reads the source's latent, not its own input.
        let source = KeyValue::Source {
            down: Linear::from_row_major(&[1.0, 1.0, 1.0], 1, 3, None),
            k_up: Linear::from_row_major(&[1.0], 1, 1, None),
            v_up: Linear::from_row_major(&[2.0], 1, 1, None),
        };
        let later = KeyValue::FromSource {
            k_up: Linear::from_row_major(&[3.0], 1, 1, None),
            v_up: Linear::from_row_major(&[4.0], 1, 1, None),
        };
        let mut state = PassState::default();
        assert!(later.apply(x.as_ref(), &mut state).is_err());
        source.apply(x.as_ref(), &mut state).unwrap();
        let (k, v) = later
            .apply(Mat::<f32>::zeros(2, 3).as_ref(), &mut state)
            .unwrap();
        assert_eq!((k[(1, 0)], v[(1, 0)]), (9.0, 12.0));
    }
}
