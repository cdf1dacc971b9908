//! A Hugging Face hub on loopback for the binary tests (`hub_download.rs`, `hub_hostile.rs`): it
//! answers the calls a download makes as the hub does (revision info, `resolve` with `ETag`,
//! `X-Repo-Commit` and `Content-Range`, ranged bodies; see `docs/hub-protocol.md`), and misbehaves
//! on request as a hostile or broken hub would. The real binary is pointed at it with
//! `HF_ENDPOINT`.
#![allow(dead_code)]

use crate::common::fixture;
use crate::common::read_files;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const COMMIT: &str = "c0ffee0123456789abcdef0123456789abcdef01";
/// A second branch, at the same commit as `main`.
pub const BRANCH: &str = "v2";
pub const REPO: &str = "tiny-org/tiny-llama";

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

/// What the server serves and how it misbehaves.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Only requests with `Authorization: Bearer <token>` are answered (others get 401).
    pub token: Option<String>,
    /// The first full-body request of this file is cut off halfway (the connection dropped).
    pub drop_once: Option<String>,
    /// Weights are served as the hub serves large (LFS) files: `resolve` answers 302 to an
    /// absolute URL on another path (`/cdn/...`) with `X-Linked-Etag`.
    pub lfs_redirect: bool,
    /// The `host:port` the LFS redirect points to (default: this server, as the client named it).
    pub cdn_host: Option<String>,
    /// Every request is read and never answered.
    pub stall: bool,
    /// More names in the listing (each served as `{}`).
    pub extra_names: Vec<String>,
    /// The listing's `sha` instead of [`COMMIT`].
    pub listing_sha: Option<String>,
    /// `X-Repo-Commit` of every file instead of [`COMMIT`].
    pub commit_header: Option<String>,
    /// This file's body has a byte flipped (its ETag is still the true content's SHA-256).
    pub corrupt: Option<String>,
    /// This file's body is 10 bytes short, with a `Content-Length` that says so.
    pub short: Option<String>,
    /// This file's body has 10 bytes more, with a `Content-Length` that says so.
    pub long: Option<String>,
    /// This file is declared 2 GiB (and 64 MiB of zeros are sent if its body is asked for).
    pub huge: Option<String>,
    /// Every `resolve` answers a relative redirect to itself.
    pub redirect_loop: bool,
}

pub struct Hub {
    pub addr: String,
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

/// What one server holds.
struct State {
    files: BTreeMap<String, Vec<u8>>,
    behaviour: Mutex<Behaviour>,
}

impl Hub {
    /// Serves the files of `fixture_name` as repo [`REPO`] at commit [`COMMIT`].
    pub fn start(fixture_name: &str, behaviour: Behaviour) -> Hub {
        let mut files: BTreeMap<String, Vec<u8>> = read_files(&fixture(fixture_name));
        for name in &behaviour.extra_names {
            files.insert(name.clone(), b"{}".to_vec());
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr = format!("http://127.0.0.1:{port}");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State {
            files,
            behaviour: Mutex::new(behaviour),
        });
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded: the test stops the server when it is done (or after two minutes).
            for _ in 0..120_000 {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (seen, state) = (seen2.clone(), state.clone());
                        std::thread::spawn(move || serve(stream, &state, &seen));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Hub {
            addr,
            port,
            seen,
            stop,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one request: its path and headers (lowercase names).
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, BTreeMap<String, String>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some((path, headers))
}

/// Answers the request of one connection (every answer closes it).
fn serve(stream: TcpStream, state: &State, seen: &Mutex<Vec<Seen>>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some((path, headers)) = read_request(&mut reader) else {
        return;
    };
    let request = Seen {
        path: path.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    seen.lock().unwrap().push(request.clone());
    let mut out = stream;
    let b = state.behaviour.lock().unwrap();
    if b.stall {
        drop(b);
        // Hold the connection open, silent, until the client gives up.
        let _ = reader.read(&mut [0u8; 1]);
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    if let Some(token) = &b.token {
        if request.authorization.as_deref() != Some(&format!("Bearer {token}")) {
            return respond(&mut out, "401 Unauthorized", &[], b"gated");
        }
    }
    let info = format!("/api/models/{REPO}/revision/");
    let resolve = format!("/{REPO}/resolve/");
    if let Some(rev) = path.strip_prefix(&info) {
        if !known_revision(rev) {
            return respond(&mut out, "404 Not Found", &[], b"no such revision");
        }
        let siblings: Vec<String> = state
            .files
            .keys()
            .map(|n| serde_json::json!({ "rfilename": n }).to_string())
            .collect();
        let sha = b.listing_sha.as_deref().unwrap_or(COMMIT);
        let body = format!(
            "{{\"sha\":{},\"siblings\":[{}]}}",
            serde_json::json!(sha),
            siblings.join(",")
        );
        return respond(&mut out, "200 OK", &[], body.as_bytes());
    }
    if b.redirect_loop && path.starts_with(&resolve) {
        let to_itself = path.rsplit('/').next().unwrap_or("").to_string();
        return respond(&mut out, "302 Found", &[("Location", &to_itself)], b"");
    }
    let cdn = path.strip_prefix("/cdn/");
    let Some((rev, name)) = path
        .strip_prefix(&resolve)
        .and_then(|r| r.split_once('/'))
        .or(cdn.map(|name| (COMMIT, name)))
    else {
        return respond(&mut out, "404 Not Found", &[], b"no such repo");
    };
    let (Some(bytes), true) = (state.files.get(name), known_revision(rev)) else {
        return respond(&mut out, "404 Not Found", &[], b"no such file");
    };
    let etag = format!("\"{}\"", sha256_hex(bytes));
    let commit = b
        .commit_header
        .clone()
        .unwrap_or_else(|| COMMIT.to_string());
    if b.lfs_redirect && cdn.is_none() && name.ends_with(".safetensors") {
        let host = b.cdn_host.clone().unwrap_or_else(|| hub_host(&headers));
        let location = format!("http://{host}/cdn/{name}");
        let head = [
            ("Location", location.as_str()),
            ("X-Linked-Etag", etag.as_str()),
            ("X-Repo-Commit", commit.as_str()),
        ];
        return respond(&mut out, "302 Found", &head, b"");
    }
    let metadata = request.range.as_deref() == Some("bytes=0-0");
    if b.huge.as_deref() == Some(name) {
        let total: u64 = 2 << 30;
        drop(b);
        return huge(&mut out, metadata, total, &etag, &commit);
    }
    let mut body: Vec<u8> = bytes.clone();
    if !metadata {
        if b.corrupt.as_deref() == Some(name) {
            let at = body.len() / 2;
            body[at] ^= 0x5a;
        }
        if b.short.as_deref() == Some(name) {
            body.truncate(body.len().saturating_sub(10));
        }
        if b.long.as_deref() == Some(name) {
            body.extend_from_slice(&[b' '; 10]);
        }
    }
    let start: usize = request
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = if metadata {
        1.min(body.len())
    } else {
        body.len()
    };
    let content_range = format!("bytes {start}-{}/{}", end.max(1) - 1, bytes.len());
    let head = [
        ("ETag", etag.as_str()),
        ("X-Repo-Commit", commit.as_str()),
        ("Content-Range", content_range.as_str()),
    ];
    let body = &body[start.min(end)..end];
    drop(b);
    let mut b = state.behaviour.lock().unwrap();
    if end > 1 && b.drop_once.as_deref() == Some(name) {
        b.drop_once = None;
        // Promise the whole body, send half of it, hang up.
        let _ = write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nETag: {etag}\r\nX-Repo-Commit: {commit}\r\nContent-Range: {content_range}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = out.write_all(&body[..body.len() / 2]);
        let _ = out.flush();
        return;
    }
    drop(b);
    respond(&mut out, "206 Partial Content", &head, body);
}

/// A file declared `total` bytes: one byte for metadata, else 64 MiB of zeros then a hang-up.
fn huge(out: &mut TcpStream, metadata: bool, total: u64, etag: &str, commit: &str) {
    let (length, range) = if metadata {
        (1, format!("bytes 0-0/{total}"))
    } else {
        (total, format!("bytes 0-{}/{total}", total - 1))
    };
    let _ = write!(
        out,
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {length}\r\nETag: {etag}\r\nX-Repo-Commit: {commit}\r\nContent-Range: {range}\r\nConnection: close\r\n\r\n"
    );
    let chunk = vec![0u8; 1 << 20];
    let chunks = if metadata { 0 } else { 64 };
    if metadata {
        let _ = out.write_all(b"0");
    }
    for _ in 0..chunks {
        if out.write_all(&chunk).is_err() {
            return;
        }
    }
    let _ = out.flush();
}

/// The revisions the hub knows: branches `main` and [`BRANCH`] (both at [`COMMIT`]), and the commit.
fn known_revision(rev: &str) -> bool {
    rev == "main" || rev == BRANCH || rev == COMMIT
}

/// The `host:port` the client addressed.
fn hub_host(headers: &BTreeMap<String, String>) -> String {
    headers.get("host").cloned().unwrap_or_default()
}

fn respond(out: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(body);
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Write);
    // Let the client read everything before the socket closes.
    let _ = out.read(&mut [0u8; 1]);
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs the binary against `hub` with `HF_HOME` at `home` (no proxy, no other hub settings).
pub fn run_against(hub: &Hub, home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command_against(hub, home, args, env).output().unwrap()
}

/// The command [`run_against`] runs.
pub fn command_against(hub: &Hub, home: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surgery-convert"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for var in [
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "ALL_PROXY",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "all_proxy",
        "https_proxy",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HOME", home)
        .env("HF_ENDPOINT", format!("{}/", hub.addr))
        .env("NO_PROXY", "127.0.0.1,localhost");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub fn convert_args(out: &Path) -> Vec<String> {
    [
        "--in",
        REPO,
        "--out",
        out.to_str().unwrap(),
        "--shared-kv",
        "0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The repo's folder in the cache under `home`.
pub fn repo_dir(home: &Path) -> PathBuf {
    home.join("hub").join("models--tiny-org--tiny-llama")
}

/// The one stderr line of a failed run.
pub fn error_line(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("surgery-convert: error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.trim_end().to_string()
}

/// Every path under `root` (files, folders, links; links not followed), relative, sorted.
pub fn paths_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}
