//! Fuzz target: a hostile driver's register accesses and descriptor chains against
//! `duplex_fuzz::vsock` (see that module for the program format and the invariants).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duplex_fuzz::vsock::run(data);
});
