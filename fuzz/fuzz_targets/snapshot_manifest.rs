//! Fuzz target: the snapshot manifest parser (`duplex_snapshot::manifest::unseal`); see `duplex_fuzz::snapshot`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duplex_fuzz::snapshot::check_manifest(data);
});
