//! Weight files written around the page cache (`O_DIRECT`), hashed on the way.
//!
//! A buffered write of a multi-gigabyte shard costs the kernel more CPU than the copy itself: each
//! page is copied into the cache, tracked dirty, written back and reclaimed, about 1 CPU-s per GB on
//! the 2-core CI machine against 0.3 for the same bytes sent straight from an aligned buffer to the
//! disk. So a [`DirectFile`] copies what it is given into [`BUFFER`]-byte aligned buffers and hands
//! each full one to a worker thread, which writes it with `O_DIRECT` while a second thread hashes the
//! buffers (SHA-256, in file order); the caller goes on filling the next buffer. The last buffer is padded
//! with zeros to the alignment and the file truncated back to its length before the final `fsync`.
//!
//! Where the file system refuses `O_DIRECT` (at `open`, or at the first write), the file is written
//! through the page cache instead: the same bytes, more CPU.

use crate::digest::hex;
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes per buffer handed to the worker.
pub const BUFFER: usize = 8 << 20;

/// Buffers in use at once: one being filled, one being written, one being hashed, one queued.
const BUFFERS: usize = 4;

/// The alignment `O_DIRECT` asks of buffers, offsets and lengths (the largest logical block size
/// of common disks; a multiple of every smaller one).
const ALIGN: usize = 4096;

/// An aligned buffer: `data[start..start + BUFFER]` is the aligned window, `len` bytes of it filled.
#[derive(Debug)]
struct Buffer {
    data: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buffer {
    fn new() -> Self {
        let data = vec![0u8; BUFFER + ALIGN];
        let start = data.as_ptr().align_offset(ALIGN).min(ALIGN);
        Buffer {
            data,
            start,
            len: 0,
        }
    }

    /// Copies as much of `bytes` as fits; returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(BUFFER - self.len);
        let at = self.start + self.len;
        self.data[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }

    /// Zeros the bytes after the filled ones up to the next multiple of [`ALIGN`]; returns where
    /// that is in `data`.
    fn pad(&mut self) -> usize {
        let end = self.start + self.len.div_ceil(ALIGN) * ALIGN;
        self.data[self.start + self.len..end].fill(0);
        end
    }
}

/// What the worker hands back when the last buffer is written: the file, its length and its hash.
type Finished = (File, u64, Sha256);

/// A weight file being written around the page cache, hashed on the way.
pub struct DirectFile {
    path: PathBuf,
    current: Buffer,
    jobs: Option<SyncSender<Buffer>>,
    free: Receiver<Buffer>,
    worker: Option<JoinHandle<Result<Finished>>>,
}

impl DirectFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let (file, direct) = open(path)?;
        let (jobs, queue) = sync_channel::<Buffer>(BUFFERS);
        let (give_back, free) = sync_channel::<Buffer>(BUFFERS);
        for _ in 1..BUFFERS {
            give_back
                .send(Buffer::new())
                .map_err(|_| Error::bug("an output buffer pool closed before use"))?;
        }
        let owned = path.to_path_buf();
        let worker = std::thread::Builder::new()
            .name("surgery-convert-write".into())
            .spawn(move || write_queue(&owned, file, direct, queue, give_back))
            .map_err(|e| Error::io(path, e))?;
        Ok(DirectFile {
            path: path.to_path_buf(),
            current: Buffer::new(),
            jobs: Some(jobs),
            free,
            worker: Some(worker),
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        crate::interrupt::check()?;
        while !bytes.is_empty() {
            let n = self.current.fill(bytes);
            bytes = &bytes[n..];
            if self.current.len == BUFFER {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Sends the full buffer to the worker and takes a free one to fill.
    fn hand_over(&mut self) -> Result<()> {
        let Ok(mut next) = self.free.recv() else {
            return Err(self.worker_error());
        };
        next.len = 0;
        let full = std::mem::replace(&mut self.current, next);
        match self.jobs.as_ref().map(|jobs| jobs.send(full)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.worker_error()),
        }
    }

    /// The worker stopped early: its error.
    fn worker_error(&mut self) -> Error {
        self.jobs = None;
        match self.worker.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            _ => Error::bug(format!(
                "{}: the output writer thread stopped without an error",
                self.path.display()
            )),
        }
    }

    /// Writes the last bytes, truncates the padding, syncs to disk, and returns the hex SHA-256 of
    /// everything written.
    pub fn finish(mut self) -> Result<String> {
        let last = std::mem::replace(
            &mut self.current,
            Buffer {
                data: Vec::new(),
                start: 0,
                len: 0,
            },
        );
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(last));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.worker_error());
        }
        self.jobs = None;
        let (file, length, hasher) = match self.worker.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            _ => {
                return Err(Error::bug(format!(
                    "{}: the output writer thread panicked",
                    self.path.display()
                )))
            }
        };
        rustix::fs::ftruncate(&file, length).map_err(|e| Error::io(&self.path, e.into()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(hex(&hasher.finalize()))
    }
}

impl Drop for DirectFile {
    /// An unfinished file (a failed conversion): the worker is told to stop and waited for, so no
    /// thread writes into a staging directory being removed.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Opens `path` for writing, with `O_DIRECT` where the file system takes it; says which.
fn open(path: &Path) -> Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct = options.clone();
        direct.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        if let Ok(file) = direct.open(path) {
            return Ok((file, true));
        }
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    Ok((file, false))
}

/// The worker: writes each buffer in turn while a second thread hashes them in the same order;
/// a buffer goes back to the pool once both are done with it. At the last (short) one it returns
/// the file, its length and the hash.
fn write_queue(
    path: &Path,
    mut file: File,
    mut direct: bool,
    queue: Receiver<Buffer>,
    give_back: SyncSender<Buffer>,
) -> Result<Finished> {
    let (to_hash, hash_queue) = sync_channel::<Arc<Buffer>>(BUFFERS);
    let returns = give_back.clone();
    let hashing = std::thread::Builder::new()
        .name("surgery-convert-hash".into())
        .spawn(move || hash_queue_in_order(hash_queue, returns))
        .map_err(|e| Error::io(path, e))?;
    let mut length = 0u64;
    let mut finished = false;
    while let Ok(mut buffer) = queue.recv() {
        let last = buffer.len < BUFFER;
        let first = length == 0;
        let end = buffer.pad();
        let buffer = Arc::new(buffer);
        if to_hash.send(Arc::clone(&buffer)).is_err() {
            break;
        }
        write_direct(
            path,
            &mut file,
            &mut direct,
            first,
            &buffer.data[buffer.start..end],
        )?;
        length += buffer.len as u64;
        // The caller may be gone (it failed): then nobody needs the buffer back.
        if let Some(buffer) = Arc::into_inner(buffer) {
            let _ = give_back.send(buffer);
        }
        if last {
            finished = true;
            break;
        }
    }
    drop(to_hash);
    let hasher = hashing
        .join()
        .map_err(|_| Error::bug(format!("{}: hashing panicked", path.display())))?;
    if !finished {
        return Err(Error::bug(format!(
            "{}: the output ended without its last buffer",
            path.display()
        )));
    }
    Ok((file, length, hasher))
}

/// The hashing thread: every buffer's filled bytes, in the order sent; a buffer it is the last to
/// hold goes back to the pool.
fn hash_queue_in_order(queue: Receiver<Arc<Buffer>>, give_back: SyncSender<Buffer>) -> Sha256 {
    let mut hasher = Sha256::new();
    while let Ok(buffer) = queue.recv() {
        hasher.update(buffer.filled());
        if let Some(buffer) = Arc::into_inner(buffer) {
            let _ = give_back.send(buffer);
        }
    }
    hasher
}

/// Writes `bytes` at the file's position; a file system that refuses `O_DIRECT` writes (`EINVAL`,
/// which writes nothing) at the `first` one is switched to the page cache.
fn write_direct(
    path: &Path,
    file: &mut File,
    direct: &mut bool,
    first: bool,
    bytes: &[u8],
) -> Result<()> {
    match file.write_all(bytes) {
        Ok(()) => Ok(()),
        Err(e)
            if *direct
                && first
                && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
        {
            *direct = false;
            let flags = rustix::fs::fcntl_getfl(&*file).map_err(|e| Error::io(path, e.into()))?;
            rustix::fs::fcntl_setfl(&*file, flags - rustix::fs::OFlags::DIRECT)
                .map_err(|e| Error::io(path, e.into()))?;
            file.write_all(bytes).map_err(|e| Error::io(path, e))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn bytes_and_digest_are_what_was_written_across_buffers() {
        let dir = tempfile::tempdir().unwrap();
        for total in [0, 1, ALIGN, BUFFER, 2 * BUFFER + 12_345, BUFFER - 1] {
            let bytes = pattern(total);
            let path = dir.path().join(format!("f{total}"));
            let mut file = DirectFile::create(&path).unwrap();
            // Pieces of awkward sizes, as a header and tensors would come.
            let mut at = 0;
            for (k, size) in [8usize, 4_091, 3 << 20, 1].iter().cycle().enumerate() {
                if at >= total || k > 10_000 {
                    break;
                }
                let end = (at + size).min(total);
                file.write_all(&bytes[at..end]).unwrap();
                at = end;
            }
            let digest = file.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{total} bytes");
            assert_eq!(digest, crate::digest::sha256_hex(&bytes), "{total} bytes");
        }
    }

    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unaligned");
        let (mut file, mut direct) = open(&path).unwrap();
        // 100 bytes from an unaligned address: `O_DIRECT` refuses them (EINVAL) where it is on.
        let bytes = pattern(101);
        write_direct(&path, &mut file, &mut direct, true, &bytes[1..]).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), &bytes[1..]);
    }

    #[test]
    fn a_file_dropped_unfinished_stops_its_worker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unfinished");
        let mut file = DirectFile::create(&path).unwrap();
        file.write_all(&pattern(BUFFER + 5)).unwrap();
        drop(file);
        // The full buffer was written; the worker has exited, so the file no longer changes.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), BUFFER as u64);
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("f");
        let e = DirectFile::create(&path).err().unwrap().to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
