//! The engine firmware (placeholder): a banner `duplex engine: role=engine cmdline="..."`, then
//! `engine heartbeat N` every `heartbeat_ms` (default 1000) milliseconds.

#![no_std]
#![no_main]

use duplex_runtime::{heartbeat, BootInfo};

duplex_runtime::entry!(main);

fn main(boot: &BootInfo) -> ! {
    heartbeat::run(boot, "engine")
}
