//! SHA-256 of every input weight file, folded into the write pass: each file is hashed front to
//! back from its memory map as the writer walks past its tensors (while their pages are still hot),
//! and whatever was not reached is hashed at the end. So the input is read once, not twice, and the
//! hashed pages are released as they go.

use crate::digest::hex;
use crate::digest::FileRecord;
use crate::input::checkpoint::{Checkpoint, TensorEntry};
use sha2::{Digest, Sha256};

/// Bytes hashed (and then released) at a time.
const CHUNK: usize = 16 << 20;

/// Per input shard: how far it has been hashed, and the running hash.
pub struct InputHasher {
    shards: Vec<(usize, Sha256)>,
}

impl InputHasher {
    /// Starts at the beginning of every shard of `checkpoint`.
    pub fn new(checkpoint: &Checkpoint) -> Self {
        InputHasher {
            shards: (0..checkpoint.shards.len())
                .map(|_| (0, Sha256::new()))
                .collect(),
        }
    }

    /// Hashes shard `shard` forward up to byte `end` (nothing if it is already past it).
    pub fn advance(&mut self, checkpoint: &Checkpoint, shard: usize, end: usize) {
        let Some((next, hasher)) = self.shards.get_mut(shard) else {
            return;
        };
        let end = end.min(checkpoint.file_len(shard));
        while *next < end {
            let stop = (*next + CHUNK).min(end);
            hasher.update(checkpoint.file_bytes(shard, *next..stop));
            checkpoint.release_range(shard, *next..stop);
            *next = stop;
        }
    }

    /// Hashes up to the end of tensor `t`.
    pub fn visit(&mut self, checkpoint: &Checkpoint, t: &TensorEntry) {
        self.advance(checkpoint, t.shard, t.range.end);
    }

    /// Hashes the rest of every file; returns each file's name, size and SHA-256.
    pub fn finish(mut self, checkpoint: &Checkpoint) -> Vec<FileRecord> {
        for shard in 0..checkpoint.shards.len() {
            self.advance(checkpoint, shard, checkpoint.file_len(shard));
        }
        self.shards
            .into_iter()
            .zip(&checkpoint.shards)
            .map(|((len, hasher), s)| FileRecord {
                name: s.file_name.clone(),
                bytes: len as u64,
                sha256: hex(&hasher.finalize()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn hashes_whole_files_whatever_the_visiting_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-bf16-sharded");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let expected: Vec<String> = checkpoint
            .shards
            .iter()
            .map(|s| crate::digest::sha256_file(&s.path).unwrap())
            .collect();
        // In file order, in reverse, and not at all.
        let mut forward = InputHasher::new(&checkpoint);
        let mut by_offset: Vec<&TensorEntry> = checkpoint.tensors.iter().collect();
        by_offset.sort_by_key(|t| (t.shard, t.range.start));
        for t in &by_offset {
            forward.visit(&checkpoint, t);
        }
        let mut backward = InputHasher::new(&checkpoint);
        for t in by_offset.iter().rev() {
            backward.visit(&checkpoint, t);
        }
        for records in [
            forward.finish(&checkpoint),
            backward.finish(&checkpoint),
            InputHasher::new(&checkpoint).finish(&checkpoint),
        ] {
            let got: Vec<String> = records.iter().map(|r| r.sha256.clone()).collect();
            assert_eq!(got, expected);
            for (r, s) in records.iter().zip(&checkpoint.shards) {
                assert_eq!(r.bytes, std::fs::metadata(&s.path).unwrap().len());
                assert_eq!(r.name, s.file_name);
            }
        }
    }
}
