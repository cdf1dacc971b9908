//! The factored form's first pass: every group fitted (through a pipeline) and its encoded
//! factors spilled to a scratch file, which the write pass then reads back as its pieces.

use super::pipeline::with_pipeline;
use super::{FitInputs, GroupReport, PieceSource};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::plan::{Emit, GroupPlan, Plan};
use indicatif::ProgressBar;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Encoded factors of every group, spilled to a scratch file by [`factor_pass`].
pub struct Spill {
    file: File,
    path: PathBuf,
    /// Per group, per piece: offset and length in the file.
    pieces: Vec<Vec<(u64, usize)>>,
}

impl Spill {
    /// Deletes the scratch file.
    pub fn remove(self) -> Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl PieceSource for Spill {
    fn take(
        &mut self,
        _checkpoint: &Checkpoint,
        _plan: &Plan,
        group: usize,
        piece: usize,
    ) -> Result<Vec<u8>> {
        let (offset, len) = self
            .pieces
            .get(group)
            .and_then(|p| p.get(piece))
            .copied()
            .ok_or_else(|| {
                Error::bug(format!(
                    "{}: no factor {piece} of group {group}",
                    self.path.display()
                ))
            })?;
        let mut bytes = vec![0u8; len];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(bytes)
    }
}

/// Fits every group in the factored form (ahead of this loop, through a [`Pipeline`]), writing
/// the encoded factors in group order to a new scratch file at `spill_path`. Returns the reports in
/// group order and the spill.
pub fn factor_pass(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    inputs: &FitInputs,
    spill_path: &Path,
    progress: &ProgressBar,
) -> Result<(Vec<GroupReport>, Spill)> {
    progress.set_length(groups.len() as u64);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(spill_path)
        .map_err(|e| Error::io(spill_path, e))?;
    let mut reports = Vec::with_capacity(groups.len());
    let mut pieces = Vec::with_capacity(groups.len());
    let mut offset = 0u64;
    let order: Vec<usize> = (0..groups.len()).collect();
    with_pipeline(
        checkpoint,
        groups,
        &order,
        Emit::Factored,
        inputs,
        |pipeline| {
            for g in 0..groups.len() {
                let out = pipeline.get(g, &checkpoint.dir)?;
                let mut spans = Vec::with_capacity(out.pieces.len());
                for bytes in out.pieces.into_iter().flatten() {
                    file.write_all(&bytes)
                        .map_err(|e| Error::io(spill_path, e))?;
                    spans.push((offset, bytes.len()));
                    offset += bytes.len() as u64;
                }
                pieces.push(spans);
                reports.push(out.report);
                pipeline.done();
                progress.inc(1);
            }
            Ok(())
        },
    )?;
    Ok((
        reports,
        Spill {
            file,
            path: spill_path.to_path_buf(),
            pieces,
        },
    ))
}
