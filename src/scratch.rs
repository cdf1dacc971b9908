//! Scratch storage for what calibration measures and the fits read later: every layer's moments
//! (`hidden x hidden` `f64` each, 4.3 GB for Llama-3-8B's 32 layers) and the refitted `o_proj`
//! tensors. They are written to one unlinked temporary file in the temporary directory (`TMPDIR`,
//! as `sort` and compilers use it) as soon as they are computed, and read back one at a time when a
//! fit needs them, so memory holds the pass's activations and one layer's statistics, not the
//! model's. The file has no name: nothing is left behind, even when the process is killed.
//!
//! Values come back bit for bit (`f64` little-endian), so a fit reads what the pass computed.

use crate::error::{Error, Result};
use faer::{Mat, MatRef};
use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of one `f64`.
const F64: usize = std::mem::size_of::<f64>();
/// Bytes of one `f32`.
const F32: usize = std::mem::size_of::<f32>();

#[derive(Debug)]
struct ScratchFile {
    file: File,
    /// The directory it lives in (for error messages: the file itself has no name).
    dir: PathBuf,
    /// Bytes allocated so far.
    end: AtomicU64,
}

/// An unlinked temporary file that values are appended to; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Scratch(Arc<ScratchFile>);

impl Scratch {
    /// A new scratch file in the temporary directory (`TMPDIR`); a failure names it, never `--out`.
    pub fn new() -> Result<Scratch> {
        Scratch::new_in(std::env::temp_dir())
    }

    /// A new scratch file in `dir`.
    fn new_in(dir: PathBuf) -> Result<Scratch> {
        let file = tempfile::tempfile_in(&dir).map_err(|e| Error::temp_dir(&dir, e))?;
        Ok(Scratch::with_file(file, dir))
    }

    fn with_file(file: File, dir: PathBuf) -> Scratch {
        Scratch(Arc::new(ScratchFile {
            file,
            dir,
            end: AtomicU64::new(0),
        }))
    }

    /// Reserves `len` bytes, returning their offset.
    fn reserve(&self, len: usize) -> u64 {
        self.0.end.fetch_add(len as u64, Ordering::Relaxed)
    }

    fn write(&self, bytes: &[u8], offset: u64) -> Result<()> {
        self.0
            .file
            .write_all_at(bytes, offset)
            .map_err(|e| self.error(e))
    }

    fn read(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        self.0
            .file
            .read_exact_at(buffer, offset)
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::scratch(&self.0.dir, e)
    }

    /// Writes the `rows x cols` values of `value` out column by column, each as its `W`
    /// little-endian bytes (`encode`), and returns their offset.
    fn columns<const W: usize>(
        &self,
        (rows, cols): (usize, usize),
        encode: impl Fn(usize, usize) -> [u8; W],
    ) -> Result<u64> {
        let step = rows.checked_mul(W).ok_or_else(|| {
            Error::bug(format!("scratch file: a column of {rows} values overflows"))
        })?;
        let total = step
            .checked_mul(cols)
            .ok_or_else(|| Error::bug(format!("scratch file: a {rows}x{cols} matrix overflows")))?;
        let offset = self.reserve(total);
        let mut column = Vec::with_capacity(step);
        for j in 0..cols {
            column.clear();
            for i in 0..rows {
                column.extend_from_slice(&encode(i, j));
            }
            self.write(&column, offset + (j * step) as u64)?;
        }
        Ok(offset)
    }

    /// Writes `m` out (column by column) and returns the handle that reads it back.
    pub fn matrix(&self, m: &Mat<f64>) -> Result<Moment> {
        let (rows, cols) = (m.nrows(), m.ncols());
        let offset = self.columns((rows, cols), |i, j| m[(i, j)].to_le_bytes())?;
        Ok(Moment(Inner::Spilled {
            scratch: self.clone(),
            offset,
            rows,
            cols,
        }))
    }

    /// Writes the `f32` activations `m` out (column by column, bit for bit) and returns the
    /// handle that reads them back.
    pub fn activations(&self, m: MatRef<'_, f32>) -> Result<Activations> {
        let (rows, cols) = (m.nrows(), m.ncols());
        let offset = self.columns((rows, cols), |i, j| m[(i, j)].to_le_bytes())?;
        Ok(Activations {
            scratch: self.clone(),
            offset,
            rows,
            cols,
        })
    }

    /// Writes `bytes` out and returns the handle that reads them back.
    pub fn bytes(&self, bytes: &[u8]) -> Result<SpilledBytes> {
        let offset = self.reserve(bytes.len());
        self.write(bytes, offset)?;
        Ok(SpilledBytes {
            scratch: self.clone(),
            offset,
            len: bytes.len(),
        })
    }
}

/// Bytes of one column of `rows` `f64` values.
fn column_bytes(rows: usize) -> Result<usize> {
    rows.checked_mul(F64)
        .ok_or_else(|| Error::bug(format!("scratch file: a column of {rows} values overflows")))
}

/// A matrix kept in memory or in a [`Scratch`] file; cheap to clone.
#[derive(Debug, Clone)]
pub struct Moment(Inner);

#[derive(Debug, Clone)]
enum Inner {
    Memory(Arc<Mat<f64>>),
    Spilled {
        scratch: Scratch,
        offset: u64,
        rows: usize,
        cols: usize,
    },
}

impl From<Mat<f64>> for Moment {
    fn from(m: Mat<f64>) -> Self {
        Moment(Inner::Memory(Arc::new(m)))
    }
}

impl Moment {
    /// The matrix: borrowed when in memory, read back when spilled.
    pub fn load(&self) -> Result<Cow<'_, Mat<f64>>> {
        match &self.0 {
            Inner::Memory(m) => Ok(Cow::Borrowed(m)),
            &Inner::Spilled {
                ref scratch,
                offset,
                rows,
                cols,
            } => {
                let step = column_bytes(rows)?;
                let mut column = vec![0u8; step];
                let mut m = Mat::<f64>::zeros(rows, cols);
                for j in 0..cols {
                    scratch.read(&mut column, offset + (j * step) as u64)?;
                    for (i, b) in column.chunks_exact(F64).enumerate() {
                        let mut v = [0u8; F64];
                        v.copy_from_slice(b);
                        m[(i, j)] = f64::from_le_bytes(v);
                    }
                }
                Ok(Cow::Owned(m))
            }
        }
    }
}

/// `f32` activations kept in a [`Scratch`] file.
#[derive(Debug, Clone)]
pub struct Activations {
    scratch: Scratch,
    offset: u64,
    rows: usize,
    cols: usize,
}

impl Activations {
    /// The matrix, read back bit for bit.
    pub fn load(&self) -> Result<Mat<f32>> {
        let step = self.rows * F32;
        let mut column = vec![0u8; step];
        let mut m = Mat::<f32>::zeros(self.rows, self.cols);
        for j in 0..self.cols {
            self.scratch
                .read(&mut column, self.offset + (j * step) as u64)?;
            for (i, b) in column.chunks_exact(F32).enumerate() {
                let mut v = [0u8; F32];
                v.copy_from_slice(b);
                m[(i, j)] = f32::from_le_bytes(v);
            }
        }
        Ok(m)
    }

    /// Its rows (positions).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes it takes in the scratch file.
    pub fn bytes(&self) -> u64 {
        (self.rows * self.cols * F32) as u64
    }
}

/// Bytes kept in a [`Scratch`] file.
#[derive(Debug, Clone)]
pub struct SpilledBytes {
    scratch: Scratch,
    offset: u64,
    len: usize,
}

impl SpilledBytes {
    /// The bytes, read back.
    pub fn load(&self) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.len];
        self.scratch.read(&mut bytes, self.offset)?;
        Ok(bytes)
    }

    /// Their length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_and_bytes_come_back_bit_for_bit() {
        let scratch = Scratch::new().unwrap();
        let a = Mat::<f64>::from_fn(5, 3, |i, j| (i as f64 - 1.7) * (j as f64 + 0.3).exp());
        let b = Mat::<f64>::from_fn(2, 4, |i, j| {
            f64::from_bits(0x7ff0_0000_0000_0001 + (i * 4 + j) as u64)
        });
        let (sa, bytes, sb) = (
            scratch.matrix(&a).unwrap(),
            scratch.bytes(b"refit").unwrap(),
            scratch.matrix(&b).unwrap(),
        );
        let same = |x: &Mat<f64>, y: &Mat<f64>| {
            x.nrows() == y.nrows()
                && x.ncols() == y.ncols()
                && (0..x.ncols())
                    .all(|j| (0..x.nrows()).all(|i| x[(i, j)].to_bits() == y[(i, j)].to_bits()))
        };
        assert!(same(&sa.load().unwrap(), &a));
        assert!(same(&sb.load().unwrap(), &b));
        assert!(matches!(sa.load().unwrap(), Cow::Owned(_)));
        assert_eq!(bytes.load().unwrap(), b"refit");
        assert_eq!(bytes.len(), 5);
        // Clones read the same file.
        assert!(same(&sa.clone().load().unwrap(), &a));
        let memory = Moment::from(a.clone());
        assert!(matches!(memory.load().unwrap(), Cow::Borrowed(_)));
        assert!(same(&memory.load().unwrap(), &a));
    }

    #[test]
    fn activations_come_back_bit_for_bit() {
        let scratch = Scratch::new().unwrap();
        let m = Mat::<f32>::from_fn(7, 3, |i, j| {
            f32::from_bits(0x3f80_0001 + (i * 3 + j) as u32) * if i % 2 == 0 { -1.0 } else { 1.0 }
        });
        let kept = scratch.activations(m.as_ref()).unwrap();
        scratch.bytes(b"after").unwrap();
        let back = kept.load().unwrap();
        assert_eq!((back.nrows(), back.ncols()), (7, 3));
        for j in 0..3 {
            for i in 0..7 {
                assert_eq!(back[(i, j)].to_bits(), m[(i, j)].to_bits(), "({i}, {j})");
            }
        }
        assert_eq!(kept.bytes(), 7 * 3 * 4);
    }

    #[test]
    fn a_missing_temporary_directory_is_named() {
        let missing = tempfile::tempdir().unwrap().path().join("gone");
        let e = Scratch::new_in(missing.clone()).unwrap_err();
        assert_eq!(
            e.to_line(),
            format!(
                "TMPDIR={}: no such directory; set TMPDIR to an existing directory",
                missing.display()
            )
        );
    }

    #[test]
    fn a_full_temporary_directory_is_named_not_out() {
        // /dev/full fails every write with ENOSPC, as a full TMPDIR does.
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let scratch = Scratch::with_file(full, PathBuf::from("/t"));
        let e = scratch.bytes(b"moments").unwrap_err();
        assert!(matches!(e, Error::ScratchNoSpace { .. }), "{e}");
        assert!(e.to_line().starts_with("TMPDIR=/t: no space left"), "{e}");
    }

    #[test]
    fn an_empty_matrix_round_trips() {
        let scratch = Scratch::new().unwrap();
        let m = scratch.matrix(&Mat::<f64>::zeros(0, 0)).unwrap();
        assert_eq!(m.load().unwrap().nrows(), 0);
    }
}
