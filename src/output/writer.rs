//! Writing output files: safetensors shards streamed tensor by tensor, copied files, and JSON files,
//! each hashed (SHA-256) as it is written and flushed to disk (`fsync`) when complete; safetensors
//! shards go around the page cache ([`DirectFile`]).
//!
//! Files written through the page cache ([`HashingFile`]: copies, JSON) start their writeback
//! early: every [`WRITEBACK_WINDOW`] bytes the file's recent range
//! is handed to the kernel with `posix_fadvise(DONTNEED)`, which starts writing those dirty pages
//! out (without waiting) and drops the pages of the window before, already written. So the disk
//! works while the converter computes, the final `fsync` only waits for the tail, and a large copy
//! does not crowd the page cache.

use crate::digest::hex;
use crate::error::{Error, Result};
use crate::output::direct::DirectFile;
use crate::output::sink::TensorSink;
use crate::plan::{ShardPlan, TensorPlan};
use safetensors::tensor::{Metadata, TensorInfo};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

/// Bytes between two early-writeback hints.
const WRITEBACK_WINDOW: u64 = 64 << 20;

/// A file being written, hashed on the way.
pub struct HashingFile {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    written: u64,
    /// Start of the last window handed to the kernel.
    advised: u64,
}

impl HashingFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(HashingFile {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(8 << 20, file),
            hasher: Sha256::new(),
            written: 0,
            advised: 0,
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        crate::interrupt::check()?;
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += bytes.len() as u64;
        if self.written - self.advised >= 2 * WRITEBACK_WINDOW {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Hands everything written since the last hint, and the window before it, to the kernel:
    /// writeback starts for the new range, the older one (written back by now) leaves the cache.
    /// The hint is advisory; a failure changes nothing and is ignored.
    fn start_writeback(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let from = self.advised.saturating_sub(WRITEBACK_WINDOW);
        if let Some(len) = NonZeroU64::new(self.written - from) {
            let _ = rustix::fs::fadvise(
                self.out.get_ref(),
                from,
                Some(len),
                rustix::fs::Advice::DontNeed,
            );
        }
        self.advised = self.written;
        Ok(())
    }

    /// Flushes, syncs to disk, and returns the hex SHA-256 of everything written.
    pub fn finish(self) -> Result<String> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(hex(&self.hasher.finalize()))
    }
}

/// Copies `src` to `dst`, returning the SHA-256 of the bytes.
pub fn copy_file(src: &Path, dst: &Path) -> Result<String> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut input = File::open(src).map_err(|e| Error::io(src, e))?;
    let mut out = HashingFile::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf).map_err(|e| Error::io(src, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.finish()
}

/// Writes `bytes` to `dst`, returning their SHA-256.
pub fn write_file(dst: &Path, bytes: &[u8]) -> Result<String> {
    let mut out = HashingFile::create(dst)?;
    out.write_all(bytes)?;
    out.finish()
}

/// The safetensors header of a planned shard: 8-byte little-endian length, then the JSON header
/// (`__metadata__` first, then tensors in file order) padded with spaces to a multiple of 8.
pub fn shard_header(shard: &ShardPlan, path: &Path) -> Result<Vec<u8>> {
    let mut infos = Vec::with_capacity(shard.tensors.len());
    let mut offset = 0usize;
    for t in &shard.tensors {
        let end = offset
            .checked_add(t.byte_len)
            .ok_or_else(|| Error::tensor(path, &t.name, "shard size overflows"))?;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    // Let the safetensors library validate offsets, shapes and dtypes exactly as readers will.
    Metadata::new(None, infos.clone()).map_err(|e| Error::Safetensors {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mut header = serde_json::Map::new();
    let metadata: serde_json::Map<String, serde_json::Value> = shard
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    for (name, info) in infos {
        let value = serde_json::to_value(&info).map_err(|e| Error::Safetensors {
            path: path.into(),
            message: e.to_string(),
        })?;
        header.insert(name, value);
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| Error::Safetensors {
        path: path.into(),
        message: e.to_string(),
    })?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes planned shards into a directory and records each file's SHA-256.
pub struct ShardWriter<'a> {
    dir: PathBuf,
    current: Option<(String, DirectFile)>,
    /// The tensor being written: its plan and the bytes still due.
    tensor: Option<(String, usize, usize)>,
    digests: &'a mut BTreeMap<String, String>,
}

impl<'a> ShardWriter<'a> {
    /// Writes into `dir`; digests are added to `digests` under the file name.
    pub fn new(dir: &Path, digests: &'a mut BTreeMap<String, String>) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            current: None,
            tensor: None,
            digests,
        }
    }

    fn internal(&self, tensor: &str, what: String) -> Error {
        let file = self
            .current
            .as_ref()
            .map(|(name, _)| self.dir.join(name))
            .unwrap_or_else(|| self.dir.clone());
        Error::bug(format!("{}: tensor `{tensor}`: {what}", file.display()))
    }
}

impl TensorSink for ShardWriter<'_> {
    fn begin_shard(&mut self, shard: &ShardPlan) -> Result<()> {
        let path = self.dir.join(&shard.file_name);
        let header = shard_header(shard, &path)?;
        let mut file = DirectFile::create(&path)?;
        file.write_all(&header)?;
        self.current = Some((shard.file_name.clone(), file));
        Ok(())
    }

    fn begin_tensor(&mut self, tensor: &TensorPlan) -> Result<()> {
        if self.current.is_none() {
            return Err(self.internal(&tensor.name, "no shard open".into()));
        }
        self.tensor = Some((tensor.name.clone(), tensor.byte_len, tensor.byte_len));
        Ok(())
    }

    fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((name, planned, due)) = self.tensor.take() else {
            return Err(self.internal("?", "bytes outside a tensor".into()));
        };
        if bytes.len() > due {
            return Err(self.internal(
                &name,
                format!("more than the {planned} bytes planned produced"),
            ));
        }
        let Some((_, file)) = self.current.as_mut() else {
            return Err(self.internal(&name, "no shard open".into()));
        };
        file.write_all(bytes)?;
        self.tensor = Some((name, planned, due - bytes.len()));
        Ok(())
    }

    fn end_tensor(&mut self) -> Result<()> {
        match self.tensor.take() {
            Some((_, _, 0)) => Ok(()),
            Some((name, planned, due)) => Err(self.internal(
                &name,
                format!("{} bytes produced, {planned} planned", planned - due),
            )),
            None => Err(self.internal("?", "no tensor open".into())),
        }
    }

    fn finish_shard(&mut self) -> Result<()> {
        if let Some((name, file)) = self.current.take() {
            let digest = file.finish()?;
            self.digests.insert(name, digest);
        }
        Ok(())
    }
}
