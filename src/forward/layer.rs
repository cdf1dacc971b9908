//! One decoder layer with its weights decoded to `f32`, applied to all tokens at once:
//! `h += o_proj(attention(rope(q), rope(k), v))` on `input_layernorm(h)` (Qwen3: `q` and `k`
//! normalised per head before RoPE), then
//! `h += down(silu(gate(x)) * up(x))` on `x = post_attention_layernorm(h)`. Gemma normalises each
//! block's output before adding it, with a GeLU-tanh gate and `pre_feedforward_layernorm`.

use crate::error::Result;
use crate::forward::attention::{attend, windows, AttentionShape};
use crate::forward::buffers::Buffers;
use crate::forward::linear::{KeyValue, Linear, PassState, Projection};
use crate::forward::ops::{
    add_in_place, gated_in_place, head_rms_norm_in_place, rms_norm, rms_norm_in, Activation,
};
use crate::forward::rope::{Rope, RopeTable};
use faer::{Mat, MatMut, MatRef};

/// Gemma's norms of the two blocks' outputs.
#[derive(Debug, Clone)]
pub struct OutputNorms {
    /// `post_attention_layernorm`, on `o_proj`'s output.
    pub attention: Vec<f32>,
    /// `post_feedforward_layernorm`, on the MLP's output.
    pub mlp: Vec<f32>,
}

/// A decoder layer's weights (`f32`) and the parameters its forward pass needs.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's index.
    pub index: usize,
    /// `input_layernorm.weight`.
    pub input_layernorm: Vec<f32>,
    /// The norm before the MLP: `post_attention_layernorm` (Llama, Qwen) or Gemma's
    /// `pre_feedforward_layernorm`.
    pub mlp_norm: Vec<f32>,
    /// Gemma's norms of each block's output, applied before its residual addition.
    pub output_norms: Option<OutputNorms>,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// The query projection, dense or factored.
    pub q: Projection,
    /// Qwen3's per-head `q_norm` and `k_norm` weights, applied before RoPE.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// The key and value projections, dense, factored, or from one shared latent.
    pub kv: KeyValue,
    /// `o_proj`.
    pub o: Linear,
    /// `mlp.gate_proj`.
    pub gate: Linear,
    /// `mlp.up_proj`.
    pub up: Linear,
    /// `mlp.down_proj`.
    pub down: Linear,
    /// Heads and sliding window.
    pub shape: AttentionShape,
    /// The rotary embedding.
    pub rope: Rope,
    /// `rms_norm_eps`.
    pub eps: f64,
}

/// Bytes of one `[rows, intermediate]` MLP activation (the gate, the up projection) at most:
/// the block runs over the tokens in chunks of this size, so a long calibration pass on a wide
/// model does not hold `[tokens, intermediate]` matrices (8,192 tokens of Llama-3-8B's 14,336
/// would be 470 MB each).
const MLP_CHUNK_BYTES: usize = 64 << 20;

/// Rows of the MLP block computed at once for an `intermediate`-wide MLP: [`MLP_CHUNK_BYTES`]
/// per activation, a multiple of 64 rows, at least 256.
fn mlp_rows(intermediate: usize) -> usize {
    let rows = MLP_CHUNK_BYTES / (intermediate.max(1) * std::mem::size_of::<f32>());
    (rows / 64 * 64).max(256)
}

impl Layer {
    /// `input_layernorm(h)`: what the attention projections read, `[tokens, hidden]` (the forward
    /// pass itself norms into a reused buffer).
    pub fn attention_input(&self, h: MatRef<'_, f32>) -> Mat<f32> {
        rms_norm(h, &self.input_layernorm, self.eps)
    }

    /// The queries as the scores read them, before RoPE: `q_proj(x)` of the attention input `x`,
    /// normalised per head where the family does (Gemma, Qwen3's `q_norm`), `[tokens, heads *
    /// head_dim]`.
    pub fn normed_queries(&self, x: MatRef<'_, f32>) -> Mat<f32> {
        let mut q = self.q.apply(x);
        if let Some((q_norm, _)) = &self.qk_norm {
            head_rms_norm_in_place(&mut q, q_norm, self.eps);
        }
        q
    }

    /// Applies the layer in place to `h` (`[T, hidden]`), whose rows are split into independent
    /// windows of `ctx` rows (the last may be shorter; `ctx == 0` means one window of all rows),
    /// positions `0..len` within each window. `h` must have `hidden_size` columns (as
    /// [`crate::forward::Llama::embed`] returns). `state` carries a shared latent group's latent
    /// from its source layer to the later ones, and the activation buffers (one `state` per pass,
    /// layers in order).
    pub fn forward(&self, h: &mut Mat<f32>, ctx: usize, state: &mut PassState) -> Result<()> {
        let z = self.attention_heads(h.as_ref(), ctx, state)?;
        self.finish(h, z.as_ref(), state);
        state.buffers.give(z);
        Ok(())
    }

    /// The attention block up to `o_proj`: every head's output side by side, `[T, heads *
    /// head_dim]` (what `o_proj` reads), for hidden states `h` windowed as in [`Layer::forward`].
    pub fn attention_heads(
        &self,
        h: MatRef<'_, f32>,
        ctx: usize,
        state: &mut PassState,
    ) -> Result<Mat<f32>> {
        let (z, q) = self.attention_heads_and_queries(h, ctx, state)?;
        state.buffers.give(q);
        Ok(z)
    }

    /// [`Layer::attention_heads`], and the queries its scores read (`q_proj`, the per-head norm,
    /// RoPE per window: `[T, heads * head_dim]`), for [`Layer::attention_heads_with_queries`].
    pub fn attention_heads_and_queries(
        &self,
        h: MatRef<'_, f32>,
        ctx: usize,
        state: &mut PassState,
    ) -> Result<(Mat<f32>, Mat<f32>)> {
        let x = rms_norm_in(h, &self.input_layernorm, self.eps, &mut state.buffers);
        let mut q = self.q.apply_in(x.as_ref(), &mut state.buffers);
        let (mut k, v) = self.kv.apply(x.as_ref(), state)?;
        let buffers = &mut state.buffers;
        buffers.give(x);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            head_rms_norm_in_place(&mut q, q_norm, self.eps);
            head_rms_norm_in_place(&mut k, k_norm, self.eps);
        }
        self.rotate_windows(&mut q, ctx);
        self.rotate_windows(&mut k, ctx);
        let z = attend(
            q.as_ref(),
            k.as_ref(),
            v.as_ref(),
            &self.shape,
            ctx,
            buffers,
        );
        [k, v].into_iter().for_each(|m| buffers.give(m));
        Ok((z, q))
    }

    /// [`Layer::attention_heads`] with its queries given, as [`Layer::attention_heads_and_queries`]
    /// returned them for the same `h` and the same `q_proj`: only the keys and values are computed
    /// (this layer's, which may differ from the ones the queries came with), the same bits as
    /// computing the queries again.
    pub fn attention_heads_with_queries(
        &self,
        h: MatRef<'_, f32>,
        q: MatRef<'_, f32>,
        ctx: usize,
        state: &mut PassState,
    ) -> Result<Mat<f32>> {
        let x = rms_norm_in(h, &self.input_layernorm, self.eps, &mut state.buffers);
        let (mut k, v) = self.kv.apply(x.as_ref(), state)?;
        let buffers = &mut state.buffers;
        buffers.give(x);
        if let Some((_, k_norm)) = &self.qk_norm {
            head_rms_norm_in_place(&mut k, k_norm, self.eps);
        }
        self.rotate_windows(&mut k, ctx);
        let z = attend(q, k.as_ref(), v.as_ref(), &self.shape, ctx, buffers);
        [k, v].into_iter().for_each(|m| buffers.give(m));
        Ok(z)
    }

    /// The rest of the layer, in place: `h += o_proj(z)` for the heads' output `z`
    /// ([`Layer::attention_heads`]), then the MLP block (Gemma: each block's output normalised
    /// before it is added), [`mlp_rows`] rows at a time. Buffers come from and go back to `state`.
    pub fn finish(&self, h: &mut Mat<f32>, z: MatRef<'_, f32>, state: &mut PassState) {
        let o = self.attention_output(z, state);
        self.finish_output(h, o, state);
    }

    /// `o_proj(z)` (its bias included) of the heads' output `z`: the attention block's output,
    /// before the family's output norm, `[T, hidden]`.
    pub fn attention_output(&self, z: MatRef<'_, f32>, state: &mut PassState) -> Mat<f32> {
        self.o.apply_in(z, &mut state.buffers)
    }

    /// [`Layer::finish`] from the attention block's output `o` ([`Layer::attention_output`]),
    /// which goes back to `state`'s buffers.
    pub fn finish_output(&self, h: &mut Mat<f32>, o: Mat<f32>, state: &mut PassState) {
        self.finish_in_chunks(h, o, mlp_rows(self.gate.out_features()), &mut state.buffers);
    }

    /// [`Layer::finish_output`] with the MLP block applied to `rows` rows at a time (every row's
    /// result is its own: the same bits for any `rows`).
    fn finish_in_chunks(&self, h: &mut Mat<f32>, o: Mat<f32>, rows: usize, buffers: &mut Buffers) {
        self.add_output(h.as_mut(), o, |n| &n.attention, buffers);
        for w in windows(h.nrows(), rows.max(1)) {
            let mut chunk = h.as_mut().subrows_mut(w.start, w.len());
            let x = rms_norm_in(chunk.as_ref(), &self.mlp_norm, self.eps, buffers);
            let mut gate = self.gate.apply_in(x.as_ref(), buffers);
            let up = self.up.apply_in(x.as_ref(), buffers);
            buffers.give(x);
            gated_in_place(&mut gate, &up, self.activation);
            buffers.give(up);
            let down = self.down.apply_in(gate.as_ref(), buffers);
            buffers.give(gate);
            self.add_output(chunk.as_mut(), down, |n| &n.mlp, buffers);
        }
    }

    /// `h += block`, the block's output normalised first where the family does (Gemma's
    /// `post_*_layernorm`, picked by `norm`); `block` goes back to `buffers`.
    fn add_output(
        &self,
        h: MatMut<'_, f32>,
        block: Mat<f32>,
        norm: fn(&OutputNorms) -> &[f32],
        buffers: &mut Buffers,
    ) {
        match &self.output_norms {
            Some(norms) => {
                let normed = rms_norm_in(block.as_ref(), norm(norms), self.eps, buffers);
                add_in_place(h, normed.as_ref());
                buffers.give(normed);
            }
            None => add_in_place(h, block.as_ref()),
        }
        buffers.give(block);
    }

    /// RoPE on queries and keys, positions restarting at 0 in every window.
    fn rotate_windows(&self, m: &mut Mat<f32>, ctx: usize) {
        let mut tables: Vec<(usize, RopeTable)> = Vec::new();
        for w in windows(m.nrows(), ctx) {
            let len = w.len();
            let index = match tables.iter().position(|(l, _)| *l == len) {
                Some(i) => i,
                None => {
                    tables.push((len, self.rope.table(len)));
                    tables.len() - 1
                }
            };
            tables[index].1.rotate(m.as_mut().subrows_mut(w.start, len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::Llama;
    use crate::test_support::open_tiny;
    use safetensors::Dtype;

    #[test]
    fn mlp_rows_bound_the_activations() {
        assert_eq!(mlp_rows(14_336), 1_152);
        assert_eq!(mlp_rows(1_536), 10_880);
        assert_eq!(mlp_rows(1 << 30), 256);
        assert!(mlp_rows(14_336) * 14_336 * 4 <= MLP_CHUNK_BYTES);
    }

    #[test]
    fn the_mlp_in_chunks_gives_the_same_bits() {
        let (_dir, ck) = open_tiny(Dtype::F32, false);
        let llama = Llama::new(&ck).unwrap();
        let ids: Vec<u32> = (0..37).map(|i| (i * 7 % 16) as u32).collect();
        let h = llama.embed(&ids).unwrap();
        let layer = llama.layer(0).unwrap();
        let mut state = PassState::default();
        let z = layer.attention_heads(h.as_ref(), 16, &mut state).unwrap();
        let run = |rows: usize| {
            let mut out = h.clone();
            let o = layer.attention_output(z.as_ref(), &mut PassState::default());
            layer.finish_in_chunks(&mut out, o, rows, &mut Buffers::default());
            out
        };
        let whole = run(ids.len());
        assert!((0..whole.ncols()).any(|j| whole[(0, j)] != h[(0, j)]));
        for rows in [1, 5, 36] {
            let chunked = run(rows);
            for j in 0..whole.ncols() {
                for i in 0..whole.nrows() {
                    assert_eq!(
                        chunked[(i, j)].to_bits(),
                        whole[(i, j)].to_bits(),
                        "{rows} rows"
                    );
                }
            }
        }
    }
}
