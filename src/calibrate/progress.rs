//! What the stage says about its passes while they run: each pass is named when it starts, then
//! told layer by layer, then finished. The command draws it (a bar with the layer, tokens per
//! second and the time left, the commands' `PassBars`); the stage never prints.

/// Receives the stage's progress. Every method defaults to doing nothing.
pub trait Progress: Sync {
    /// Pass `pass` starts: it crosses `layers` layers over `tokens` positions.
    fn start(&self, pass: &'static str, layers: usize, tokens: usize) {
        let _ = (pass, layers, tokens);
    }

    /// One more layer of the current pass is done.
    fn layer(&self) {}

    /// The current pass is over.
    fn finish(&self) {}
}

/// Progress nobody is told of (`--quiet`, tests).
pub struct Silent;

impl Progress for Silent {}

/// The pass names the stage uses.
pub mod names {
    /// The one-shot pass ([`super::super::one_shot`]).
    pub const ONE_SHOT: &str = "one-shot pass";
    /// The `o_proj` refit ([`super::super::refit`]).
    pub const REFIT: &str = "o_proj refit";
    /// The sequential pass ([`super::super::sequential`]).
    pub const SEQUENTIAL: &str = "sequential pass";
    /// The probes of `--budget-allocation sensitivity` ([`super::super::sensitivity`]).
    pub const PROBES: &str = "sensitivity probes";
}
