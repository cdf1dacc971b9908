//! Streamed tokenization against whole-text tokenization: the same ids on the repository's texts
//! with windows small enough to cut them hundreds of times, for tokenizers of each kind the
//! supported families use (word-level, byte-level BPE as Llama 3, Qwen and SmolLM2 have,
//! SentencePiece-style BPE with byte fallback as Llama 2 and Mistral have, and with line breaks
//! in its vocabulary as Gemma has), their merges learned here from the built-in text; and the
//! whole-text fallback where a tokenizer's tokens reach past a window.

use super::*;
use crate::input::text::{Builtin, TextFile, TextSource};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// Windows of a few hundred bytes.
const SMALL: Sizes = Sizes {
    min: 384,
    max: 768,
    context: 96,
    lookahead: 96,
};
/// Windows of a few bytes: cuts inside words and characters.
const TINY: Sizes = Sizes {
    min: 8,
    max: 16,
    context: 5,
    lookahead: 3,
};

fn memory(text: &str) -> TextReader {
    TextReader::memory(text.to_string(), "--text", "test")
}

/// `tokenizer.json` written to a temporary directory and loaded.
fn load(json: &Value) -> (tempfile::TempDir, TextTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    (dir, tok)
}

/// Learns `n` BPE merges from `words` (each a sequence of symbols, with its count).
fn learn_merges(words: HashMap<Vec<String>, usize>, n: usize) -> Vec<(String, String)> {
    let mut names: Vec<String> = Vec::new();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut intern = |s: String, names: &mut Vec<String>| {
        *ids.entry(s.clone()).or_insert_with(|| {
            names.push(s);
            names.len() as u32 - 1
        })
    };
    let mut words: Vec<(Vec<u32>, usize)> = words
        .into_iter()
        .map(|(w, c)| (w.into_iter().map(|s| intern(s, &mut names)).collect(), c))
        .collect();
    words.sort();
    let mut merges = Vec::new();
    for _ in 0..n {
        let mut pairs: HashMap<(u32, u32), usize> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += c;
            }
        }
        let Some(((a, b), _)) = pairs
            .into_iter()
            .max_by_key(|&(p, c)| (c, std::cmp::Reverse(p)))
        else {
            break;
        };
        let merged = intern(
            format!("{}{}", names[a as usize], names[b as usize]),
            &mut names,
        );
        for (w, _) in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = merged;
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((names[a as usize].clone(), names[b as usize].clone()));
    }
    merges
}

/// A BPE `tokenizer.json`: `base` symbols, then the merged ones.
fn bpe(base: Vec<String>, merges: &[(String, String)], extra: Value) -> Value {
    let mut vocab = Map::new();
    for s in base
        .into_iter()
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
    {
        let id = vocab.len();
        vocab.entry(s).or_insert(json!(id));
    }
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let mut t = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    for (k, v) in extra.as_object().unwrap() {
        if k == "model" {
            for (mk, mv) in v.as_object().unwrap() {
                t["model"][mk] = mv.clone();
            }
        } else {
            t[k] = v.clone();
        }
    }
    t
}

/// GPT-2's byte-to-character map.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// Runs of letters, digits, other characters and spaces, each with the space before it: how
/// the training text is cut into words.
fn words_of(text: &str) -> Vec<&str> {
    let class = |c: char| match c {
        c if c.is_alphabetic() => 0,
        c if c.is_numeric() => 1,
        c if c.is_whitespace() => 2,
        _ => 3,
    };
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for i in 1..chars.len() {
        let (p, c) = chars[i];
        let prev = chars[i - 1].1;
        if class(c) != class(prev) && !(prev == ' ' && class(c) != 2) {
            out.push(&text[start..p]);
            start = p;
        }
    }
    out.push(&text[start..]);
    out
}

fn training_text() -> String {
    TextSource::Builtin(Builtin::Calibration)
        .load("--calibrate", None)
        .unwrap()
        .text
}

/// Byte-level BPE, as Llama 3, Qwen and SmolLM2 (GPT-2's pre-tokenizer and byte map).
fn byte_level(text: &str) -> Value {
    let map = byte_chars();
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    for w in words_of(text) {
        let symbols = w.bytes().map(|b| map[b as usize].to_string()).collect();
        *words.entry(symbols).or_default() += 1;
    }
    let merges = learn_merges(words, 300);
    let level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
        "use_regex": true});
    let base = map.iter().map(char::to_string).collect();
    bpe(
        base,
        &merges,
        json!({"pre_tokenizer": level, "post_processor": level, "decoder": level}),
    )
}

/// SentencePiece-style BPE over the whole text (no pre-tokenizer), spaces as `▁`, characters
/// outside the vocabulary as bytes: Llama 2 and Mistral (`prepend`: a `▁` in front of the text),
/// or Gemma (line breaks are tokens, merged with each other).
fn sentencepiece(text: &str, prepend: bool, newlines: bool) -> Value {
    let normalized = text.replace(' ', "▁");
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    let mut chars: Vec<String> = Vec::new();
    for line in normalized.split_inclusive('\n') {
        for w in line.split_inclusive('▁').filter(|w| !w.is_empty()) {
            let symbols: Vec<String> = w
                .chars()
                .filter(|&c| newlines || c != '\n')
                .map(String::from)
                .collect();
            chars.extend(symbols.iter().cloned());
            *words.entry(symbols).or_default() += 1;
        }
    }
    chars.sort();
    chars.dedup();
    let bytes = (0..256).map(|b| format!("<0x{b:02X}>"));
    let base = ["<unk>".to_string()]
        .into_iter()
        .chain(bytes)
        .chain(chars)
        .collect();
    let merges = learn_merges(words, 300);
    let mut normalizers =
        vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})];
    if prepend {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "▁"}));
    }
    bpe(
        base,
        &merges,
        json!({"normalizer": {"type": "Sequence", "normalizers": normalizers},
            "model": {"byte_fallback": true, "fuse_unk": true, "unk_token": "<unk>"}}),
    )
}

/// The first `n` bytes of `text` or a little more (to a character boundary).
fn head(text: &str, n: usize) -> String {
    let mut end = n.min(text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    text[..end].to_string()
}

/// The repository's texts (their first 48 KB: the tokenizers run unoptimised in tests), and the
/// same texts cut differently.
fn texts() -> Vec<(String, String)> {
    const BYTES: usize = 48_000;
    let read =
        |p: &str| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap();
    let calibration = training_text();
    let tagged = |c: &[&[crate::input::text::Message]]| -> Result<Vec<String>> {
        Ok(c.iter()
            .map(|m| {
                m.iter()
                    .map(|t| format!("<|im_start|>{}\n{}<|im_end|>\n", t.role, t.content))
                    .collect()
            })
            .collect())
    };
    let chat = TextSource::Builtin(Builtin::Calibration)
        .load("--calibrate", Some(&tagged))
        .unwrap()
        .text;
    let mid = (100_000..)
        .find(|&i| calibration.is_char_boundary(i))
        .unwrap();
    // The dialogue comes after the prose in the built-in text.
    let dialogue = chat.find("<|im_start|>").unwrap();
    vec![
        ("built-in calibration".into(), head(&calibration, BYTES)),
        (
            "built-in calibration's dialogue, chat-rendered".into(),
            head(&chat[dialogue..], BYTES),
        ),
        ("built-in check".into(), read("data/builtin/check.txt")),
        (
            "fixtures/eval/text.txt".into(),
            read("fixtures/eval/text.txt"),
        ),
        (
            "data/builtin/README.md".into(),
            head(&read("data/builtin/README.md"), BYTES),
        ),
        (
            "calibration, CRLF and one line".into(),
            head(&calibration, BYTES / 2).replace('\n', "\r\n")
                + &head(&calibration[mid..], BYTES / 2).replace('\n', " "),
        ),
    ]
}

/// The `tokenizer.json` of every kind, named (learnt once).
fn kinds() -> &'static [(&'static str, Value)] {
    static KINDS: std::sync::OnceLock<Vec<(&'static str, Value)>> = std::sync::OnceLock::new();
    KINDS.get_or_init(|| {
        let text = head(&training_text(), 64_000);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-f32-gqa");
        let json = std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap();
        vec![
            (
                "word-level (the fixtures')",
                serde_json::from_str(&json).unwrap(),
            ),
            ("byte-level BPE", byte_level(&text)),
            (
                "SentencePiece BPE (Llama 2)",
                sentencepiece(&text, true, false),
            ),
            (
                "SentencePiece BPE (Gemma)",
                sentencepiece(&text, false, true),
            ),
        ]
    })
}

/// Every tokenizer kind, named.
fn tokenizers() -> Vec<(String, tempfile::TempDir, TextTokenizer)> {
    let mut out = vec![];
    for (name, json) in kinds() {
        let (dir, tok) = load(json);
        out.push((name.to_string(), dir, tok));
    }
    // Real models' tokenizers where a machine has them: directories holding a tokenizer.json.
    for dir in std::env::var("SURGERY_TEST_TOKENIZERS")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
    {
        let tok = TextTokenizer::load(Path::new(dir)).unwrap();
        out.push((dir.to_string(), tempfile::tempdir().unwrap(), tok));
    }
    out
}

#[test]
fn streamed_ids_are_the_whole_texts() {
    let texts = texts();
    for (name, _dir, tok) in tokenizers() {
        for (text_name, text) in &texts {
            let whole = tok.encode(text).unwrap();
            assert!(
                whole.len() > 1000 || text_name.contains("check"),
                "{text_name}"
            );
            for span in [
                TextSpan {
                    offset: 0,
                    tokens: usize::MAX,
                },
                TextSpan {
                    offset: whole.len() / 3,
                    tokens: 700,
                },
            ] {
                let got = encode_with(&tok, &mut memory(text), span, SMALL)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{name}, {text_name}: windows disagreed"));
                assert_eq!(got, SpanIds::of(&whole, span), "{name}, {text_name}");
            }
        }
    }
}

#[test]
fn tiny_windows_cut_words_and_characters_and_still_agree() {
    // Cuts fall inside words and multi-byte characters; where a window disagrees with the next,
    // the whole text is tokenized instead: the ids are the whole text's either way.
    let text = "Grüße, 東京 😀 naïve\n\n  indented\tcode();\r\n".repeat(20)
        + &"wordwithoutanyspace".repeat(30);
    let span = TextSpan {
        offset: 0,
        tokens: usize::MAX,
    };
    for (name, _dir, tok) in tokenizers() {
        let whole = tok.encode(&text).unwrap();
        let (got, sha) = encode_text_with(&tok, &|| Ok(memory(&text)), span, TINY).unwrap();
        assert_eq!(got, SpanIds::of(&whole, span), "{name}");
        assert_eq!(sha, crate::digest::sha256_hex(text.as_bytes()));
    }
}

#[test]
fn only_the_span_is_read_and_short_texts_are_counted_whole() {
    let (_dir, tok) = load(&kinds()[1].1);
    let text = "A line of plain prose, repeated.\n\n".repeat(100_000);
    let mut reader = memory(&text);
    let span = TextSpan {
        offset: 10,
        tokens: 100,
    };
    let got = encode_span(&tok, &mut reader, span).unwrap().unwrap();
    assert_eq!(
        got,
        SpanIds::of(&tok.encode(&text[..10_000]).unwrap(), span)
    );
    // One window of the smallest size, and its lookahead, were read of the 3.4 MB.
    let mut rest = String::new();
    while reader.read_into(&mut rest, 1 << 20).unwrap() {}
    assert!(rest.len() > text.len() - (SIZES.min + SIZES.lookahead + (1 << 20)));
    // A text shorter than the span: every token counted, `total` is the text's.
    let short = "Just a few words.";
    let all = tok.encode(short).unwrap();
    let span = TextSpan {
        offset: 2,
        tokens: 1000,
    };
    let got = encode_span(&tok, &mut memory(short), span)
        .unwrap()
        .unwrap();
    assert_eq!((got.total, got.ids.as_slice()), (all.len(), &all[2..]));
    let empty = encode_span(&tok, &mut memory(""), span).unwrap().unwrap();
    assert_eq!((empty.total, empty.ids.len()), (0, 0));
}

#[test]
fn a_tokenizer_reaching_past_the_window_falls_back_to_the_whole_text() {
    // BPE over the whole text with one merge, `a a`: a run of `a` is paired from its start, so a
    // window starting an odd number of bytes into the run pairs it differently.
    let json = bpe(
        vec!["<unk>".into(), "a".into(), "\n".into()],
        &[("a".into(), "a".into())],
        json!({"model": {"unk_token": "<unk>"}}),
    );
    let (_dir, tok) = load(&json);
    let text = "a".repeat(5001);
    let span = TextSpan {
        offset: 0,
        tokens: usize::MAX,
    };
    let odd = Sizes {
        context: 7,
        ..SMALL
    };
    assert_eq!(
        encode_with(&tok, &mut memory(&text), span, odd).unwrap(),
        None
    );
    let (got, _) = encode_text_with(&tok, &|| Ok(memory(&text)), span, odd).unwrap();
    assert_eq!(got, SpanIds::of(&tok.encode(&text).unwrap(), span));
}

#[test]
fn files_are_streamed_and_hashed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.txt");
    let text = "tok5 tok17 tok9\n\n".repeat(10_000);
    std::fs::write(&path, &text).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-f32-gqa");
    let tok = TextTokenizer::load(&fixture).unwrap();
    let source = TextSource::File(TextFile::new(&path));
    let span = TextSpan {
        offset: 3,
        tokens: 5,
    };
    let (got, sha) = encode_text(&tok, &|| source.open("--text", None), span).unwrap();
    assert_eq!(got.ids, [5, 17, 9, 5, 17]);
    assert_eq!(sha, crate::digest::sha256_hex(text.as_bytes()));
    assert!(boundary("ab\n\ncd ef", 0, 8) == 4 && boundary("ab\ncd ef", 0, 7) == 3);
    assert_eq!(
        (boundary("abc def", 0, 6), boundary("abcdef", 0, 5)),
        (3, 5)
    );
    assert_eq!(boundary("aé", 0, 2), 1);
}
