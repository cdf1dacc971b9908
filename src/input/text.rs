//! Texts to calibrate on or score: a UTF-8 file the user names, or one of the two samples built
//! into the binary (`data/builtin/`, see its README): the calibration text `--fit act` uses
//! without `--calibrate`, and the held-out sample of the quality check and of `eval` without
//! `--text`. The two samples are disjoint.

use crate::digest::sha256_hex;
use crate::error::{Error, Result};
use std::fmt;
use std::path::PathBuf;

/// The built-in calibration text.
const CALIBRATION: &str = include_str!("../../data/builtin/calibration.txt");
/// The built-in held-out sample.
const CHECK: &str = include_str!("../../data/builtin/check.txt");

/// One of the texts compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// What `--fit act` calibrates on without `--calibrate`.
    Calibration,
    /// The held-out sample: the quality check, and `eval` without `--text`.
    Check,
}

impl Builtin {
    /// The text itself.
    pub fn text(self) -> &'static str {
        match self {
            Builtin::Calibration => CALIBRATION,
            Builtin::Check => CHECK,
        }
    }
}

/// Where a text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSource {
    /// A file, as given on the command line.
    File(PathBuf),
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
    /// Reads the text; a file that cannot be read or is not UTF-8 is an error naming `option`.
    pub fn load(&self, option: &str) -> Result<LoadedText> {
        let text = match self {
            TextSource::Builtin(b) => b.text().to_owned(),
            TextSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    Error::usage(option, format!("cannot read {}: {e}", path.display()))
                })?;
                String::from_utf8(bytes).map_err(|e| {
                    Error::usage(option, format!("{} is not UTF-8: {e}", path.display()))
                })?
            }
        };
        let sha256 = sha256_hex(text.as_bytes());
        Ok(LoadedText { text, sha256 })
    }

    /// The file, for a command line that reproduces a run (`None` for a built-in text, which is
    /// what the option's absence means).
    pub fn file(&self) -> Option<&PathBuf> {
        match self {
            TextSource::File(path) => Some(path),
            TextSource::Builtin(_) => None,
        }
    }
}

impl fmt::Display for TextSource {
    /// The file's path as given, or `built-in:calibration` / `built-in:check`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextSource::File(path) => write!(f, "{}", path.display()),
            TextSource::Builtin(Builtin::Calibration) => f.write_str("built-in:calibration"),
            TextSource::Builtin(Builtin::Check) => f.write_str("built-in:check"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_samples_are_disjoint_prose() {
        let (cal, check) = (Builtin::Calibration.text(), Builtin::Check.text());
        assert!(cal.len() > 100_000 && check.len() > 7_000);
        // No paragraph of one appears in the other.
        for p in check.split("\n\n").filter(|p| p.len() > 80) {
            assert!(!cal.contains(p), "{p}");
        }
        let loaded = TextSource::Builtin(Builtin::Check).load("--text").unwrap();
        assert_eq!(loaded.sha256, sha256_hex(check.as_bytes()));
        assert_eq!(
            TextSource::Builtin(Builtin::Check).to_string(),
            "built-in:check"
        );
    }

    #[test]
    fn every_prefix_of_the_builtin_calibration_mixes_its_four_domains() {
        // The first ~8,000 tokens (about 32,000 characters) hold prose, technical documentation,
        // code and dialogue, and so does the first tenth of them.
        let cal = Builtin::Calibration.text();
        for end in [6_500, 32_000] {
            let prefix = &cal[..cal.floor_char_boundary(end)];
            for marker in ["Congress", ".. code-block::", "def ", "ACT I."] {
                assert!(
                    prefix.contains(marker),
                    "{marker} not in the first {end} characters"
                );
            }
        }
    }

    #[test]
    fn unreadable_and_non_utf8_files_name_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TextSource::File(dir.path().join("missing.txt"));
        let e = missing.load("--check-text").unwrap_err().to_string();
        assert!(e.starts_with("--check-text: cannot read"), "{e}");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, [0xff, 0xfe]).unwrap();
        let e = TextSource::File(bad)
            .load("--text")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not UTF-8"), "{e}");
    }
}
