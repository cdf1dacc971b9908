//! The `surgery-convert` executable: parses and resolves the command line once, runs the command,
//! and prints any error once, on one line, with a meaningful exit code (see `Error::exit_code`).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use clap::Parser;
use std::process::ExitCode;
use surgery_convert::cli::{Cli, Task};
use surgery_convert::commands;
use surgery_convert::error::Result;

fn run(cli: Cli) -> Result<()> {
    let invocation = cli.resolve()?;
    commands::set_threads(invocation.threads)?;
    match invocation.task {
        Task::Verify(dir) => commands::verify::run(&dir),
        Task::Expand(options) => commands::expand::run(&options),
        Task::Eval(options) => commands::eval::run(&options).map(|_| ()),
        Task::Sweep(options) => commands::sweep::run(&options).map(|_| ()),
        Task::Inspect(options) => commands::inspect::run(&options).map(|_| ()),
        Task::Convert(options) => commands::convert::run(&options).map(|_| ()),
    }
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
