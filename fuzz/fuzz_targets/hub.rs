//! Fuzz target: what a Hugging Face hub sends before anything reaches the disk (a revision
//! listing, an ETag, a Content-Range, a redirect Location), checked as a download checks it
//! (`surgery_convert::fuzzing::hub_answer`). See docs/robustness.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = surgery_convert::fuzzing::hub_answer(data);
});
