//! `SHA256SUMS`: one `<hex>  <relative path>` line per file, sorted by path, in the format
//! `sha256sum -c` reads.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The checksum file's name.
pub const FILE_NAME: &str = "SHA256SUMS";

/// Formats digests (relative path to hex SHA-256).
pub fn format(digests: &BTreeMap<String, String>) -> String {
    digests
        .iter()
        .map(|(path, hex)| format!("{hex}  {path}\n"))
        .collect()
}

/// Parses a checksum file's text into (relative path, hex digest) pairs.
pub fn parse(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || {
            Error::invalid(
                path,
                format!("line {}: expected `<sha256 hex>  <file>`", n + 1),
            )
        };
        let (hex, name) = line.split_once(' ').ok_or_else(bad)?;
        let name = name
            .strip_prefix(' ')
            .or_else(|| name.strip_prefix('*'))
            .ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty() {
            return Err(bad());
        }
        entries.push((name.to_string(), hex.to_ascii_lowercase()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let mut d = BTreeMap::new();
        d.insert("b.json".to_string(), "a".repeat(64));
        d.insert("a.safetensors".to_string(), "0".repeat(64));
        let text = format(&d);
        assert!(text.starts_with(&format!("{}  a.safetensors\n", "0".repeat(64))));
        let parsed = parse(&text, Path::new("SHA256SUMS")).unwrap();
        assert_eq!(parsed[1], ("b.json".to_string(), "a".repeat(64)));
        assert!(parse("xyz  file\n", Path::new("SHA256SUMS")).is_err());
    }
}
