//! Fuzz target: a factored checkpoint's `config.json` (`latent_attention`), parsed, validated and
//! laid out as opening a checkpoint does (`surgery_convert::fuzzing::factored_config`).
//! An internal-invariant error (`Error::Bug`) is a crash. See docs/robustness.md.
#![no_main]

use libfuzzer_sys::fuzz_target;
use surgery_convert::error::Error;

fuzz_target!(|data: &[u8]| {
    if let Err(e @ Error::Bug { .. }) = surgery_convert::fuzzing::factored_config(data) {
        panic!("{e}");
    }
});
