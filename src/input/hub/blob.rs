//! One file of a repo into the cache: its metadata (ETag, commit, size) first, refused before a byte
//! is written when it is over the limit for its kind or inconsistent; then its body into
//! `blobs/{etag}.incomplete`, resumed where an earlier run stopped, counted against the declared
//! size and hashed as it arrives; renamed to `blobs/{etag}` only when the length is the declared
//! one and, for a large (LFS) file, the SHA-256 is its ETag. A mismatch deletes the partial file
//! and says so: the cache never holds an unverified blob.

use super::client::{Answer, Client, Follow};
use super::listing::{
    check_commit, check_etag, content_range_start, content_range_total, shown, Etag,
};
use super::store::Store;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

/// What the hub says of a file before its body is asked for.
#[derive(Debug)]
pub struct Remote {
    /// The checked ETag: the blob's name.
    pub etag: Etag,
    /// The declared size in bytes.
    pub size: u64,
    /// Where the body is (the resolve URL, or where it redirects off the hub).
    pub url: String,
}

/// A status that is not a success, as text.
fn refused(answer: &Answer) -> Option<String> {
    let status = answer.status();
    (status.is_client_error() || status.is_server_error())
        .then(|| format!("http status: {}", status.as_u16()))
}

/// The declared total size of a ranged answer (`Content-Range`), else its `Content-Length`.
fn declared_size(answer: &Answer) -> Result<u64, String> {
    if let Some(range) = answer.header("content-range") {
        return content_range_total(range);
    }
    answer
        .header("content-length")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "the hub did not say the file's size (no Content-Range)".to_string())
}

/// Asks for `url`'s metadata (`Range: bytes=0-0`, as `huggingface_hub`'s HEAD): the ETag and
/// commit of the hub's answer, the size from `X-Linked-Size` or the storage's `Content-Range`.
/// A commit other than `commit` is refused.
pub fn metadata(client: &Client, url: &str, commit: &str) -> Result<Remote, String> {
    let answer = client.get(url, Some("bytes=0-0"), Follow::SameOrigin)?;
    if let Some(e) = refused(&answer) {
        return Err(e);
    }
    let etag = answer
        .header("x-linked-etag")
        .or_else(|| answer.header("etag"))
        .ok_or("the hub sent no ETag")?;
    let etag = check_etag(etag)?;
    if let Some(said) = answer.header("x-repo-commit") {
        let said = check_commit(said)?;
        if said != commit {
            return Err(format!(
                "the hub answered for commit {said}, but listed the revision at {commit}"
            ));
        }
    }
    let Some(next) = answer.location()? else {
        let size = declared_size(&answer)?;
        return Ok(Remote {
            etag,
            size,
            url: answer.url,
        });
    };
    let size = match answer.header("x-linked-size") {
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("the hub sent `{}` as X-Linked-Size", shown(s)))?,
        None => {
            let stored = client.get(&next, Some("bytes=0-0"), Follow::Any)?;
            if let Some(e) = refused(&stored) {
                return Err(e);
            }
            declared_size(&stored)?
        }
    };
    Ok(Remote {
        etag,
        size,
        url: next,
    })
}

/// A bar for `name`, as `hf-hub` draws one (shown only when `show`).
fn bar(show: bool, name: &str, size: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
    ) {
        bar.set_style(style);
    }
    let chars: Vec<char> = name.chars().collect();
    let message = if chars.len() > 30 {
        format!("..{}", chars[chars.len() - 30..].iter().collect::<String>())
    } else {
        name.to_string()
    };
    bar.set_message(message);
    bar
}

/// Takes the partial file's lock, waiting while another process downloads the same blob.
fn lock(file: &File) -> std::io::Result<()> {
    use rustix::fs::{flock, FlockOperation};
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The SHA-256 state of the first `len` bytes of `file`.
fn hash_prefix(file: &mut File, len: u64) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(0))?;
    let mut reader = (&mut *file).take(len);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    file.seek(SeekFrom::Start(len))?;
    Ok(hasher)
}

/// Why a download failed: a cause in words, and whether the partial file must go (it holds bytes
/// the hub cannot be trusted for) or may stay for the next run to resume.
pub struct Failed {
    /// The cause.
    pub message: String,
    /// The partial file was removed.
    pub discarded: bool,
}

/// Downloads `remote` into the store's blob for it (verified), `show`ing a bar.
pub fn download(
    client: &Client,
    store: &Store,
    name: &str,
    remote: &Remote,
    show: bool,
) -> Result<(), Failed> {
    let keep = |message: String| Failed {
        message,
        discarded: false,
    };
    let blob = store.blob(&remote.etag);
    let partial = store.incomplete(&remote.etag);
    std::fs::create_dir_all(store.blobs())
        .map_err(|e| keep(format!("{}: {e}", store.blobs().display())))?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(false)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&partial)
        .map_err(|e| keep(format!("{}: {e}", partial.display())))?;
    lock(&file).map_err(|e| keep(format!("{}: {e}", partial.display())))?;
    if blob.is_file() {
        // Another process finished it while this one waited.
        let _ = std::fs::remove_file(&partial);
        return Ok(());
    }
    let result = receive(client, &mut file, name, remote, show);
    let finish = result.and_then(|()| {
        std::fs::rename(&partial, &blob).map_err(|e| Failed {
            message: format!("{}: {e}", blob.display()),
            discarded: false,
        })
    });
    if let Err(failed) = &finish {
        if failed.discarded {
            let _ = std::fs::remove_file(&partial);
        }
    }
    finish
}

/// Fetches the body into `file` (resuming from its length), checks it whole.
fn receive(
    client: &Client,
    file: &mut File,
    name: &str,
    remote: &Remote,
    show: bool,
) -> Result<(), Failed> {
    let io = |path: &str, e: std::io::Error| Failed {
        message: format!("{path}: {e}"),
        discarded: false,
    };
    let discard = |message: String| Failed {
        message,
        discarded: true,
    };
    let keep = |message: String| Failed {
        message,
        discarded: false,
    };
    let mut have = file.metadata().map_err(|e| io(name, e))?.len();
    if have > remote.size {
        have = 0;
    }
    let range = format!("bytes={have}-");
    let answer = client
        .get(&remote.url, Some(&range), Follow::Any)
        .map_err(keep)?;
    if let Some(e) = refused(&answer) {
        return Err(keep(e));
    }
    // A server that ignores the range sends it all again: start over.
    let start = match answer.header("content-range") {
        Some(r) => content_range_start(r)
            .ok_or_else(|| discard(format!("the hub sent `{}` as Content-Range", shown(r))))?,
        None => 0,
    };
    if start != have && start != 0 {
        return Err(discard(format!(
            "the hub answered a request for byte {have} on with byte {start} on"
        )));
    }
    file.set_len(start).map_err(|e| io(name, e))?;
    let mut hasher = hash_prefix(file, start).map_err(|e| io(name, e))?;
    let expected = remote.size - start;
    if let Some(length) = answer.header("content-length") {
        let length: u64 = length.trim().parse().map_err(|_| {
            discard(format!(
                "the hub sent `{}` as Content-Length",
                shown(length)
            ))
        })?;
        if length != expected {
            return Err(discard(format!(
                "the hub declared {} bytes but its answer holds {length} of the {expected} still missing",
                remote.size
            )));
        }
    }
    let bar = bar(show, name, remote.size);
    bar.set_position(start);
    let mut body = answer.response.into_body().into_reader();
    let mut buffer = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(keep(client.stalled()))
            }
            Err(e) => return Err(keep(format!("I/O error {e}"))),
        };
        got += n as u64;
        if got > expected {
            return Err(discard(format!(
                "the hub sent more than the {} bytes it declared",
                remote.size
            )));
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(|e| io(name, e))?;
        bar.inc(n as u64);
    }
    bar.finish();
    if got != expected {
        return Err(keep(format!(
            "the transfer ended after {} of {} bytes (run again to resume)",
            start + got,
            remote.size
        )));
    }
    file.flush().map_err(|e| io(name, e))?;
    verify(hasher, &remote.etag)
}

/// The hash check of a complete body.
fn verify(hasher: Sha256, etag: &Etag) -> Result<(), Failed> {
    let Some(expected) = etag.sha256() else {
        return Ok(());
    };
    let got = crate::digest::hex(&hasher.finalize());
    if got == expected {
        return Ok(());
    }
    Err(Failed {
        message: format!(
            "its SHA-256 is {got}, but the hub's ETag says {expected}; the download was deleted from the cache"
        ),
        discarded: true,
    })
}

/// Whether an existing blob is whole: its size, and its SHA-256 where the ETag is one.
pub fn blob_is_whole(path: &Path, remote: &Remote) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.len() != remote.size {
        return false;
    }
    match remote.etag.sha256() {
        Some(expected) => crate::digest::sha256_file(path).is_ok_and(|got| got == expected),
        None => true,
    }
}
