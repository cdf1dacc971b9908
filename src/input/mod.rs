//! Input: resolving `--in` to a directory ([`source`]: a local path or the Hugging Face cache, downloading
//! what is missing with [`hub`]),
//! keeping every file opened inside it ([`files`]), reading `config.json` ([`config_file`]),
//! parsing safetensors headers with limits ([`header`]) and the shard index ([`index`]), and mapping
//! and validating the whole checkpoint ([`checkpoint`], its tensors [`entry`], fused tensors split into
//! their parts by [`fused`]); texts to calibrate on or score, files
//! or the samples built into the binary ([`text`]), files read with bounded memory ([`text_file`]). Reads, never writes; imports only `model`
//! and the support modules.

pub mod checkpoint;
pub(crate) mod config_file;
pub(crate) mod entry;
pub(crate) mod files;
pub(crate) mod fused;
pub(crate) mod header;
pub(crate) mod hub;
pub(crate) mod index;
pub(crate) mod source;
pub mod text;
pub mod text_file;
