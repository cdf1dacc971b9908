//! What a checkpoint *is*, independent of any file: the per-architecture tensor-name tables
//! ([`arch`]), the validated `config.json` ([`config`]), the float storage types ([`dtype`]), the
//! factored form's description ([`latent`]), the file names of the Hugging Face layout
//! ([`layout`]), the shape every tensor must have ([`shapes`]) and whether text windows start
//! with a BOS token ([`bos`]). Imports nothing of the crate but `error`.

pub(crate) mod arch;
pub mod bos;
pub(crate) mod config;
pub mod dtype;
pub(crate) mod latent;
pub(crate) mod layout;
pub(crate) mod shapes;
