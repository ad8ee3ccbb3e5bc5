//! The `hostile` test firmware: a partition that attacks the monitor and the partitions
//! beside it, for the end-to-end hardening tests (`tests/hostile.rs`). It prints
//! `hostile: <phase> done ...` after each phase, `hostile: done` after the last, then a
//! heartbeat (`hostile: alive N`) every 500 ms, so a test can tell it still runs.
//!
//! Command line (all optional):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `hostile=` | `desc,junk,snap,console` | the phases, in order |
//! | `hostile.peers=` | `3,4` | the CIDs the vsock junk is aimed at (`:`-separated too) |
//! | `hostile.junk=` | `20000` | vsock packets sent in the `junk` phase |
//! | `hostile.snaps=` | `10000` | `SNAPSHOT_REQUEST` writes in the `snap` phase |
//! | `hostile.lines=` | `20000` | console lines in the `console` phase |
//! | `hostile.loop=1` | off | run the phases again and again (`hostile: round N done`), never `done` |
//!
//! Phases:
//! - `desc`: drives its vsock device's registers by hand (not through a driver) and hands
//!   it broken descriptor chains: addresses outside RAM, lengths of 4 GiB, loops, `next`
//!   indexes past the table, an avail index far ahead, indirect descriptors without the
//!   feature, queues placed outside RAM, short headers ([`desc`]).
//! - `junk`: through virtio-drivers' low-level socket, packets for connections that do not
//!   exist, aimed at every port of its peers from thousands of source ports: data (with a
//!   made-up credit), credit updates, shutdowns, resets, and connection requests. It never
//!   reads its own receive queue.
//! - `snap`: writes `SNAPSHOT_REQUEST` in a loop (alternating snapshot and reboot).
//! - `console`: prints lines of 200 bytes as fast as it can.

#![no_std]
#![no_main]

extern crate alloc;

mod desc;
mod junk;

use duplex_runtime::bootinfo::parse_u64;
use duplex_runtime::{println, sysctl, time, BootInfo};

duplex_runtime::entry!(main);

fn count(boot: &BootInfo, key: &str, default: u64) -> u64 {
    boot.arg(key).and_then(parse_u64).unwrap_or(default)
}

fn main(boot: &BootInfo) -> ! {
    println!("duplex hostile: cmdline=\"{}\"", boot.cmdline);
    let phases = boot.arg("hostile").unwrap_or("desc,junk,snap,console");
    let forever = boot.arg("hostile.loop") == Some("1");
    let mut round = 0u64;
    loop {
        run_phases(boot, phases);
        round += 1;
        if !forever {
            break;
        }
        println!("hostile: round {round} done");
    }
    println!("hostile: done");
    let mut beat = 0u64;
    loop {
        time::sleep_ms(500);
        beat += 1;
        println!("hostile: alive {beat}");
    }
}

fn run_phases(boot: &BootInfo, phases: &str) {
    for phase in phases.split(',') {
        match phase {
            "desc" => desc::run(boot),
            "junk" => junk::run(boot, count(boot, "hostile.junk", 20_000)),
            "snap" => {
                let n = count(boot, "hostile.snaps", 10_000);
                for i in 0..n {
                    sysctl::request_snapshot(i % 2 == 1);
                }
                println!("hostile: snap done requests={n}");
            }
            "console" => {
                let n = count(boot, "hostile.lines", 20_000);
                let pad = [b'x'; 180];
                let pad = core::str::from_utf8(&pad).unwrap_or("");
                for i in 0..n {
                    println!("hostile: flood {i:08} {pad}");
                }
                println!("hostile: console done lines={n}");
            }
            "" => {}
            other => println!("hostile: unknown phase {other}"),
        }
    }
}
