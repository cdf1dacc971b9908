//! The model's own tokenizer: `tokenizer.json` in the checkpoint directory, loaded with the
//! `tokenizers` crate (the library behind transformers' fast tokenizers), so the ids are the ones
//! `AutoTokenizer(text, add_special_tokens=False)` gives, and the BOS token its post-processor
//! puts in front of a text ([`TextTokenizer::bos`]).

use crate::error::{Error, Result};
use crate::input::files::read_limited;
use crate::model::bos::{BosPolicy, BosSource, BosToken};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Name of the tokenizer file in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The files that name the special tokens, in the order transformers reads them.
const SPECIAL_TOKEN_FILES: [&str; 2] = ["tokenizer_config.json", "special_tokens_map.json"];
/// Largest `tokenizer_config.json` / `special_tokens_map.json` read (real ones are kilobytes; a
/// chat template can make them tens of kilobytes).
const MAX_SPECIAL_TOKENS_FILE: u64 = 16 << 20;

/// A token and the bytes of the text it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Its id.
    pub id: u32,
    /// First byte.
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
}

/// A loaded `tokenizer.json`.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `model_dir`. Truncation and padding stored in the file are
    /// switched off, as transformers does for a plain call.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(Error::invalid(
                &path,
                "not found: eval needs the model's tokenizer.json (fast tokenizer) next to config.json",
            ));
        }
        let mut inner = Tokenizer::from_file(&path)
            .map_err(|e| Error::invalid(&path, format!("cannot load the tokenizer: {e}")))?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::invalid(&path, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        Ok(TextTokenizer { inner, path })
    }

    /// The ids of `text`, without special tokens (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::invalid(&self.path, format!("cannot tokenize the text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The tokens of `text`, without special tokens, each with the byte range of `text` it comes
    /// from (as the tokenizer reports it: a range may be empty, or shared by the tokens of one
    /// character).
    pub fn encode_spans(&self, text: &str) -> Result<Vec<Token>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::invalid(&self.path, format!("cannot tokenize the text: {e}")))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, end))| Token { id, start, end })
            .collect())
    }

    /// The id of the token the model maps text it cannot represent to (`<unk>`), if it has one:
    /// byte-level vocabularies have none.
    pub fn unknown_id(&self) -> Option<u32> {
        let model = serde_json::to_value(self.inner.get_model()).ok()?;
        match (model.get("unk_token"), model.get("unk_id")) {
            (Some(Value::String(token)), _) => self.inner.token_to_id(token),
            (_, Some(Value::Number(id))) => id.as_u64().and_then(|id| u32::try_from(id).ok()),
            _ => None,
        }
    }

    /// The BOS token windows start with under `policy`: with `Auto`, the special token the
    /// post-processor puts in front of a text (what `AutoTokenizer(text)` does in transformers,
    /// which reads the post-processor of `tokenizer.json` and not `tokenizer_config.json`'s
    /// `add_bos_token` when the file exists), or none; with `Always`, that token or else the
    /// `bos_token` the tokenizer's config names; with `Never`, none. Errors name `flag` (`--bos`).
    pub fn bos(&self, policy: BosPolicy, flag: &str) -> Result<Option<BosToken>> {
        match policy {
            BosPolicy::Never => Ok(None),
            BosPolicy::Auto => self.post_processor_bos(flag),
            BosPolicy::Always => match self.post_processor_bos(flag)? {
                Some(bos) => Ok(Some(bos)),
                None => self.named_bos(flag).map(Some),
            },
        }
    }

    /// The special token the post-processor adds in front of a text, if any. Tokens it adds after
    /// the text (an EOS) are not part of a window; more than one token in front is refused.
    fn post_processor_bos(&self, flag: &str) -> Result<Option<BosToken>> {
        let probe = self
            .inner
            .encode("a", true)
            .map_err(|e| Error::invalid(&self.path, format!("cannot tokenize a probe: {e}")))?;
        let prefix: Vec<u32> = probe
            .get_ids()
            .iter()
            .zip(probe.get_special_tokens_mask())
            .take_while(|(_, &special)| special == 1)
            .map(|(&id, _)| id)
            .collect();
        match prefix.as_slice() {
            [] => Ok(None),
            [id] => Ok(Some(BosToken {
                token: self.inner.id_to_token(*id).unwrap_or_default(),
                id: *id,
                source: BosSource::PostProcessor,
            })),
            more => Err(Error::invalid(
                &self.path,
                format!(
                    "the post_processor puts {} special tokens in front of a text ({more:?}); windows can start with one BOS only: give {flag} never",
                    more.len()
                ),
            )),
        }
    }

    /// The `bos_token` `tokenizer_config.json` (or `special_tokens_map.json`) names, with its id.
    fn named_bos(&self, flag: &str) -> Result<BosToken> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        for name in SPECIAL_TOKEN_FILES {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = read_limited(&path, MAX_SPECIAL_TOKENS_FILE)?;
            let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
            let token = match value.get("bos_token") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(Error::invalid(&path, "bos_token has no string `content`")),
                },
                Some(Value::Null) | None => continue,
                Some(other) => {
                    return Err(Error::invalid(
                        &path,
                        format!("bos_token must be a string or an object, found {other}"),
                    ))
                }
            };
            let id = self.inner.token_to_id(&token).ok_or_else(|| {
                Error::invalid(
                    &path,
                    format!(
                        "bos_token `{token}` is not in the vocabulary of {}",
                        self.path.display()
                    ),
                )
            })?;
            return Ok(BosToken {
                token,
                id,
                source: BosSource::Forced,
            });
        }
        Err(Error::usage(
            flag,
            format!(
                "always: the tokenizer in {} names no bos_token (tokenizer_config.json, special_tokens_map.json) and adds none: give {flag} never or auto",
                dir.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-f32-gqa")
    }

    #[test]
    fn encodes_with_the_fixture_word_level_tokenizer() {
        let tok = TextTokenizer::load(&fixture()).unwrap();
        // WordLevel over whitespace-split words; unknown words map to <unk> (0); no BOS.
        assert_eq!(
            tok.encode("tok5 tok17\ntok255 zebra").unwrap(),
            vec![5, 17, 255, 0]
        );
        assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    }

    /// The fixture's tokenizer files in a temporary directory, its `post_processor` replaced by
    /// a template of `single` (special tokens by name, `$A` the text) and `tokenizer_config.json`
    /// edited by `config`.
    fn with_template(single: &[&str], config: impl Fn(&mut Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(fixture().join(name)).unwrap()).unwrap()
        };
        let mut tokenizer = read(TOKENIZER_FILE);
        let ids = [("<unk>", 0), ("<s>", 1), ("</s>", 2)];
        let piece = |p: &str| match p {
            "$A" => serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}),
            t => serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}}),
        };
        let specials: serde_json::Map<String, Value> = single
            .iter()
            .filter(|p| **p != "$A")
            .map(|t| {
                let id = ids.iter().find(|(n, _)| n == t).unwrap().1;
                (
                    t.to_string(),
                    serde_json::json!({"id": t, "ids": [id], "tokens": [t]}),
                )
            })
            .collect();
        tokenizer["post_processor"] = if single.is_empty() {
            Value::Null
        } else {
            let single: Vec<Value> = single.iter().map(|p| piece(p)).collect();
            serde_json::json!({"type": "TemplateProcessing", "single": single.clone(),
                "pair": single, "special_tokens": specials})
        };
        std::fs::write(dir.path().join(TOKENIZER_FILE), tokenizer.to_string()).unwrap();
        let mut cfg = read("tokenizer_config.json");
        config(&mut cfg);
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        dir
    }

    #[test]
    fn the_bos_is_what_the_post_processor_puts_in_front() {
        let bos = |single: &[&str], policy: BosPolicy| {
            let dir = with_template(single, |_| {});
            TextTokenizer::load(dir.path())
                .unwrap()
                .bos(policy, "--bos")
        };
        // A template with the BOS in front: auto and always take it, never drops it.
        let added = bos(&["<s>", "$A"], BosPolicy::Auto).unwrap().unwrap();
        assert_eq!((added.token.as_str(), added.id), ("<s>", 1));
        assert_eq!(added.source, BosSource::PostProcessor);
        assert_eq!(bos(&["<s>", "$A"], BosPolicy::Always).unwrap(), Some(added));
        assert_eq!(bos(&["<s>", "$A"], BosPolicy::Never).unwrap(), None);
        // No post-processor (the fixture's own files: tokenizer_config.json says add_bos_token,
        // which transformers does not read when tokenizer.json exists): no BOS.
        assert_eq!(bos(&[], BosPolicy::Auto).unwrap(), None);
        // A template with another special token, after the text: no BOS either.
        assert_eq!(bos(&["$A", "</s>"], BosPolicy::Auto).unwrap(), None);
        // A template with another special token in front: that token leads the windows.
        let other = bos(&["</s>", "$A", "</s>"], BosPolicy::Auto)
            .unwrap()
            .unwrap();
        assert_eq!((other.token.as_str(), other.id), ("</s>", 2));
        // Two tokens in front are refused, naming the way out.
        let e = bos(&["<s>", "</s>", "$A"], BosPolicy::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 special tokens in front") && e.contains("--bos never"),
            "{e}"
        );
        // --bos always without a template: the bos_token tokenizer_config.json names.
        let forced = bos(&[], BosPolicy::Always).unwrap().unwrap();
        assert_eq!(
            (forced.token.as_str(), forced.id, forced.source),
            ("<s>", 1, BosSource::Forced)
        );
    }

    #[test]
    fn always_needs_a_named_bos_in_the_vocabulary() {
        let load = |config: fn(&mut Value)| {
            let dir = with_template(&[], config);
            TextTokenizer::load(dir.path())
                .unwrap()
                .bos(BosPolicy::Always, "--bos")
        };
        let e = load(|c| c["bos_token"] = Value::Null).unwrap_err();
        assert!(
            matches!(&e, Error::Usage { option, .. } if option == "--bos"),
            "{e:?}"
        );
        let e = load(|c| c["bos_token"] = "<nope>".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`<nope>` is not in the vocabulary"), "{e}");
        let ok = load(|c| c["bos_token"] = serde_json::json!({"content": "</s>"})).unwrap();
        assert_eq!(ok.map(|b| b.id), Some(2));
    }

    #[test]
    fn the_unknown_token_is_the_models() {
        let tok = TextTokenizer::load(&fixture()).unwrap();
        assert_eq!(tok.unknown_id(), Some(0));
    }

    #[test]
    fn missing_file_is_named() {
        let err = TextTokenizer::load(Path::new("/nonexistent-dir")).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { path, .. } if path.ends_with("tokenizer.json")),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("/nonexistent-dir/tokenizer.json"),
            "{err}"
        );
    }
}
