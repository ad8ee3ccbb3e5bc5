//! Fuzz target: the host bridge's `CONNECT <port>` line; see `duplex_fuzz::connect`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duplex_fuzz::connect::check_line(data);
});
