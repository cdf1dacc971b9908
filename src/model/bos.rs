//! Whether the windows a text is cut into start with the tokenizer's beginning-of-sequence token
//! (`--bos`), and the record of what was decided. Which token a tokenizer adds is read from its
//! files by `forward::tokenize`; the windows themselves are `forward::windows`.

use serde::Serialize;

/// `--bos`: where the BOS decision comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BosPolicy {
    /// The model's own convention: a BOS exactly when the tokenizer's post-processor adds one.
    #[default]
    Auto,
    /// Always a BOS (the tokenizer's `bos_token`), even where the tokenizer adds none.
    Always,
    /// Never a BOS, even where the tokenizer adds one.
    Never,
}

impl BosPolicy {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            BosPolicy::Auto => "auto",
            BosPolicy::Always => "always",
            BosPolicy::Never => "never",
        }
    }
}

/// Where the BOS token of a convention was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BosSource {
    /// `tokenizer.json`'s `post_processor` adds it in front of the text (what transformers does).
    #[serde(rename = "tokenizer.json post_processor")]
    PostProcessor,
    /// `--bos always`, with the token `tokenizer_config.json` (or `special_tokens_map.json`) names.
    #[serde(rename = "--bos always")]
    Forced,
}

/// The BOS token every window starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BosToken {
    /// The token's text, e.g. `<bos>`.
    pub token: String,
    /// Its id.
    pub id: u32,
    /// Where it was found.
    pub source: BosSource,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_their_source() {
        let bos = BosToken {
            token: "<bos>".into(),
            id: 2,
            source: BosSource::PostProcessor,
        };
        assert_eq!(
            serde_json::to_string(&bos).unwrap(),
            r#"{"token":"<bos>","id":2,"source":"tokenizer.json post_processor"}"#
        );
        assert_eq!(BosPolicy::default().name(), "auto");
    }
}
