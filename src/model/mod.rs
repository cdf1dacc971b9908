//! What a checkpoint *is*, independent of any file: the per-architecture tensor-name tables
//! ([`arch`]), the validated `config.json` ([`config`]), the float storage types ([`dtype`]), the
//! factored form's description ([`latent`]) and the file names of the Hugging Face layout
//! ([`layout`]). Imports nothing of the crate but `error`.

pub mod arch;
pub mod config;
pub mod dtype;
pub mod latent;
pub mod layout;
