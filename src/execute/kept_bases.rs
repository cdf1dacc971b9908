//! The bases the factored layout's width pass decomposed ([`super::widths`]), kept for the write
//! pass's fits to finish instead of decomposing again: a bounded cache handed over once per group.

use crate::fit::basis::Basis;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The most bytes of bases the width pass keeps for the write pass; past it, a group's fit
/// decomposes again (the same bits, more time). A threshold of 0.3 on Llama-3-8B's K/V stacks
/// keeps about 0.3 MB per layer; every component of every layer would be 1 GB.
pub const KEPT_BYTES: u64 = 256 << 20;

/// Bases the width pass computed, by group (its first member's tensor index), each taken once by
/// the write pass's fit. A cache: a clone starts empty.
#[derive(Debug, Default)]
pub struct KeptBases {
    bases: Mutex<HashMap<usize, Basis>>,
    bytes: AtomicU64,
}

impl Clone for KeptBases {
    fn clone(&self) -> Self {
        KeptBases::default()
    }
}

impl KeptBases {
    /// Keeps `basis` for the group keyed `key` if it fits in what is left of [`KEPT_BYTES`].
    pub(crate) fn offer(&self, key: usize, basis: Basis) {
        let size = basis.bytes();
        let reserved = self
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(size).filter(|&total| total <= KEPT_BYTES)
            });
        if reserved.is_ok() {
            self.lock().insert(key, basis);
        }
    }

    /// The basis kept for the group keyed `key`, if any (once: it is handed over).
    pub(crate) fn take(&self, key: usize) -> Option<Basis> {
        let basis = self.lock().remove(&key)?;
        self.bytes.fetch_sub(basis.bytes(), Ordering::SeqCst);
        Some(basis)
    }

    /// How many are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Basis>> {
        // A panic while holding the lock cannot leave the map half-updated (one insert or remove).
        self.bases.lock().unwrap_or_else(|e| e.into_inner())
    }
}
