//! Input: resolving `--in` to a directory ([`source`]: a local path or the Hugging Face cache),
//! keeping every file opened inside it ([`files`]), parsing safetensors headers with limits
//! ([`header`]) and the shard index ([`index`]), and mapping and validating the whole checkpoint
//! ([`checkpoint`]). Reads, never writes; imports only `model` and the support modules.

pub mod checkpoint;
pub mod files;
pub mod header;
pub mod source;
