//! Reading `config.json` from disk, with a size limit, into the validated [`ModelConfig`] (the
//! validation itself is [`ModelConfig::from_json`], which touches no file).

use crate::error::{Error, Result};
use crate::input::files;
use crate::model::config::ModelConfig;
use serde_json::Value;
use std::path::Path;

/// Largest `config.json` accepted (16 MiB; real ones are a few kilobytes).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads and validates the `config.json` at `path`.
pub fn read(path: &Path) -> Result<ModelConfig> {
    let text = files::read_limited(path, MAX_CONFIG_BYTES)?;
    let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    ModelConfig::from_json(&value, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                "num_attention_heads": 2, "num_hidden_layers": 1}"#,
        )
        .unwrap();
        let config = read(&path).unwrap();
        assert_eq!((config.head_dim, config.num_kv_heads), (4, 2));

        std::fs::write(&path, "{\"architectures\": ").unwrap();
        let err = read(&path).unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err:?}");

        std::fs::write(&path, [b'{', 0xff, b'}']).unwrap();
        let err = read(&path).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { message, .. } if message.starts_with("not UTF-8 text")),
            "{err:?}"
        );

        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_CONFIG_BYTES + 1)
            .unwrap();
        let err = read(&path).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { message, .. } if message.contains("-byte limit")),
            "{err:?}"
        );
    }
}
