//! `model.safetensors.index.json`: the shard index, read with a size limit and streamed so duplicate
//! names, oversized maps and shard names that could leave the checkpoint directory are refused.

use crate::error::{Error, Result};
use crate::input::{files, header};
use std::collections::BTreeMap;
use std::path::Path;

/// Largest `model.safetensors.index.json` accepted (64 MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// A validated shard index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// The shard file names it lists, sorted, each once.
    pub shards: Vec<String>,
    /// Tensor name to shard file name.
    pub weight_map: BTreeMap<String, String>,
}

/// The index's `weight_map`, streamed so duplicate names and oversized maps are refused.
struct WeightMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<WeightMap, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    if out.len() >= header::MAX_TENSORS {
                        return Err(A::Error::custom(format!(
                            "weight_map lists more than {} tensors (the limit)",
                            header::MAX_TENSORS
                        )));
                    }
                    let file: String = map.next_value().map_err(|e| {
                        A::Error::custom(format!("weight_map entry for `{name}`: {e}"))
                    })?;
                    if out.contains_key(&name) {
                        return Err(A::Error::custom(format!(
                            "weight_map lists `{name}` more than once"
                        )));
                    }
                    out.insert(name, file);
                }
                Ok(WeightMap(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: WeightMap,
}

/// Reads and validates the index at `path`.
pub fn read(path: &Path) -> Result<ShardIndex> {
    let text = files::read_limited(path, MAX_INDEX_BYTES)?;
    parse(&text, path)
}

/// Parses and validates the index text `text` (`path` is used in messages).
fn parse(text: &str, path: &Path) -> Result<ShardIndex> {
    let index: IndexFile = serde_json::from_str(text).map_err(|source| {
        if source.classify() == serde_json::error::Category::Data {
            Error::invalid(path, source.to_string())
        } else {
            Error::Json {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let weight_map = index.weight_map.0;
    for (name, file) in &weight_map {
        if !is_plain_file_name(file) {
            return Err(Error::invalid(
                path,
                format!("weight_map entry for `{name}` names `{file}`, which is not a plain file name in the checkpoint directory (refused: only files inside it are opened)"),
            ));
        }
    }
    if weight_map.is_empty() {
        return Err(Error::invalid(path, "`weight_map` is empty"));
    }
    let mut shards: Vec<String> = weight_map.values().cloned().collect();
    shards.sort();
    shards.dedup();
    Ok(ShardIndex { shards, weight_map })
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && !Path::new(name).is_absolute()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<ShardIndex> {
        parse(text, Path::new("model.safetensors.index.json"))
    }

    /// The message of an [`Error::Invalid`], failing the test for any other variant.
    fn invalid_message(err: Error) -> String {
        match err {
            Error::Invalid { message, .. } => message,
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn plain_file_names() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for bad in [
            "",
            ".",
            "..",
            "../x.safetensors",
            "/etc/passwd",
            "a/b.safetensors",
            "a\\b",
            "a\0b",
        ] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn lists_shards_sorted_once() {
        let index = parse_str(
            r#"{"metadata": {"total_size": 1}, "weight_map": {"b": "two.safetensors",
                "a": "one.safetensors", "c": "two.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(index.shards, ["one.safetensors", "two.safetensors"]);
        assert_eq!(index.weight_map.len(), 3);
        assert_eq!(index.weight_map["c"], "two.safetensors");
    }

    #[test]
    fn refuses_duplicate_names() {
        let err = parse_str(r#"{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}"#)
            .unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
        assert!(invalid_message(err).starts_with("weight_map lists `a` more than once"));
    }

    #[test]
    fn refuses_non_string_shard_names() {
        let err = parse_str(r#"{"weight_map": {"a": 3}}"#).unwrap_err();
        assert!(invalid_message(err).starts_with("weight_map entry for `a`: invalid type"));
    }

    #[test]
    fn refuses_missing_or_empty_weight_map() {
        let err = parse_str(r#"{"metadata": {}}"#).unwrap_err();
        assert!(invalid_message(err).starts_with("missing field `weight_map`"));
        let err = parse_str(r#"{"weight_map": {}}"#).unwrap_err();
        assert_eq!(invalid_message(err), "`weight_map` is empty");
        let err = parse_str(r#"{"weight_map": []}"#).unwrap_err();
        assert!(invalid_message(err).contains("an object mapping tensor names to shard file names"));
    }

    #[test]
    fn refuses_shard_names_outside_the_directory() {
        for bad in ["../x.safetensors", "/abs.safetensors", "sub/x.safetensors"] {
            let text = format!(r#"{{"weight_map": {{"t": "{bad}"}}}}"#);
            let message = invalid_message(parse_str(&text).unwrap_err());
            assert_eq!(
                message,
                format!("weight_map entry for `t` names `{bad}`, which is not a plain file name in the checkpoint directory (refused: only files inside it are opened)")
            );
        }
    }

    #[test]
    fn syntax_errors_are_json_errors() {
        let err = parse_str("{\"weight_map\": ").unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err:?}");
        assert!(err.to_string().contains("not valid JSON"));
    }

    #[test]
    fn refuses_oversized_files_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors.index.json");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_INDEX_BYTES + 1).unwrap();
        let message = invalid_message(read(&path).unwrap_err());
        assert_eq!(
            message,
            format!(
                "{} bytes, more than the {MAX_INDEX_BYTES}-byte limit for this file",
                MAX_INDEX_BYTES + 1
            )
        );
    }
}
