//! The forward pass's logits for given token ids, written to a safetensors file (`logits`,
//! `[T, vocab]`, F32): what the interop tests compare with transformers, token by token.

use crate::error::{Error, Result};
use crate::forward::{Llama, PassState};
use crate::input::checkpoint::Checkpoint;
use std::path::Path;

/// Runs `model` over `ids` as one window (positions `0..T`) and writes the logits to `out`.
pub fn write_logits(model: &Path, ids: &[u32], out: &Path) -> Result<()> {
    let checkpoint = Checkpoint::open(model)?;
    let llama = Llama::new(&checkpoint)?;
    let mut h = llama.embed(ids)?;
    let mut state = PassState::default();
    for index in 0..llama.params().num_layers {
        llama.layer(index)?.forward(&mut h, 0, &mut state)?;
    }
    let logits = llama.logits(h.as_ref())?;
    let (rows, cols) = (logits.nrows(), logits.ncols());
    let mut bytes = Vec::with_capacity(rows * cols * 4);
    for i in 0..rows {
        for j in 0..cols {
            bytes.extend_from_slice(&logits[(i, j)].to_le_bytes());
        }
    }
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, cols], &bytes)
            .map_err(|e| Error::bug(format!("logits view: {e}")))?;
    let data = safetensors::serialize([("logits", view)], None)
        .map_err(|e| Error::bug(format!("logits file: {e}")))?;
    std::fs::write(out, data).map_err(|e| Error::io(out, e))
}
