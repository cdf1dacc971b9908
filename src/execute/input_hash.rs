//! SHA-256 of every input weight file, computed on a thread of its own while the write pass runs
//! ([`hash_alongside`]): each file front to back from its memory map, each chunk's pages released
//! once hashed. The write pass hashes its output as it writes; with the input hashed beside it, the
//! two hashes (the bulk of a copy-bound conversion's CPU time) run on two cores instead of one.
//!
//! The hasher is paced by the write pass ([`Pace`]): it stays at most [`LEAD`] bytes ahead of the
//! share of the input the writer has reached, so the input is read about once (the writer finds the
//! pages the hasher just read still cached) and the pages mapped at a time stay bounded.

use crate::digest::hex;
use crate::digest::FileRecord;
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Bytes hashed (and then released) at a time.
const CHUNK: usize = 16 << 20;

/// How far the hasher may run ahead of the write pass, in input bytes.
const LEAD: u64 = 1 << 30;

/// The write pass's progress, as the input hasher reads it.
#[derive(Debug)]
pub struct Pace {
    written: AtomicU64,
    total: u64,
    stop: AtomicBool,
}

impl Pace {
    /// A write pass of `total` output bytes, none written yet.
    fn new(total: u64) -> Self {
        Pace {
            written: AtomicU64::new(0),
            total,
            stop: AtomicBool::new(false),
        }
    }

    /// The write pass produced `bytes` more output bytes.
    pub fn advance(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Input bytes the hasher may have hashed, of `input` in all: the share the writer has reached,
    /// plus [`LEAD`] (everything once the write pass is over).
    fn allowed(&self, input: u64) -> u64 {
        let written = self.written.load(Ordering::Relaxed).min(self.total);
        let share = match self.total {
            0 => input,
            total => (u128::from(input) * u128::from(written) / u128::from(total)) as u64,
        };
        share.saturating_add(LEAD)
    }

    /// Whether the hasher should give up (the write pass failed or was interrupted).
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || crate::interrupt::requested()
    }
}

/// Runs `write` (a write pass of `total` output bytes, reporting its progress to the [`Pace`] it is
/// given) while another thread hashes every input file; returns its result and each file's name,
/// size and SHA-256. If `write` fails, the hasher stops and `write`'s error is returned.
pub fn hash_alongside<R>(
    checkpoint: &Checkpoint,
    total: u64,
    write: impl FnOnce(&Pace) -> Result<R>,
) -> Result<(R, Vec<FileRecord>)> {
    let pace = Pace::new(total);
    std::thread::scope(|scope| {
        let hasher = scope.spawn(|| hash_files(checkpoint, &pace));
        let result = write(&pace);
        pace.written.store(total, Ordering::Relaxed);
        if result.is_err() {
            pace.stop.store(true, Ordering::Relaxed);
        }
        let files = hasher
            .join()
            .map_err(|_| Error::bug("the input hashing thread panicked"))?;
        let result = result?;
        // A hasher stopped by an interrupt has no complete digests: report the interrupt.
        crate::interrupt::check()?;
        Ok((result, files))
    })
}

/// Hashes every shard of `checkpoint` front to back at `pace`'s pace (partial digests if stopped).
fn hash_files(checkpoint: &Checkpoint, pace: &Pace) -> Vec<FileRecord> {
    let input: u64 = (0..checkpoint.shards.len())
        .map(|s| checkpoint.file_len(s) as u64)
        .sum();
    let mut hashed = 0u64;
    let mut records = Vec::with_capacity(checkpoint.shards.len());
    for (shard, s) in checkpoint.shards.iter().enumerate() {
        let len = checkpoint.file_len(shard);
        let mut hasher = Sha256::new();
        let mut at = 0;
        while at < len && !pace.stopped() {
            if hashed >= pace.allowed(input) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let end = (at + CHUNK).min(len);
            hasher.update(checkpoint.file_bytes(shard, at..end));
            checkpoint.release_range(shard, at..end);
            hashed += (end - at) as u64;
            at = end;
        }
        records.push(FileRecord {
            name: s.file_name.clone(),
            bytes: len as u64,
            sha256: hex(&hasher.finalize()),
        });
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sharded() -> Checkpoint {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-bf16-sharded");
        Checkpoint::open(&dir).unwrap()
    }

    #[test]
    fn hashes_whole_files_whatever_the_write_pass_does() {
        let checkpoint = sharded();
        let expected: Vec<String> = checkpoint
            .shards
            .iter()
            .map(|s| crate::digest::sha256_file(&s.path).unwrap())
            .collect();
        // A write pass that reports its bytes, one that never does, and one of nothing.
        for total in [1000u64, 5_000_000_000, 0] {
            let (value, records) = hash_alongside(&checkpoint, total, |pace| {
                pace.advance(total / 2);
                Ok(7)
            })
            .unwrap();
            assert_eq!(value, 7);
            let got: Vec<String> = records.iter().map(|r| r.sha256.clone()).collect();
            assert_eq!(got, expected, "total {total}");
            for (r, s) in records.iter().zip(&checkpoint.shards) {
                assert_eq!(r.bytes, std::fs::metadata(&s.path).unwrap().len());
                assert_eq!(r.name, s.file_name);
            }
        }
    }

    #[test]
    fn a_failed_write_pass_stops_the_hasher_and_keeps_its_error() {
        let checkpoint = sharded();
        let r: Result<((), _)> = hash_alongside(&checkpoint, 10, |_| Err(Error::bug("boom")));
        assert!(r.unwrap_err().to_string().contains("boom"));
    }

    #[test]
    fn the_hasher_stays_within_the_lead_of_the_writer() {
        let pace = Pace::new(100);
        let input = 10 * LEAD;
        assert_eq!(pace.allowed(input), LEAD);
        pace.advance(50);
        assert_eq!(pace.allowed(input), 6 * LEAD);
        // Past the planned total (never expected), the whole input.
        pace.advance(500);
        assert_eq!(pace.allowed(input), 11 * LEAD);
        assert_eq!(Pace::new(0).allowed(input), 11 * LEAD);
    }
}
