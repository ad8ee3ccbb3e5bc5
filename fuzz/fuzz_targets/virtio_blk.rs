//! Fuzz target: a hostile driver's register accesses and descriptor chains against
//! `duplex_fuzz::blk` (see that module for the program format and the invariants).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duplex_fuzz::blk::run(data);
});
