//! Where the relay's time goes: cumulative TSC ticks per phase of the main loop, for the
//! relay benchmark (`scripts/bench relay`, `docs/bench/README.md`).
//!
//! The counters always run (a few `rdtsc` per turn of the loop, which ring 3 executes
//! without an exit). With `profile=1` on the command line, the firmware notes them when the
//! logic dials a connection and prints what they grew by when the logic closes it (with the
//! loop's other console lines, once it is idle), as one console line: `relay: profile conn=<id> uptime_us=.. turns=.. sleeps=.. sleep_us=..
//! smoltcp_us=.. tx_frames=.. tx_us=.. rx_frames=.. rx_refill_us=.. tls_us=.. logic_us=..
//! plaintext_bytes=..` — for a tunnel, its whole life (dial, jobs, close). Nothing is
//! printed at the dial: each console byte is a VM exit (about 25 µs), and a line there would
//! delay the connection.
//!
//! * `sleep_us`/`sleeps`: in `WAIT_UNTIL` (one exit each, and the idle time);
//! * `smoltcp_us`: in `Interface::poll` (TCP/IP, and the card: `tx_us` of it sending frames,
//!   each send one exit; `rx_refill_us` giving receive buffers back, an exit when the card
//!   had run dry);
//! * `tls_us`: moving ciphertext to and from the TLS sessions and running them (AES-GCM
//!   decryption in software, records, the copies);
//! * `logic_us`: the relay logic taking the plaintext (frame decoding, the document CRC).

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use duplex_relay::ConnId;
use duplex_runtime::time::{raw_tsc, ticks_to_ns};

/// Connections whose dial is remembered (the relay has at most 5 open, and a few closing).
const MARKS: usize = 16;

/// TSC ticks spent sending and refilling on the card (updated by `netdev`).
pub struct CardTicks {
    pub tx: Cell<u64>,
    pub tx_frames: Cell<u64>,
    pub rx_refill: Cell<u64>,
    pub rx_frames: Cell<u64>,
}

impl CardTicks {
    pub const fn new() -> Self {
        CardTicks {
            tx: Cell::new(0),
            tx_frames: Cell::new(0),
            rx_refill: Cell::new(0),
            rx_frames: Cell::new(0),
        }
    }
}

/// The counters at one moment (ticks, counts, bytes).
#[derive(Clone, Copy, Default)]
struct Counters([u64; 12]);

const NAMES: [&str; 12] = [
    "uptime_us",
    "turns",
    "sleeps",
    "sleep_us",
    "smoltcp_us",
    "tx_frames",
    "tx_us",
    "rx_frames",
    "rx_refill_us",
    "tls_us",
    "logic_us",
    "plaintext_bytes",
];
/// Which of [`NAMES`] are TSC ticks (printed in µs).
const TICKS: [bool; 12] = [
    true, false, false, true, true, false, true, false, true, true, true, false,
];

/// The main loop's counters.
#[derive(Default)]
pub struct Profile {
    /// Note dials and print at closes.
    pub enabled: bool,
    start: u64,
    pub turns: u64,
    pub sleeps: u64,
    pub sleep: u64,
    pub smoltcp: u64,
    pub tls: u64,
    pub logic: u64,
    pub plaintext_bytes: u64,
    /// The counters at the dial of each open connection.
    marks: Vec<(ConnId, Counters)>,
}

/// Ticks since `t0` (raw TSC: a restore's jump in the bias does not enter).
pub fn since(t0: u64) -> u64 {
    raw_tsc().saturating_sub(t0)
}

impl Profile {
    /// Counters from now; dials noted and closes printed when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Profile {
            enabled,
            start: raw_tsc(),
            ..Profile::default()
        }
    }

    fn counters(&self, card: &CardTicks) -> Counters {
        Counters([
            since(self.start),
            self.turns,
            self.sleeps,
            self.sleep,
            self.smoltcp,
            card.tx_frames.get(),
            card.tx.get(),
            card.rx_frames.get(),
            card.rx_refill.get(),
            self.tls,
            self.logic,
            self.plaintext_bytes,
        ])
    }

    /// Connection `conn` is dialed: remember the counters (when enabled).
    pub fn dialed(&mut self, conn: ConnId, card: &CardTicks) {
        if !self.enabled {
            return;
        }
        if self.marks.len() >= MARKS {
            self.marks.remove(0);
        }
        let now = self.counters(card);
        self.marks.push((conn, now));
    }

    /// Connection `conn` is closed: the line saying what the counters grew by since its
    /// dial (since boot if its dial was not noted), when enabled. The caller prints it
    /// (with the loop's other lines, when it is idle).
    pub fn closed(&mut self, conn: ConnId, card: &CardTicks) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let now = self.counters(card);
        let then = match self.marks.iter().position(|(c, _)| *c == conn) {
            Some(i) => self.marks.remove(i).1,
            None => Counters::default(),
        };
        let mut line = alloc::format!("relay: profile conn={conn}");
        for (i, name) in NAMES.iter().enumerate() {
            let d = now.0[i].saturating_sub(then.0[i]);
            let v = if TICKS[i] { ticks_to_ns(d) / 1000 } else { d };
            line.push_str(&alloc::format!(" {name}={v}"));
        }
        Some(line)
    }
}
