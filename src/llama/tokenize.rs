//! The model's own tokenizer: `tokenizer.json` in the checkpoint directory, loaded with the
//! `tokenizers` crate (the library behind transformers' fast tokenizers), so the ids are the ones
//! `AutoTokenizer(text, add_special_tokens=False)` gives.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Name of the tokenizer file in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

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
