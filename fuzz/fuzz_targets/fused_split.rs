//! Fuzz target: a `config.json` and a safetensors file whose fused tensors (Phi-3's `qkv_proj`,
//! `gate_up_proj`) are split by head counts as opening a checkpoint splits them
//! (`surgery_convert::fuzzing::split_fused`).
//! An internal-invariant error (`Error::Bug`) is a crash. See docs/robustness.md.
#![no_main]

use libfuzzer_sys::fuzz_target;
use surgery_convert::error::Error;

fuzz_target!(|data: &[u8]| {
    if let Err(e @ Error::Bug { .. }) = surgery_convert::fuzzing::split_fused(data) {
        panic!("{e}");
    }
});
