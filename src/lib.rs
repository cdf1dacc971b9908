//! surgery-convert: streaming weight surgery on Llama-architecture checkpoints.
//!
//! The stages, each a folder with one job; imports only run downward in this list (checked in CI
//! by `scripts/check-imports`, drawn in `docs/design.md`):
//!
//! - [`cli`]: clap's raw arguments, resolved once into [`options`] (imported by `main` only);
//! - [`commands`]: one module per subcommand, each running the stages below;
//! - [`report`]: `surgery.json` and the summary table;
//! - [`execute`]: fits the plan's groups (pipelined) and walks the plan, feeding the writer;
//! - [`output`]: the atomic staging directory, the streaming writer, checksums;
//! - [`llama`]: the forward pass, tokenizer, scoring and the calibration pass;
//! - [`options`]: the validated options the library consumes;
//! - [`plan`]: the pure stage that decides every output tensor and file;
//! - [`fit`]: the math (rank rules, weight-only and activation-aware fits);
//! - [`input`]: resolving, mapping and validating a checkpoint;
//! - [`model`]: name tables, config, dtypes, the factored format;
//! - support: [`error`], [`interrupt`], [`digest`], [`scratch`].

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

// The public API is what `main`, the dev binary, the fuzz target and the tests use; every other
// module is the crate's own.
pub mod calibrate;
pub mod cli;
pub mod commands;
pub(crate) mod execute;
pub mod fit;
pub mod forward;
pub mod input;
pub mod model;
pub mod options;
pub(crate) mod output;
pub(crate) mod plan;
pub(crate) mod report;

pub mod digest;
pub mod error;
pub mod interrupt;
pub mod scratch;

#[cfg(feature = "dev")]
pub mod dev;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
#[cfg(test)]
mod test_support;
