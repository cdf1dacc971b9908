//! surgery-convert: streaming weight surgery on Llama-architecture checkpoints.
//!
//! The pipeline: [`source`] resolves `--in`; [`checkpoint`] maps and validates it; [`plan`] decides
//! every output byte's origin; [`execute`] runs the [`decompose`] math layer by layer; [`writer`]
//! streams files into an [`output`] staging directory; [`report`] and [`checksums`] record provenance;
//! [`verify`] checks an output directory.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

pub mod arch;
pub mod budget;
pub mod calibrate;
pub mod checkpoint;
pub mod checksums;
pub mod cli;
pub mod config;
pub mod convert;
pub mod decompose;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod execute;
pub mod expand;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod input_hash;
pub mod inspect;
pub mod interrupt;
pub mod latent;
pub mod llama;
pub mod output;
pub mod plan;
pub mod report;
pub mod source;
pub mod spec;
pub mod sweep;
pub mod synth;
pub mod tokenize;
pub mod verify;
pub mod weighted;
pub mod writer;
