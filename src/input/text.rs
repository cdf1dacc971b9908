//! Texts to calibrate on or score: a UTF-8 file the user names (read with bounded memory:
//! [`super::text_file`]), or one of the two samples built into the binary (`data/builtin/`, see
//! its README): the calibration text `--fit act` uses without `--calibrate` (pieces of several
//! domains, its dialogue as question/answer pairs that a model with a chat template reads through
//! it), and the held-out sample of the quality check and of `eval` without `--text`. The two
//! samples are disjoint.

use super::text_file::TextReader;
pub use super::text_file::DEFAULT_MAX_TEXT_SIZE;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// The built-in calibration text: one JSON piece per line (`data/builtin/README.md`).
const CALIBRATION: &str = include_str!("../../data/builtin/calibration.jsonl");
/// The built-in held-out sample.
const CHECK: &str = include_str!("../../data/builtin/check.txt");
/// What separates the pieces of a text.
const PIECE_BREAK: &str = "\n\n";

/// One turn of a conversation, as chat templates read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

/// A piece of a built-in text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Running text.
    Text(String),
    /// A conversation (a question and its answer).
    Dialogue(Vec<Message>),
}

/// A line of `calibration.jsonl`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PieceLine {
    domain: String,
    #[allow(dead_code)]
    source: String,
    text: Option<String>,
    messages: Option<Vec<Message>>,
}

/// Writes a text's conversations out: through the model's chat template, or `None` for plain
/// text (each turn a paragraph).
pub type RenderDialogue<'a> = Option<&'a dyn Fn(&[&[Message]]) -> Result<Vec<String>>>;

/// One of the texts compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// What `--fit act` calibrates on without `--calibrate`.
    Calibration,
    /// The held-out sample: the quality check, and `eval` without `--text`.
    Check,
}

impl Builtin {
    /// The text's pieces, in order.
    pub fn pieces(self) -> Result<Vec<Piece>> {
        match self {
            Builtin::Check => Ok(vec![Piece::Text(CHECK.to_string())]),
            Builtin::Calibration => CALIBRATION
                .lines()
                .enumerate()
                .map(|(i, line)| {
                    let bad = |why: String| {
                        Error::bug(format!("built-in calibration.jsonl line {}: {why}", i + 1))
                    };
                    let piece: PieceLine =
                        serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
                    match (piece.text, piece.messages) {
                        (Some(text), None) => Ok(Piece::Text(text)),
                        (None, Some(m)) if piece.domain == "dialogue" => Ok(Piece::Dialogue(m)),
                        _ => Err(bad("a piece has text or, for dialogue, messages".into())),
                    }
                })
                .collect(),
        }
    }
}

/// The pieces joined into one text, each conversation written by `render` (or as plain text).
fn join(pieces: &[Piece], render: RenderDialogue<'_>) -> Result<String> {
    let conversations: Vec<&[Message]> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Dialogue(m) => Some(m.as_slice()),
            Piece::Text(_) => None,
        })
        .collect();
    let mut rendered = match render {
        Some(render) => render(&conversations)?,
        None => conversations
            .iter()
            .map(|m| {
                let turns: Vec<&str> = m.iter().map(|t| t.content.as_str()).collect();
                turns.join(PIECE_BREAK)
            })
            .collect(),
    }
    .into_iter();
    let mut parts = Vec::with_capacity(pieces.len());
    for piece in pieces {
        parts.push(match piece {
            Piece::Text(t) => t.clone(),
            Piece::Dialogue(_) => rendered
                .next()
                .ok_or_else(|| Error::bug("a conversation was not rendered"))?,
        });
    }
    Ok(parts.join(PIECE_BREAK))
}

/// A text file the user names, and the most bytes of it read (`--max-text-size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextFile {
    /// The file, as given on the command line.
    pub path: PathBuf,
    /// A larger file is refused.
    pub max_bytes: u64,
}

impl TextFile {
    /// `path` with the default limit, [`DEFAULT_MAX_TEXT_SIZE`].
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TextFile {
            path: path.into(),
            max_bytes: DEFAULT_MAX_TEXT_SIZE,
        }
    }
}

/// Where a text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSource {
    /// A file.
    File(TextFile),
    /// A built-in sample.
    Builtin(Builtin),
}

/// A text read into memory, with the SHA-256 of its bytes.
#[derive(Debug, Clone)]
pub struct LoadedText {
    /// The text.
    pub text: String,
    /// SHA-256 of its UTF-8 bytes.
    pub sha256: String,
}

impl TextSource {
    /// Opens the text for reading piece by piece, a built-in one's conversations written by
    /// `render`; a file that is not a regular one, is larger than its limit, cannot be read or is
    /// not UTF-8 is an error naming `option`.
    pub fn open(&self, option: &str, render: RenderDialogue<'_>) -> Result<TextReader> {
        match self {
            TextSource::Builtin(b) => Ok(TextReader::memory(
                join(&b.pieces()?, render)?,
                option,
                &self.to_string(),
            )),
            TextSource::File(file) => TextReader::file(&file.path, option, file.max_bytes),
        }
    }

    /// Reads the whole text (see [`TextSource::open`]).
    pub fn load(&self, option: &str, render: RenderDialogue<'_>) -> Result<LoadedText> {
        let (text, sha256) = self.open(option, render)?.read_all()?;
        Ok(LoadedText { text, sha256 })
    }

    /// The file, for a command line that reproduces a run (`None` for a built-in text, which is
    /// what the option's absence means).
    pub fn file(&self) -> Option<&PathBuf> {
        match self {
            TextSource::File(file) => Some(&file.path),
            TextSource::Builtin(_) => None,
        }
    }
}

impl fmt::Display for TextSource {
    /// The file's path as given, or `built-in:calibration` / `built-in:check`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextSource::File(file) => write!(f, "{}", file.path.display()),
            TextSource::Builtin(Builtin::Calibration) => f.write_str("built-in:calibration"),
            TextSource::Builtin(Builtin::Check) => f.write_str("built-in:check"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_hex;

    fn plain(b: Builtin) -> String {
        TextSource::Builtin(b).load("--text", None).unwrap().text
    }

    #[test]
    fn the_builtin_samples_are_disjoint_prose() {
        let (cal, check) = (plain(Builtin::Calibration), plain(Builtin::Check));
        assert!(cal.len() > 200_000 && check.len() > 7_000);
        assert_eq!(check, CHECK);
        // No paragraph of one appears in the other.
        for p in check.split("\n\n").filter(|p| p.len() > 80) {
            assert!(!cal.contains(p), "{p}");
        }
        let loaded = TextSource::Builtin(Builtin::Check)
            .load("--text", None)
            .unwrap();
        assert_eq!(loaded.sha256, sha256_hex(check.as_bytes()));
        assert_eq!(
            TextSource::Builtin(Builtin::Check).to_string(),
            "built-in:check"
        );
    }

    #[test]
    fn every_prefix_of_the_builtin_calibration_mixes_its_domains() {
        // The first ~8,000 tokens (about 32,000 characters) hold every domain, and so do the
        // first ~16,000 characters.
        let lines: Vec<PieceLine> = CALIBRATION
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut all: Vec<&str> = lines.iter().map(|l| l.domain.as_str()).collect();
        all.sort_unstable();
        all.dedup();
        assert!(all.len() >= 6, "{all:?}");
        for limit in [16_000, 32_000] {
            let (mut seen, mut chars) = (Vec::new(), 0);
            for l in &lines {
                if chars >= limit {
                    break;
                }
                chars += l.text.as_ref().map_or(500, String::len);
                seen.push(l.domain.as_str());
            }
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, all, "the first {limit} characters");
        }
    }

    #[test]
    fn dialogue_is_rendered_by_the_model_or_as_paragraphs() {
        let pieces = Builtin::Calibration.pieces().unwrap();
        let conversations = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Dialogue(_)))
            .count();
        assert!(conversations >= 100, "{conversations}");
        let tagged = |c: &[&[Message]]| -> Result<Vec<String>> {
            Ok(c.iter()
                .map(|m| format!("<chat>{}</chat>", m.len()))
                .collect())
        };
        let text = TextSource::Builtin(Builtin::Calibration)
            .load("--calibrate", Some(&tagged))
            .unwrap()
            .text;
        assert_eq!(text.matches("<chat>2</chat>").count(), conversations);
        assert!(!plain(Builtin::Calibration).contains("<chat>"));
    }

    #[test]
    fn unreadable_and_non_utf8_files_name_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TextSource::File(TextFile::new(dir.path().join("missing.txt")));
        let e = missing.load("--check-text", None).unwrap_err().to_string();
        assert!(e.starts_with("--check-text: cannot read"), "{e}");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, [0xff, 0xfe]).unwrap();
        let e = TextSource::File(TextFile::new(bad))
            .load("--text", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not UTF-8"), "{e}");
    }
}
