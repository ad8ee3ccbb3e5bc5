//! The `netecho` test firmware: opens the partition's virtio-net card
//! (`duplex_runtime::net::open_net`), prints
//!
//! ```text
//! netecho: mac=<aa:bb:cc:dd:ee:ff> READY
//! ```
//!
//! and sends every Ethernet frame it receives back with its destination and source MAC
//! addresses swapped (the rest of the frame as it came). It counts the frames it echoed
//! and, once a second if the count changed, prints `netecho: echoed <N>`.
//!
//! It takes no interrupts: it polls the card's used ring and, when nothing came, sleeps in
//! the monitor (`WAIT_UNTIL`), which the monitor ends early when it delivers a frame: for at
//! most [`BUSY_SLEEP_MS`] within [`BUSY_MS`] of the last frame, otherwise until the next
//! report. Without a card it prints `netecho: no network card` and
//! powers off with status 1.
//!
//! With `netecho.sleep=1` it goes to sleep (power saving, guest ABI `SLEEP`) right after
//! `READY`, printing `netecho: asleep`; once woken it prints `netecho: woken reason=<N>`
//! (the `WAKE_REASON`: 1 magic packet, 2 operator) and echoes as usual. The monitor's tests
//! use it to check Wake-on-LAN and sleeping partitions without the relay.
//!
//! With `netecho.card=off` on the command line it leaves the card alone (never starts its
//! driver, so the card has no receive buffers), prints `netecho: card left alone READY`
//! and sleeps: the monitor's tests use it to check that frames waiting for a card that
//! cannot take them cost nothing.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use duplex_runtime::net::{mac_string, open_net, Net};
use duplex_runtime::time::{self, rdtsc};
use duplex_runtime::{println, sysctl, BootInfo};

duplex_runtime::entry!(main);

/// Frames echoed so far (kept in guest memory: a snapshot carries it).
static ECHOED: AtomicU64 = AtomicU64::new(0);
/// Longest sleep right after traffic (the monitor wakes the vCPU when a frame arrives
/// anyway; this only bounds the cost of a missed wake while frames flow).
const BUSY_SLEEP_MS: u64 = 1;
/// How long after the last frame the firmware still counts as busy.
const BUSY_MS: u64 = 100;
/// How often the count is printed (when it changed).
const REPORT_MS: u64 = 1000;
/// An Ethernet header: destination, source, EtherType.
const ETH_HDR: usize = 14;

fn main(boot: &BootInfo) -> ! {
    if boot.arg("netecho.card") == Some("off") {
        println!("netecho: card left alone READY");
        sysctl::park();
    }
    let Some(mut net) = open_net(boot) else {
        println!("netecho: no network card");
        sysctl::power_off(1);
    };
    println!("netecho: mac={} READY", mac_string(&net));
    if boot.arg("netecho.sleep") == Some("1") {
        println!("netecho: asleep");
        let reason = sysctl::sleep();
        println!("netecho: woken reason={reason}");
    }
    let report = time::ns_to_ticks(REPORT_MS * 1_000_000);
    let busy_sleep = time::ns_to_ticks(BUSY_SLEEP_MS * 1_000_000);
    let busy = time::ns_to_ticks(BUSY_MS * 1_000_000);
    let mut next_report = rdtsc().saturating_add(report);
    let mut reported = 0;
    let mut last_frame = 0;
    loop {
        let mut moved = false;
        while net.can_recv() {
            echo_one(&mut net);
            moved = true;
        }
        let now = rdtsc();
        if moved {
            last_frame = now;
        }
        if now >= next_report {
            let n = ECHOED.load(Relaxed);
            if n != reported {
                println!("netecho: echoed {n}");
                reported = n;
            }
            next_report = now.saturating_add(report);
        }
        if !moved {
            let deadline = if now.saturating_sub(last_frame) < busy {
                now.saturating_add(busy_sleep).min(next_report)
            } else {
                next_report
            };
            sysctl::wait_until(deadline);
        }
    }
}

/// Takes one received frame, sends it back with its MAC addresses swapped, and gives the
/// receive buffer back to the card.
fn echo_one(net: &mut Net) {
    let rx = match net.receive() {
        Ok(rx) => rx,
        Err(e) => {
            println!("netecho: receive: {e}");
            return;
        }
    };
    let frame = rx.packet();
    if frame.len() >= ETH_HDR {
        let mut tx = net.new_tx_buffer(frame.len());
        let out = tx.packet_mut();
        out.copy_from_slice(frame);
        out[..6].copy_from_slice(&frame[6..12]);
        out[6..12].copy_from_slice(&frame[..6]);
        match net.send(tx) {
            Ok(()) => {
                ECHOED.fetch_add(1, Relaxed);
            }
            Err(e) => println!("netecho: send: {e}"),
        }
    }
    if let Err(e) = net.recycle_rx_buffer(rx) {
        println!("netecho: recycling a receive buffer: {e}");
    }
}
