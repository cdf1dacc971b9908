//! The `surgery-convert` executable: parses the command line, runs, and prints any error once, on one
//! line, with a meaningful exit code (2 for usage errors, 1 for everything else).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use clap::Parser;
use std::process::ExitCode;
use surgery_convert::cli::{Cli, Command};
use surgery_convert::error::{Error, Result};
use surgery_convert::{convert, eval, expand, inspect, sweep, verify};

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Verify { dir }) => {
            let v = verify::verify(&dir)?;
            println!(
                "OK: {} ({} files match SHA256SUMS; {} safetensors files, {} tensors, headers and index valid)",
                dir.display(),
                v.files,
                v.weight_files,
                v.tensors
            );
            Ok(())
        }
        Some(Command::Expand(args)) => expand::run(&args),
        Some(Command::Eval(args)) => {
            if let Some(n) = args.threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.get())
                    .build_global()
                    .map_err(|e| Error::usage("--threads", e.to_string()))?;
            }
            eval::run(&args).map(|_| ())
        }
        Some(Command::Sweep(args)) => {
            set_threads(args.threads)?;
            sweep::run(&args).map(|_| ())
        }
        Some(Command::Synth(args)) => {
            let out = surgery_convert::synth::write(args.shape, args.seed, &args.out, args.force)?;
            println!("{}", out.display());
            Ok(())
        }
        Some(Command::Inspect(args)) => {
            set_threads(args.threads)?;
            inspect::run(&args).map(|_| ())
        }
        None => {
            let options = cli.convert.resolve()?;
            if let Some(n) = options.threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.get())
                    .build_global()
                    .map_err(|e| Error::usage("--threads", e.to_string()))?;
            }
            if options.bench_decompose {
                let (seconds, matrices) = convert::decompose_floor(&options)?;
                println!("{{\"decompose_seconds\": {seconds}, \"matrices\": {matrices}}}");
                return Ok(());
            }
            convert::run(&options).map(|_| ())
        }
    }
}

/// Sizes the global thread pool to `--threads`, when given.
fn set_threads(threads: Option<std::num::NonZeroUsize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.get())
            .build_global()
            .map_err(|e| Error::usage("--threads", e.to_string()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's own message names the flag and the cause.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("surgery-convert: error: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = surgery_convert::interrupt::install() {
        eprintln!("surgery-convert: error: {e}");
        return ExitCode::from(1);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("surgery-convert: error: {}", e.to_line());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
