//! Reading a text the user names (`--calibrate`, `--check-text`, `--text`) with bounded memory:
//! only a regular file is opened (a FIFO, a device, a directory or a socket is refused from its
//! metadata before `open`, so nothing blocks there, and again from the open handle), at most
//! `--max-text-size` bytes of it, read piece by piece as UTF-8 and hashed as it goes
//! ([`TextReader`]), so what a pass keeps does not grow with the file.

use crate::error::{Error, Result};
use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};
use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// The largest text file read unless `--max-text-size` says otherwise: 256 MiB, some 60 million
/// tokens of English, thousands of times what a pass uses (8,192 calibration tokens, 4,096
/// scored by default); only the tokens a pass uses are tokenized, but the whole file is hashed
/// for the records, which this bounds to about a second.
pub const DEFAULT_MAX_TEXT_SIZE: u64 = 256 << 20;
/// Bytes read from the file at a time.
const READ_PIECE: usize = 1 << 20;

/// What a file that is not a regular one is, as the refusal names it (`None`: a regular file).
fn irregular(meta: &Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("neither a file nor a directory")
    }
}

/// `size` in the largest binary unit that divides it (`256 MiB`), else in bytes.
fn show_size(size: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if size >= 1 << shift && size % (1 << shift) == 0 {
            return format!("{} {unit}", size >> shift);
        }
    }
    format!("{size} bytes")
}

/// Where a text comes from and what it is called in errors.
struct Origin {
    /// The option that named it.
    option: String,
    /// The file as given (or the built-in text's name).
    name: String,
    /// The most bytes read (`u64::MAX` for a built-in text).
    limit: u64,
}

impl Origin {
    fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::usage(&self.option, message.to_string())
    }

    fn refuse_irregular(&self, meta: &Metadata) -> Result<()> {
        match irregular(meta) {
            None => Ok(()),
            Some(kind) => Err(self.error(format!(
                "`{}` is not a regular file ({kind}); give a text file",
                self.name
            ))),
        }
    }

    /// The refusal of a file of at least `size` bytes (`what` says how it was found).
    fn too_large(&self, what: String, size: u64) -> Error {
        self.error(format!(
            "`{}` {what}, more than --max-text-size {}: give a smaller file, or raise the limit (e.g. --max-text-size {}GiB)",
            self.name,
            show_size(self.limit),
            size.div_ceil(1 << 30).max(1),
        ))
    }
}

/// A text read piece by piece: whole UTF-8 characters, hashed as they are read.
pub struct TextReader {
    source: Box<dyn Read>,
    origin: Origin,
    hasher: Sha256,
    /// The bytes of a character cut by the last read.
    carry: Vec<u8>,
    /// Bytes read so far.
    read: u64,
    ended: bool,
}

impl std::fmt::Debug for TextReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextReader")
            .field("name", &self.origin.name)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl TextReader {
    /// Opens `path` (named by `option`): refused unless it is a regular file (checked before
    /// opening, so a FIFO cannot block `open`, and again on the open handle) of at most `limit`
    /// bytes.
    pub fn file(path: &Path, option: &str, limit: u64) -> Result<Self> {
        let origin = Origin {
            option: option.to_string(),
            name: path.display().to_string(),
            limit,
        };
        let cannot = |e: std::io::Error| origin.error(format!("cannot read {}: {e}", origin.name));
        origin.refuse_irregular(&std::fs::metadata(path).map_err(cannot)?)?;
        // O_NONBLOCK: should the path have been replaced by a FIFO since, `open` still returns.
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file =
            File::from(rustix::fs::open(path, flags, Mode::empty()).map_err(|e| cannot(e.into()))?);
        let meta = file.metadata().map_err(cannot)?;
        origin.refuse_irregular(&meta)?;
        if meta.len() > limit {
            return Err(origin.too_large(format!("is {} bytes", meta.len()), meta.len()));
        }
        // One byte past the limit tells a file that grew while being read.
        let source = Box::new(file.take(limit.saturating_add(1)));
        Ok(Self::new(source, origin))
    }

    /// A text already in memory (a built-in sample), called `name`.
    pub fn memory(text: String, option: &str, name: &str) -> Self {
        let origin = Origin {
            option: option.to_string(),
            name: name.to_string(),
            limit: u64::MAX,
        };
        Self::new(Box::new(std::io::Cursor::new(text.into_bytes())), origin)
    }

    fn new(source: Box<dyn Read>, origin: Origin) -> Self {
        TextReader {
            source,
            origin,
            hasher: Sha256::new(),
            carry: Vec::new(),
            read: 0,
            ended: false,
        }
    }

    /// Appends about `want` more bytes of text (whole characters) to `text`; `false` once the text
    /// has ended. A signal asking the run to stop ends the read with [`Error::Interrupted`].
    pub fn read_into(&mut self, text: &mut String, want: usize) -> Result<bool> {
        let mut piece = vec![0u8; want.clamp(1, READ_PIECE)];
        let mut appended = 0;
        while appended < want && !self.ended {
            crate::interrupt::check()?;
            let n = match self.source.read(&mut piece) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self
                        .origin
                        .error(format!("cannot read {}: {e}", self.origin.name)))
                }
            };
            self.read += n as u64;
            if self.read > self.origin.limit {
                return Err(self
                    .origin
                    .too_large("grew while being read".into(), self.read));
            }
            self.hasher.update(&piece[..n]);
            self.ended = n == 0;
            appended += self.decode(&piece[..n], text)?;
        }
        Ok(!self.ended)
    }

    /// Decodes `bytes` (after the carried bytes of a cut character) onto `text`; returns the bytes
    /// appended.
    fn decode(&mut self, bytes: &[u8], text: &mut String) -> Result<usize> {
        self.carry.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.carry) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() && !self.ended => e.valid_up_to(),
            Err(e) => {
                let at = self.read - self.carry.len() as u64 + e.valid_up_to() as u64;
                return Err(self.origin.error(format!(
                    "{} is not UTF-8: no character at byte {at}",
                    self.origin.name
                )));
            }
        };
        let rest = self.carry.split_off(valid);
        let done = std::mem::replace(&mut self.carry, rest);
        // Checked just above.
        text.push_str(std::str::from_utf8(&done).map_err(|e| Error::bug(e.to_string()))?);
        Ok(valid)
    }

    /// Reads what is left (hashed and checked as UTF-8, not kept) and returns the SHA-256 of the
    /// whole text's bytes.
    pub fn finish(mut self) -> Result<String> {
        let mut scratch = String::new();
        while self.read_into(&mut scratch, READ_PIECE)? {
            scratch.clear();
        }
        let digest = self.hasher.finalize();
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Reads the whole text into memory and returns it with its SHA-256.
    pub fn read_all(mut self) -> Result<(String, String)> {
        let mut text = String::new();
        while self.read_into(&mut text, READ_PIECE)? {}
        Ok((text, self.finish()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_hex;

    fn message(r: Result<TextReader>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let e = message(TextReader::file(
            Path::new("/dev/zero"),
            "--calibrate",
            1 << 20,
        ));
        assert_eq!(
            e,
            "--calibrate: `/dev/zero` is not a regular file (a character device); give a text file"
        );
        let e = message(TextReader::file(dir.path(), "--text", 1 << 20));
        assert!(e.contains("(a directory)"), "{e}");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Refused without blocking: nothing writes to the FIFO.
        let e = message(TextReader::file(&fifo, "--check-text", 1 << 20));
        assert!(
            e.starts_with("--check-text: `") && e.contains("(a FIFO)"),
            "{e}"
        );
        let e = message(TextReader::file(&dir.path().join("no"), "--text", 1));
        assert!(e.starts_with("--text: cannot read"), "{e}");
        // A symlink is followed to what it names.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(message(TextReader::file(&link, "--text", 1)).contains("(a FIFO)"));
    }

    #[test]
    fn the_size_is_limited_before_and_while_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "x".repeat(2048)).unwrap();
        let e = message(TextReader::file(&path, "--text", 1024));
        assert!(
            e.contains("is 2048 bytes, more than --max-text-size 1 KiB")
                && e.contains("raise the limit (e.g. --max-text-size 1GiB)"),
            "{e}"
        );
        // Exactly at the limit is fine; a file that grows past it after the check is refused.
        let mut r = TextReader::file(&path, "--text", 2048).unwrap();
        let mut text = String::new();
        assert!(r.read_into(&mut text, 10).unwrap());
        assert_eq!(text.len(), 10);
        let (all, sha) = r.read_all().unwrap();
        assert_eq!(all.len(), 2038);
        assert_eq!(sha, sha256_hex("x".repeat(2048).as_bytes()));
        let r = TextReader::file(&path, "--text", 2048).unwrap();
        std::fs::write(&path, "x".repeat(4096)).unwrap();
        let e = r.read_all().unwrap_err().to_string();
        assert!(e.contains("grew while being read"), "{e}");
        assert_eq!(show_size(256 << 20), "256 MiB");
        assert_eq!(show_size(1000), "1000 bytes");
    }

    #[test]
    fn characters_cut_by_a_read_are_whole_and_bad_bytes_are_named() {
        let text = "é€😀 plain".repeat(50);
        let mut r = TextReader::memory(text.clone(), "--text", "t");
        let mut got = String::new();
        // Reads of 1 byte cut every multi-byte character.
        while r.read_into(&mut got, 1).unwrap() {}
        assert_eq!(got, text);
        assert_eq!(r.finish().unwrap(), sha256_hex(text.as_bytes()));
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"ok \xff").unwrap();
        let e = TextReader::file(&bad, "--text", 100)
            .unwrap()
            .finish()
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not UTF-8: no character at byte 3"), "{e}");
        // A character cut by the end of the file.
        std::fs::write(&bad, "ok é".as_bytes().split_last().unwrap().1).unwrap();
        let e = TextReader::file(&bad, "--text", 100)
            .unwrap()
            .finish()
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not UTF-8: no character at byte 3"), "{e}");
    }
}
