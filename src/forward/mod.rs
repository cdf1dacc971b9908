//! A Llama forward pass in `f32` on a memory-mapped checkpoint, dense or factored
//! (`docs/factored-format.md`), for perplexity (`eval`) and, layer by layer, for calibration.
//!
//! The pass runs **layer-wise over all tokens**: [`Llama::embed`] gives the `[T, hidden]` hidden
//! states, each [`Llama::layer`] decodes one layer's weights and [`Layer::forward`] applies it in
//! place, and [`Llama::log_likelihood`] scores the result. Only one layer's weights are decoded at a
//! time (their pages are released after decoding), so memory is the activations of `T` tokens plus
//! one layer. Tokens are split into independent windows of `ctx` rows, each starting at position 0:
//!
//! ```no_run
//! # use surgery_convert::{input::checkpoint::Checkpoint, forward::Llama};
//! # fn main() -> surgery_convert::error::Result<()> {
//! let checkpoint = Checkpoint::open(std::path::Path::new("model"))?;
//! let llama = Llama::new(&checkpoint)?;
//! let ids = [1u32, 2, 3, 4];
//! let mut h = llama.embed(&ids)?;
//! let mut state = surgery_convert::forward::PassState::default();
//! for i in 0..llama.params().num_layers {
//!     llama.layer(i)?.forward(&mut h, 2, &mut state)?;
//! }
//! let (nll, count) = llama.log_likelihood(h.as_ref(), &ids, 2)?;
//! # Ok(()) }
//! ```
//!
//! Factored projections are applied as two products, `b(a(x))`; nothing is multiplied out.

pub(crate) mod attention;
pub(crate) mod buffers;
pub mod chat;
pub(crate) mod family;
pub(crate) mod layer;
pub(crate) mod linear;
pub(crate) mod load;
pub(crate) mod ops;
pub(crate) mod params;
pub(crate) mod rope;
pub mod score;
pub mod stream;
pub mod tokenize;
pub mod windows;

pub use layer::Layer;
pub use linear::PassState;
pub use params::LlamaParams;

use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use crate::model::layout::CONFIG_FILE;
use attention::windows;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use load::Loader;
use rayon::prelude::*;

/// The names of the global tensors the pass reads, from the architecture's table.
#[derive(Debug, Clone, Copy)]
struct GlobalNames {
    embed: &'static str,
    final_norm: &'static str,
    lm_head: &'static str,
}
/// Logit rows computed at once by [`Llama::log_likelihood`] (bounds the `[vocab, rows]` buffer).
const LOGIT_CHUNK: usize = 256;

/// A Llama model over a borrowed checkpoint; weights are read on demand.
#[derive(Debug)]
pub struct Llama<'a> {
    checkpoint: &'a Checkpoint,
    params: LlamaParams,
    names: GlobalNames,
}

impl<'a> Llama<'a> {
    /// Resolves the forward pass's parameters from the checkpoint's `config.json` and checks every
    /// tensor's name, shape and dtype (no data is read), so a bad checkpoint fails before any work.
    pub fn new(checkpoint: &'a Checkpoint) -> Result<Self> {
        let params = LlamaParams::resolve(&checkpoint.config, &checkpoint.dir.join(CONFIG_FILE))?;
        let names = {
            let loader = Loader {
                checkpoint,
                params: &params,
            };
            GlobalNames {
                embed: loader.global_name(Role::Embedding)?,
                final_norm: loader.global_name(Role::FinalNorm)?,
                lm_head: loader.global_name(Role::LmHead)?,
            }
        };
        let llama = Llama {
            checkpoint,
            params,
            names,
        };
        let loader = llama.loader();
        let GlobalNames {
            embed,
            final_norm,
            lm_head,
        } = names;
        loader.raw(embed, &loader.shape(None, Role::Embedding)?)?;
        loader.raw(final_norm, &loader.shape(None, Role::FinalNorm)?)?;
        if llama.params.tie_word_embeddings {
            if let Some(t) = checkpoint.tensor(lm_head) {
                return Err(Error::tensor(
                    &checkpoint.shards[t.shard].path,
                    lm_head,
                    "present, but config.json's tie_word_embeddings is true (the head is the embedding)",
                ));
            }
        } else {
            loader.raw(lm_head, &loader.shape(None, Role::LmHead)?)?;
        }
        for layer in 0..llama.params.num_layers {
            loader.check_layer(layer)?;
        }
        Ok(llama)
    }

    /// The resolved parameters.
    pub fn params(&self) -> &LlamaParams {
        &self.params
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.checkpoint
    }

    fn loader(&self) -> Loader<'_> {
        Loader {
            checkpoint: self.checkpoint,
            params: &self.params,
        }
    }

    /// The embeddings of `ids`, `[T, hidden]` (only the rows used are decoded).
    pub fn embed(&self, ids: &[u32]) -> Result<Mat<f32>> {
        let (vocab, hidden) = (self.params.vocab_size, self.params.hidden_size);
        let embed = self.names.embed;
        let (ty, bytes) = self.loader().raw(embed, &[vocab, hidden])?;
        let row_bytes = hidden * ty.size();
        // Gemma scales its embeddings by sqrt(hidden_size), rounded to f32 as transformers does.
        let scale = self
            .params
            .family
            .gemma
            .map(|_| (hidden as f64).sqrt() as f32);
        let mut h = Mat::<f32>::zeros(ids.len(), hidden);
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::tensor(
                    &self.checkpoint.dir,
                    embed,
                    format!("token id {id} is outside the vocabulary of {vocab} rows (does tokenizer.json belong to this model?)"),
                ));
            }
            let row = ty.decode_f32(&bytes[id * row_bytes..(id + 1) * row_bytes]);
            for (j, v) in row.into_iter().enumerate() {
                h[(t, j)] = scale.map_or(v, |s| v * s);
            }
        }
        Ok(h)
    }

    /// Decodes layer `index`'s weights (or stops here if a signal asked the run to stop).
    pub fn layer(&self, index: usize) -> Result<Layer> {
        crate::interrupt::check()?;
        let p = &self.params;
        if index >= p.num_layers {
            return Err(Error::invalid(
                self.checkpoint.dir.join(CONFIG_FILE),
                format!(
                    "layer {index} requested, but the model has {} layers",
                    p.num_layers
                ),
            ));
        }
        let l = self.loader();
        let (q, kv) = l.attention(index)?;
        let [o, gate, up, down] = l.layer_linears(index)?;
        let (input_layernorm, mlp_norm, output_norms) = l.layer_norms(index)?;
        let activation = match p.family.gemma {
            Some(_) => ops::Activation::GeluTanh,
            None => ops::Activation::Silu,
        };
        Ok(Layer {
            index,
            input_layernorm,
            mlp_norm,
            output_norms,
            activation,
            q,
            qk_norm: l.qk_norms(index)?,
            kv,
            o,
            gate,
            up,
            down,
            shape: p.layer_shape(index),
            rope: p.layer_rope(index),
            eps: p.rms_norm_eps,
        })
    }

    /// The logits of every row of `h` (`[T, hidden]`, after the last layer): the final norm and
    /// the head, `[T, vocab]` (for developer tools; scoring goes through [`Self::log_likelihood`]).
    pub fn logits(&self, h: MatRef<'_, f32>) -> Result<Mat<f32>> {
        let p = &self.params;
        let (vocab, hidden) = (p.vocab_size, p.hidden_size);
        let l = self.loader();
        let norm = l.norm_named(self.names.final_norm, hidden)?;
        let head_name = if p.tie_word_embeddings {
            self.names.embed
        } else {
            self.names.lm_head
        };
        let head = l.linear(head_name, vocab, hidden, None)?;
        let x = ops::rms_norm(h, &norm, p.rms_norm_eps);
        let mut out = Mat::<f32>::zeros(h.nrows(), vocab);
        matmul(
            out.as_mut(),
            Accum::Replace,
            x.as_ref(),
            head.weight_t.as_ref(),
            1.0,
            Par::rayon(0),
        );
        if let Some(c) = self.final_softcap() {
            for j in 0..out.ncols() {
                ops::softcap_in_place(out.col_as_slice_mut(j), c);
            }
        }
        Ok(out)
    }

    /// Gemma 2's soft cap of the final logits.
    fn final_softcap(&self) -> Option<f32> {
        self.params
            .family
            .gemma
            .and_then(|g| g.final_softcap)
            .map(|c| c as f32)
    }

    /// The final norm and the head applied to `h` (`[T, hidden]`, after the last layer), scored
    /// against `ids` (the `T` tokens `h` was computed from) in windows of `ctx` rows: within each
    /// window, every row but the last predicts the next token. Returns the sum of `-log p(next)`
    /// (log-softmax in `f64`) and the number of predictions scored.
    pub fn log_likelihood(
        &self,
        h: MatRef<'_, f32>,
        ids: &[u32],
        ctx: usize,
    ) -> Result<(f64, usize)> {
        let p = &self.params;
        let (vocab, hidden) = (p.vocab_size, p.hidden_size);
        if h.nrows() != ids.len() || h.ncols() != hidden {
            return Err(Error::invalid(
                &self.checkpoint.dir,
                format!(
                    "log_likelihood: hidden states are [{}, {}] but there are {} ids and hidden_size is {hidden}",
                    h.nrows(),
                    h.ncols(),
                    ids.len()
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::tensor(
                &self.checkpoint.dir,
                self.names.embed,
                format!("token id {bad} is outside the vocabulary of {vocab} rows"),
            ));
        }
        let l = self.loader();
        let norm = l.norm_named(self.names.final_norm, hidden)?;
        let head_name = if p.tie_word_embeddings {
            self.names.embed
        } else {
            self.names.lm_head
        };
        // [vocab, hidden] row-major read column-major: W^T, [hidden, vocab].
        let head = l.linear(head_name, vocab, hidden, None)?;
        let x = ops::rms_norm(h, &norm, p.rms_norm_eps);

        let mut total = 0f64;
        let mut count = 0usize;
        let mut logits = Mat::<f32>::zeros(vocab, LOGIT_CHUNK);
        for w in windows(ids.len(), ctx) {
            // Rows w.start .. w.end - 1 predict ids w.start + 1 .. w.end.
            let last = w.end.saturating_sub(1);
            let mut start = w.start;
            while start < last {
                let rows = (last - start).min(LOGIT_CHUNK);
                let mut out = logits.as_mut().subcols_mut(0, rows);
                // logits^T = W [vocab, hidden] @ x^T [hidden, rows]: each token's logits contiguous.
                matmul(
                    out.as_mut(),
                    Accum::Replace,
                    head.weight_t.transpose(),
                    x.as_ref().subrows(start, rows).transpose(),
                    1.0,
                    Par::rayon(0),
                );
                if let Some(c) = self.final_softcap() {
                    for r in 0..rows {
                        ops::softcap_in_place(logits.col_as_slice_mut(r), c);
                    }
                }
                let logits = &logits;
                let nll: Vec<f64> = (0..rows)
                    .into_par_iter()
                    .map(|r| ops::nll(logits.col_as_slice(r), ids[start + r + 1] as usize))
                    .collect();
                // Summed in order, so the result does not depend on the thread count.
                total += nll.iter().sum::<f64>();
                count += rows;
                start += rows;
            }
        }
        Ok((total, count))
    }
}
