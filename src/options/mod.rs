//! The validated options the library consumes: what `cli` resolves the command line into, once.
//! Nothing here parses flags or re-checks values; types are built only by `cli` (and by tests and
//! the dev binary, which skip the command line).
//!
//! - [`ConvertOptions`]: a conversion (the default command);
//! - [`EvalOptions`], [`ExpandOptions`], [`InspectOptions`], [`SweepOptions`]: the subcommands;
//! - [`Calibration`]: the text and settings of fit `act`, shared by conversions and `sweep`;
//! - [`CommandLine`]: the one builder of the "command that reproduces this output" strings.

mod command_line;
mod convert;
mod subcommands;

pub use command_line::CommandLine;
pub use convert::{
    check_by_default, Allocation, BosSink, CalibrateMode, Calibration, ConvertOptions, Output,
    TextWindow, CHECK_CTX, CHECK_TOKENS, DEFAULT_COMPENSATE,
};
pub use subcommands::{EvalOptions, ExpandOptions, InspectOptions, SweepConfig, SweepOptions};
