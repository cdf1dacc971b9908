//! The output directory appears atomically: everything is written into a hidden sibling staging
//! directory that is renamed into place only when complete. On any failure the staging directory is
//! removed, and an existing output (replaced only with `--force`) is left untouched.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(path, e))
}

/// Resolves `--out` to an absolute path whose parent exists, refusing an output that would overwrite,
/// sit inside, or contain the input, and an existing output without `force`.
pub fn check_out_path(input_dir: &Path, out: &Path, force: bool) -> Result<PathBuf> {
    let out_abs = absolute(out)?;
    let name = out_abs
        .file_name()
        .ok_or_else(|| {
            Error::usage(
                "--out",
                format!("`{}` does not name a directory", out.display()),
            )
        })?
        .to_owned();
    let parent = out_abs.parent().unwrap_or(Path::new("/"));
    let parent = parent.canonicalize().map_err(|e| {
        Error::usage(
            "--out",
            format!("parent directory of `{}` is not usable: {e}", out.display()),
        )
    })?;
    if !parent.is_dir() {
        return Err(Error::usage(
            "--out",
            format!(
                "parent of `{}` is not a directory (`{}` is a file)",
                out.display(),
                parent.display()
            ),
        ));
    }
    let out_abs = parent.join(name);
    let input = input_dir
        .canonicalize()
        .map_err(|e| Error::io(input_dir, e))?;
    let out_resolved = out_abs.canonicalize().unwrap_or_else(|_| out_abs.clone());
    if out_resolved == input || out_resolved.starts_with(&input) {
        return Err(Error::usage(
            "--out",
            format!(
                "`{}` is the input or inside it; choose a directory outside the input",
                out.display()
            ),
        ));
    }
    if input.starts_with(&out_resolved) {
        return Err(Error::usage(
            "--out",
            format!(
                "`{}` contains the input; choose a directory outside the input",
                out.display()
            ),
        ));
    }
    if out_abs.symlink_metadata().is_ok() {
        if !force {
            return Err(Error::usage(
                "--out",
                format!(
                    "`{}` already exists; pass --force to replace it",
                    out.display()
                ),
            ));
        }
        if !out_abs.is_dir() {
            return Err(Error::usage(
                "--out",
                format!(
                    "`{}` exists and is not a directory; remove it first",
                    out.display()
                ),
            ));
        }
    }
    Ok(out_abs)
}

/// A staging directory that becomes the output on [`Staging::commit`], or vanishes if dropped.
pub struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates `.<name>.surgery-tmp-<pid>` beside `out` (an absolute path from [`check_out_path`]).
    pub fn create(out: &Path) -> Result<Self> {
        let tmp = sibling(out, "surgery-tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| {
            Error::usage(
                "--out",
                format!(
                    "cannot create the output beside `{}`: {e}; choose a writable location",
                    out.display()
                ),
            )
        })?;
        crate::interrupt::register_staging(tmp.clone());
        Ok(Staging {
            tmp,
            out: out.to_path_buf(),
            committed: false,
        })
    }

    /// Where files are written until commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the staging directory into place, replacing an existing output only now.
    pub fn commit(mut self) -> Result<()> {
        crate::interrupt::check()?;
        sync_dir(&self.tmp)?;
        let old = sibling(&self.out, "surgery-old");
        let replacing = self.out.symlink_metadata().is_ok();
        if replacing {
            std::fs::rename(&self.out, &old).map_err(|e| Error::io(&self.out, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.out) {
            if replacing {
                let _ = std::fs::rename(&old, &self.out);
            }
            return Err(Error::io(&self.out, e));
        }
        self.committed = true;
        crate::interrupt::unregister_staging(&self.tmp);
        if replacing {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        if let Some(parent) = self.out.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
            crate::interrupt::unregister_staging(&self.tmp);
        }
    }
}

fn sibling(out: &Path, tag: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}
