//! Fuzz target: one control-socket request line (`duplex_vmm::api::parse_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duplex_fuzz::control::check_line(data);
});
