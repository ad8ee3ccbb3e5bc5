//! Fuzz target: a whole snapshot set directory, opened, verified and read as a restore does; see `duplex_fuzz::snapshot`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = duplex_fuzz::snapshot::check_set(data);
});
