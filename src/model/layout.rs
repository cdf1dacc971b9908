//! The file names of a Hugging Face checkpoint directory, in one place.

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// Files this tool writes into every output (never copied from an input).
pub const GENERATED_FILES: &[&str] = &["surgery.json", "SHA256SUMS"];

/// The name of shard `k` (0-based) of `n` in the Hugging Face pattern,
/// `model-00001-of-00002.safetensors`, whatever `n` is.
pub fn indexed_shard_name(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
}

/// The name of shard `k` (0-based) of `n` as written: [`indexed_shard_name`], or [`SINGLE_FILE`]
/// for a single shard.
pub fn shard_file_name(k: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        indexed_shard_name(k, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_follow_the_hub_pattern() {
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(0, 2), "model-00001-of-00002.safetensors");
        assert_eq!(shard_file_name(11, 12), "model-00012-of-00012.safetensors");
        assert_eq!(indexed_shard_name(0, 1), "model-00001-of-00001.safetensors");
    }
}
