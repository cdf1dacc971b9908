//! The spectra of one-shot calibration's activation-aware fits, kept for every later fit of the
//! same group: the budgets' spectra compute each group's [`WeightedSpectrum`] (its weighting, the
//! weighted outputs' Gram matrix and its eigenpairs), and the `o_proj` refit's and the write
//! pass's fits of that group finish from it instead of computing it again. The inputs it is
//! computed from (the one-shot pass's moments, the checkpoint's weights) do not change after the
//! pass, so the fits are the same bits as without it.
//!
//! Kept in the calibration's scratch file (Llama-3-8B's K/V stacks: about 190 MB per layer), by
//! group (its members, in order). Off by default; shared by clones, so the refit's copy of the
//! one-shot inputs keeps what the budgets computed.

use crate::error::{Error, Result};
use crate::fit::act::{LeftWeight, WeightedSpectrum};
use crate::scratch::{Moment, Scratch};
use faer::Mat;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A [`WeightedSpectrum`] in the scratch file.
#[derive(Debug)]
struct Spilled {
    /// `L` (one column: its diagonal) and, for a full `L`, its inverse.
    left: (Moment, Option<Moment>),
    weighted: Moment,
    gram: Moment,
    /// The eigenvalues, one column.
    eigenvalues: Moment,
    vectors: Moment,
}

#[derive(Debug)]
struct Shared {
    scratch: Scratch,
    spectra: Mutex<HashMap<Vec<usize>, Arc<Spilled>>>,
}

/// Weighted spectra by group (its members' tensor indices), when switched on ([`Self::on`]).
#[derive(Debug, Clone, Default)]
pub struct KeptSpectra(Option<Arc<Shared>>);

/// One column holding `values`.
fn column(values: &[f64]) -> Mat<f64> {
    Mat::from_fn(values.len(), 1, |i, _| values[i])
}

impl KeptSpectra {
    /// A cache that keeps spectra in `scratch`.
    pub fn on(scratch: Scratch) -> Self {
        KeptSpectra(Some(Arc::new(Shared {
            scratch,
            spectra: Mutex::new(HashMap::new()),
        })))
    }

    fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<Vec<usize>, Arc<Spilled>>> {
        // A panic while holding the lock cannot leave the map half-updated (one insert or get).
        shared.spectra.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `spectrum` for the group of `members`, if the cache is on (a second offer for the
    /// same group, from a fit racing the first, changes nothing).
    pub(crate) fn offer(&self, members: &[usize], spectrum: &WeightedSpectrum) -> Result<()> {
        let Some(shared) = &self.0 else {
            return Ok(());
        };
        if Self::lock(shared).contains_key(members) {
            return Ok(());
        }
        let s = &shared.scratch;
        let left = match &spectrum.left {
            LeftWeight::Diagonal(d) => (s.matrix(&column(d))?, None),
            LeftWeight::Full { l, inverse } => (s.matrix(l)?, Some(s.matrix(inverse)?)),
        };
        let spilled = Spilled {
            left,
            weighted: s.matrix(&spectrum.weighted)?,
            gram: s.matrix(&spectrum.gram)?,
            eigenvalues: s.matrix(&column(&spectrum.eigenvalues))?,
            vectors: s.matrix(&spectrum.vectors)?,
        };
        Self::lock(shared)
            .entry(members.to_vec())
            .or_insert(Arc::new(spilled));
        Ok(())
    }

    /// The spectrum kept for the group of `members`, read back, if any; checked to be of `rows`
    /// outputs (a different size is a bug: a group's members fix its stack).
    pub(crate) fn get(&self, members: &[usize], rows: usize) -> Result<Option<WeightedSpectrum>> {
        let Some(shared) = &self.0 else {
            return Ok(None);
        };
        let Some(spilled) = Self::lock(shared).get(members).cloned() else {
            return Ok(None);
        };
        let first = |m: &Moment| -> Result<Vec<f64>> {
            let m = m.load()?;
            Ok((0..m.nrows()).map(|i| m[(i, 0)]).collect())
        };
        let left = match &spilled.left {
            (d, None) => LeftWeight::Diagonal(first(d)?),
            (l, Some(inverse)) => LeftWeight::Full {
                l: l.load()?.into_owned(),
                inverse: inverse.load()?.into_owned(),
            },
        };
        let spectrum = WeightedSpectrum {
            left,
            weighted: spilled.weighted.load()?.into_owned(),
            gram: spilled.gram.load()?.into_owned(),
            eigenvalues: first(&spilled.eigenvalues)?,
            vectors: spilled.vectors.load()?.into_owned(),
        };
        if [&spectrum.weighted, &spectrum.gram, &spectrum.vectors]
            .iter()
            .any(|m| m.nrows() != rows)
        {
            return Err(Error::bug(format!(
                "a kept spectrum of {} outputs for a group of {rows} (tensors {members:?})",
                spectrum.gram.nrows()
            )));
        }
        Ok(Some(spectrum))
    }

    /// How many spectra are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| Self::lock(s).len())
    }
}
