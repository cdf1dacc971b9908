//! Typed errors of the library. Every variant names the file, tensor or option it is about; `main`
//! prints the message once, on one line, and maps the kind to an exit code.

use std::path::PathBuf;

/// `s` with every control character written as a Rust escape (`\n`, `\u{1b}`).
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The conventional name of a signal number.
pub fn signal_name(signal: i32) -> &'static str {
    use signal_hook::consts::{SIGINT, SIGTERM};
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Why a temporary directory cannot be used, as [`Error::TempDir`] says it.
fn temp_dir_cause(source: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match source.kind() {
        ErrorKind::NotFound => "no such directory; set TMPDIR to an existing directory".into(),
        ErrorKind::NotADirectory => "not a directory; set TMPDIR to a directory".into(),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            format!("cannot create the scratch file there ({source}); set TMPDIR to a writable directory")
        }
        _ => format!("cannot create the scratch file there: {source}"),
    }
}

fn is_no_space(source: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        source.kind(),
        ErrorKind::StorageFull | ErrorKind::FileTooLarge | ErrorKind::QuotaExceeded
    )
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a conversion or a verification.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line option is invalid or options conflict.
    #[error("{option}: {message}")]
    Usage {
        /// The flag, e.g. `--out`.
        option: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file (config, index) could not be parsed.
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: serde_json::Error,
    },
    /// A file's contents do not describe a usable checkpoint.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is malformed.
    #[error("{}: invalid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser rejected.
        message: String,
    },
    /// One tensor is missing, misshapen or unusable.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Tensor {
        /// The file holding (or expected to hold) the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor's dtype is not one of the float types this tool computes with.
    #[error("{}: tensor `{tensor}`: dtype {dtype} cannot be {purpose} (supported: F32, F16, BF16)", path.display())]
    UnsupportedDtype {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its dtype, as safetensors names it.
        dtype: String,
        /// What was to be done with it: `decomposed`, `expanded`, `evaluated`.
        purpose: &'static str,
    },
    /// The input could not be found locally or in the Hugging Face cache.
    #[error("--in {input}: {message}")]
    Source {
        /// The `--in` value.
        input: String,
        /// Why it could not be resolved.
        message: String,
    },
    /// A write failed for lack of space: the filesystem is full, a quota or `ulimit -f` reached.
    #[error("{}: no space left to write the output ({source}); free space or choose another --out", path.display())]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Something took `--out` while the run was writing (another run, a program, a user): what is
    /// there was left untouched and the finished output kept under another name.
    #[error("--out {}: {what}; left it untouched and kept the finished output in {}", out.display(), kept.display())]
    OutChanged {
        /// `--out`.
        out: PathBuf,
        /// What was found there, and why it is not replaced.
        what: String,
        /// Where the finished output is.
        kept: PathBuf,
    },
    /// The temporary directory cannot hold the scratch file: missing, not a directory, not writable.
    #[error("TMPDIR={}: {}", dir.display(), temp_dir_cause(source))]
    TempDir {
        /// The temporary directory (`TMPDIR`, or `/tmp` when it is unset).
        dir: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The scratch file (calibration statistics) could not grow: the temporary directory is full.
    #[error("TMPDIR={}: no space left for the scratch file of calibration statistics ({source}); free space there or set TMPDIR to a directory with room", dir.display())]
    ScratchNoSpace {
        /// The temporary directory.
        dir: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A command that needs a standard checkpoint was given a factored one.
    #[error("{}: a factored checkpoint (written by --emit factored); expand it to a standard one first: surgery-convert expand {input} --out DENSE_DIR", path.display())]
    FactoredInput {
        /// Its `config.json`.
        path: PathBuf,
        /// The input as given.
        input: String,
    },
    /// SIGINT or SIGTERM stopped the run; the partial output was removed.
    #[error("interrupted by {}; nothing was written (the partial output was removed)", signal_name(*signal))]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// An internal invariant broke: a bug in this tool, never bad input.
    #[error("internal error (this is a bug in surgery-convert; please report it): {what}")]
    Bug {
        /// What broke, with the file, tensor or group it happened on.
        what: String,
    },
    /// `verify` found mismatches (one line each in `problems`).
    #[error("{} problem(s) found in {}:\n{}", problems.len(), dir.display(), problems.join("\n"))]
    VerifyFailed {
        /// The directory checked.
        dir: PathBuf,
        /// One description per mismatching file or tensor.
        problems: Vec<String>,
    },
}

impl Error {
    /// Builds an [`Error::Io`] for `path`, or [`Error::NoSpace`] when the cause is a full
    /// filesystem, a quota or the file size limit.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match is_no_space(&source) {
            true => Error::NoSpace { path, source },
            false => Error::Io { path, source },
        }
    }

    /// The error of creating the scratch file in the temporary directory `dir`:
    /// [`Error::ScratchNoSpace`] when it is full, [`Error::TempDir`] otherwise.
    pub fn temp_dir(dir: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let dir = dir.into();
        match is_no_space(&source) {
            true => Error::ScratchNoSpace { dir, source },
            false => Error::TempDir { dir, source },
        }
    }

    /// The error of reading or writing the scratch file in `dir`: [`Error::ScratchNoSpace`] when
    /// the temporary directory is full, [`Error::Io`] otherwise (never blamed on `--out`).
    pub fn scratch(dir: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let dir = dir.into();
        match is_no_space(&source) {
            true => Error::ScratchNoSpace { dir, source },
            false => Error::Io {
                path: dir.join("(scratch file)"),
                source,
            },
        }
    }

    /// Builds an [`Error::Bug`].
    pub fn bug(what: impl Into<String>) -> Self {
        Error::Bug { what: what.into() }
    }

    /// Builds an [`Error::Usage`].
    pub fn usage(option: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Usage {
            option: option.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Tensor`].
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }

    /// The message as printed: control characters (a newline or a terminal escape in a hostile
    /// file or tensor name) are escaped, so one error is one line and cannot rewrite the terminal.
    /// `verify`'s report keeps its one line per problem.
    pub fn to_line(&self) -> String {
        let text = self.to_string();
        match self {
            Error::VerifyFailed { .. } => text
                .lines()
                .map(escape_controls)
                .collect::<Vec<_>>()
                .join("\n"),
            _ => escape_controls(&text),
        }
    }

    /// The process exit code for this error: 2 for usage errors, 70 for a bug (sysexits'
    /// `EX_SOFTWARE`), 128 + the signal number for an interruption (130 for Ctrl-C, as shells
    /// report it), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage { .. } => 2,
            Error::Bug { .. } => 70,
            Error::Interrupted { signal } => 128 + signal,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_tell_the_kinds_apart() {
        assert_eq!(Error::usage("--out", "x").exit_code(), 2);
        assert_eq!(Error::bug("x").exit_code(), 70);
        assert_eq!(Error::Interrupted { signal: 2 }.exit_code(), 130);
        assert_eq!(Error::invalid("config.json", "x").exit_code(), 1);
        let bug = Error::bug("group 3 piece 1: output taken twice").to_string();
        assert!(bug.contains("this is a bug"), "{bug}");
    }

    #[test]
    fn temporary_directory_failures_name_tmpdir_not_out() {
        let enospc = || std::io::Error::from_raw_os_error(28);
        for e in [
            Error::scratch("/t", enospc()),
            Error::temp_dir("/t", enospc()),
        ] {
            let line = e.to_line();
            assert!(matches!(e, Error::ScratchNoSpace { .. }), "{line}");
            assert!(line.starts_with("TMPDIR=/t: no space left"), "{line}");
            assert!(!line.contains("--out"), "{line}");
        }
        let missing = Error::temp_dir("/x", std::io::Error::from_raw_os_error(2));
        assert!(
            missing
                .to_line()
                .starts_with("TMPDIR=/x: no such directory"),
            "{missing}"
        );
        let other = Error::scratch("/t", std::io::Error::from_raw_os_error(5));
        assert!(matches!(other, Error::Io { .. }), "{other}");
        assert!(
            other.to_line().starts_with("/t/(scratch file): "),
            "{other}"
        );
    }

    #[test]
    fn one_line_whatever_the_names() {
        let e = Error::tensor("m.safetensors", "a\nb\u{1b}[31m", "missing");
        assert_eq!(
            e.to_line(),
            "m.safetensors: tensor `a\\nb\\u{1b}[31m`: missing"
        );
    }
}
