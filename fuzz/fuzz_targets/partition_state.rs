//! Fuzz target: a set's state files (partition and vsock switch states), parsed and restored into devices; see `duplex_fuzz::state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duplex_fuzz::state::check_state(data);
});
