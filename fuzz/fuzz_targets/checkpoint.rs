//! Fuzz target: config.json + index + safetensors headers, opened and planned as the converter does
//! (`surgery_convert::fuzzing::open_and_plan`). Run with `scripts/fuzz` (see docs/robustness.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn work_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("SURGERY_FUZZ_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        base.join(format!("surgery-fuzz-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = surgery_convert::fuzzing::open_and_plan(data, work_dir().join("ckpt").as_path());
});
