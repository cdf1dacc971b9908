//! Output: the atomic staging directory ([`staging`]; its commit, `commit`, made of renames that
//! replace nothing, [`rename`]; what `--force` may replace, [`previous`]; killed runs' staging
//! directories cleaned up, [`stale`]), the streaming safetensors writer and file copies, hashed on
//! the way ([`writer`], behind the executor's [`sink::TensorSink`]; weight files around the page
//! cache, [`direct`]), the index, copied and generated files of a plan and the final commit
//! ([`files`]), and `SHA256SUMS` ([`checksums`]). Knows the plan's layout; knows nothing of fits
//! or reports.

pub mod checksums;
mod commit;
pub mod direct;
pub mod files;
pub mod previous;
pub mod rename;
pub mod sink;
pub mod staging;
pub mod stale;
pub mod writer;
