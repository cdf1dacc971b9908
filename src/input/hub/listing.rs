//! What a hub says, checked before anything reaches the disk (pure: bytes and header values in,
//! validated values or a reason out). A hub is untrusted input: a file name becomes a path under the
//! cache, an ETag a blob's file name, a commit hash a snapshot folder's name, so each is held to the
//! shape the real hub gives it, as git refuses `..` and absolute paths in a tree and
//! `huggingface_hub` refuses names that leave the repo's folder.

use serde::Deserialize;

/// Largest revision listing accepted (16 MiB: about 100,000 file names).
pub const MAX_LISTING_BYTES: u64 = 16 << 20;

/// Most files a listing may name.
pub const MAX_FILES: usize = 100_000;

/// Longest file name accepted, in bytes (the hub's paths are far shorter), and longest component
/// (what Linux file systems allow).
pub const MAX_NAME_BYTES: usize = 1000;
const MAX_COMPONENT_BYTES: usize = 255;

/// A revision's listing: its commit and the names of its files, every one checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The commit the revision resolved to (40 lowercase hex digits).
    pub commit: String,
    /// The repo's files, relative names checked by [`check_file_name`].
    pub files: Vec<String>,
}

#[derive(Deserialize)]
struct RawListing {
    sha: Option<serde_json::Value>,
    siblings: Option<Vec<RawSibling>>,
}

#[derive(Deserialize)]
struct RawSibling {
    rfilename: Option<serde_json::Value>,
}

impl Listing {
    /// Parses and checks the answer to `GET /api/models/{repo}/revision/{rev}`.
    pub fn parse(body: &[u8]) -> Result<Listing, String> {
        if body.len() as u64 > MAX_LISTING_BYTES {
            return Err(format!(
                "the revision listing is over {} MiB",
                MAX_LISTING_BYTES >> 20
            ));
        }
        let raw: RawListing = serde_json::from_slice(body)
            .map_err(|e| format!("the revision listing is not the JSON the hub sends: {e}"))?;
        let commit = match raw.sha {
            Some(serde_json::Value::String(s)) => check_commit(&s)?,
            Some(_) => return Err("the revision listing's `sha` is not a string".into()),
            None => return Err("the revision listing has no `sha` (commit)".into()),
        };
        let siblings = raw
            .siblings
            .ok_or("the revision listing has no `siblings` (file list)")?;
        if siblings.len() > MAX_FILES {
            return Err(format!(
                "the revision listing names {} files, more than the {MAX_FILES} accepted",
                siblings.len()
            ));
        }
        let mut files = Vec::with_capacity(siblings.len());
        for sibling in siblings {
            let Some(serde_json::Value::String(name)) = sibling.rfilename else {
                return Err("a file of the revision listing has no `rfilename` string".into());
            };
            check_file_name(&name)?;
            files.push(name);
        }
        Ok(Listing { commit, files })
    }
}

/// A file name a hub gave, shown safely (control characters escaped, long names cut).
pub fn shown(name: &str) -> String {
    let mut s: String = name.chars().take(120).collect();
    if s.len() < name.len() {
        s.push('…');
    }
    crate::error::escape_controls(&s)
}

/// Accepts `name` as a path inside a repo: relative, `/`-separated, no empty, `.` or `..`
/// component, no backslash, NUL or control character, at most [`MAX_NAME_BYTES`] bytes.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "the hub listed an unsafe file name `{}` ({why}); refusing the repo",
            shown(name)
        ))
    };
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse(&format!("over {MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(char::is_control) {
        return refuse("a control character");
    }
    if name.contains('\\') {
        return refuse("a backslash");
    }
    if name.starts_with('/') {
        return refuse("an absolute path");
    }
    for component in name.split('/') {
        match component {
            "" => return refuse("an empty path component"),
            "." | ".." => return refuse(&format!("a `{component}` component")),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return refuse(&format!("a component over {MAX_COMPONENT_BYTES} bytes"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Accepts a commit hash: 40 hex digits (returned lowercase).
pub fn check_commit(commit: &str) -> Result<String, String> {
    if commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(commit.to_ascii_lowercase())
    } else {
        Err(format!(
            "the hub gave `{}` as a commit, not 40 hex digits",
            shown(commit)
        ))
    }
}

/// A file's ETag as the hub sends it (`"…"`, maybe weak `W/"…"`), checked to be a blob name: the
/// git blob hash (40 hex) or, for large (LFS) files, the content's SHA-256 (64 hex).
pub fn check_etag(raw: &str) -> Result<Etag, String> {
    let value = raw.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    let value = value.trim_matches('"');
    if !value.bytes().all(|b| b.is_ascii_hexdigit()) || !(value.len() == 40 || value.len() == 64) {
        return Err(format!(
            "the hub gave `{}` as the file's ETag, not a 40- or 64-digit hash",
            shown(raw)
        ));
    }
    Ok(Etag(value.to_ascii_lowercase()))
}

/// A checked ETag: safe as a file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Etag(String);

impl Etag {
    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the content, when the ETag is one (a large file's).
    pub fn sha256(&self) -> Option<&str> {
        (self.0.len() == 64).then_some(self.0.as_str())
    }
}

/// The total size in a `Content-Range` value (`bytes 0-0/1234`).
pub fn content_range_total(value: &str) -> Result<u64, String> {
    value
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.rsplit_once('/'))
        .and_then(|(_, total)| total.trim().parse::<u64>().ok())
        .ok_or_else(|| format!("the hub sent `{}` as Content-Range", shown(value)))
}

/// The first byte a `Content-Range` value starts at (`bytes 100-199/200` → 100).
pub fn content_range_start(value: &str) -> Option<u64> {
    value
        .trim()
        .strip_prefix("bytes ")?
        .split_once('-')?
        .0
        .trim()
        .parse()
        .ok()
}

/// `s` with every byte outside the URL path's unreserved set percent-encoded, `/` kept when
/// `keep_slash` (file names) and encoded otherwise (revisions such as `refs/pr/1`).
pub fn url_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_that_leave_the_repo_are_refused() {
        for ok in [
            "config.json",
            "a/b/model-00001-of-00002.safetensors",
            ".gitattributes",
            "x..y/..z",
        ] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("/SOME/ABSOLUTE/dir/f.json", "absolute"),
            ("x/../../../../../../escaped.txt", "`..`"),
            ("..", "`..`"),
            ("a/./b", "`.`"),
            ("a//b", "empty path component"),
            ("a/", "empty path component"),
            ("", "empty"),
            ("a\\..\\b", "backslash"),
            ("a\0b", "control"),
            ("a\nb", "control"),
        ] {
            let e = check_file_name(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains("refusing the repo"),
                "{bad}: {e}"
            );
            assert!(!e.contains('\n') && !e.contains('\0'), "{e}");
        }
        assert!(check_file_name(&"a".repeat(1001)).is_err());
        assert!(check_file_name(&format!("{}/b", "a".repeat(256))).is_err());
    }

    #[test]
    fn a_listing_is_checked_whole() {
        let c = "c0ffee0123456789abcdef0123456789abcdef01";
        let ok = format!(r#"{{"sha":"{c}","siblings":[{{"rfilename":"config.json"}}]}}"#);
        assert_eq!(
            Listing::parse(ok.as_bytes()),
            Ok(Listing {
                commit: c.into(),
                files: vec!["config.json".into()]
            })
        );
        for bad in [
            r#"{"sha":"../x","siblings":[]}"#.to_string(),
            r#"{"siblings":[]}"#.to_string(),
            r#"{"sha":5,"siblings":[]}"#.to_string(),
            format!(r#"{{"sha":"{c}"}}"#),
            format!(r#"{{"sha":"{c}","siblings":[{{"rfilename":"../x"}}]}}"#),
            format!(r#"{{"sha":"{c}","siblings":[{{"rfilename":7}}]}}"#),
            format!(r#"{{"sha":"{c}","siblings":[{{}}]}}"#),
            "[1,2]".to_string(),
            "\u{0}".to_string(),
        ] {
            assert!(Listing::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn commits_and_etags_are_hashes() {
        assert!(check_commit("../../../../../../tmp/x").is_err());
        assert!(check_commit(&"g".repeat(40)).is_err());
        assert_eq!(check_commit(&"AB".repeat(20)).unwrap(), "ab".repeat(20));
        let lfs = "e3".repeat(32);
        let e = check_etag(&format!("\"{lfs}\"")).unwrap();
        assert_eq!(e.sha256(), Some(lfs.as_str()));
        let git = check_etag(&format!("W/\"{}\"", "a1".repeat(20))).unwrap();
        assert_eq!((git.as_str().len(), git.sha256()), (40, None));
        for bad in ["\"../../x\"", "\"\"", "\"abc\"", &"a".repeat(65)] {
            assert!(check_etag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_ranges_and_url_encoding() {
        assert_eq!(content_range_total("bytes 0-0/1234"), Ok(1234));
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert!(content_range_total("bytes 0-0/*").is_err());
        assert!(content_range_total("items 0-0/5").is_err());
        assert_eq!(url_encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(url_encode("a b/c.json", true), "a%20b/c.json");
    }
}
