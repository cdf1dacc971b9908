//! A `tokenizer.json` for synthetic checkpoints, so that `--calibrate`, `--check` and `eval` run on
//! them: byte-level BPE (GPT-2's byte-to-character map, as Llama 3's and SmolLM2's tokenizers use),
//! one token per byte and no merges, so any text tokenizes with no unknown token, padded with
//! reserved special tokens to exactly the model's vocabulary size (as Llama 3 pads its own with
//! `<|reserved_special_token_N|>`). transformers' `AutoTokenizer` loads it too.
//!
//! Token ids are the byte values' positions in GPT-2's order (`0..256`); the ids of the reserved
//! tokens follow. The tokens per byte are higher than a trained tokenizer's (one, against about
//! 0.25 for English), which only changes how much text a token budget reads.

use serde_json::{json, Map, Value};

/// GPT-2's map from bytes to printable characters: the printable Latin-1 bytes stand for
/// themselves, every other byte for the next unused code point from 256 on.
fn byte_characters() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut mapped: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    // Code points 256..324 are all valid characters.
    for (next, b) in (256u32..).zip((0..=255u8).filter(|&b| !printable(b))) {
        mapped.push((
            b,
            char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER),
        ));
    }
    mapped
}

/// The `tokenizer.json` of a byte-level tokenizer with `vocab` tokens (`vocab >= 256`).
pub fn byte_level(vocab: usize) -> Value {
    let mut tokens = Map::new();
    for (id, (_, c)) in byte_characters().into_iter().enumerate() {
        tokens.insert(c.to_string(), json!(id));
    }
    let reserved: Vec<Value> = (256..vocab)
        .map(|id| {
            let content = format!("<|reserved_special_token_{}|>", id - 256);
            tokens.insert(content.clone(), json!(id));
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": reserved,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": tokens, "merges": [],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::tokenize::{TextTokenizer, TOKENIZER_FILE};

    #[test]
    fn every_byte_has_one_character() {
        let map = byte_characters();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.iter().map(|&(b, _)| b).collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        let mut chars: Vec<char> = map.iter().map(|&(_, c)| c).collect();
        chars.sort_unstable();
        chars.dedup();
        assert_eq!(chars.len(), 256);
        assert!(!chars.contains(&char::REPLACEMENT_CHARACTER));
    }

    #[test]
    fn tokenizes_any_text_one_token_per_byte_within_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let json = byte_level(1000);
        std::fs::write(dir.path().join(TOKENIZER_FILE), json.to_string()).unwrap();
        let tokenizer = TextTokenizer::load(dir.path()).unwrap();
        let text = "Hello, world!\n\tnaïve café — 東京 \u{0}";
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&id| id < 256));
        // The same byte is the same token; different bytes are different tokens.
        let map: std::collections::BTreeMap<u8, u32> =
            text.bytes().zip(ids.iter().copied()).collect();
        let mut distinct: Vec<u32> = map.values().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), map.len());
        assert_eq!(json["model"]["vocab"].as_object().unwrap().len(), 1000);
    }
}
