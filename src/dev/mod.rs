//! Developer tools, compiled only with the `dev` feature and used by the `surgery-dev` binary
//! (`scripts/bench`, the interrupt tests): synthetic checkpoints of real model shapes ([`synth`], their tokenizer [`tokenizer`])
//! and the decomposition floor of a conversion ([`bench`]). Not part of the product.

pub mod bench;
pub mod logits;
pub mod synth;
pub mod tokenizer;
