//! The engine firmware: a simulated print engine on the print link (`docs/print-pipeline.md`,
//! `docs/link-protocol.md`).
//!
//! Prints `duplex engine: role=engine cmdline="..."`, listens on vsock port 5000 (the link
//! port), then calibrates: builds the tone curve and renders a test pattern over
//! `calib_mib` (default 48) MiB of heap, touching every page and checksumming it, in 1 MiB
//! steps between which it keeps serving the link (answering `warming_up`). Then
//! `engine calibrated <mib> MiB in <ms> ms`, `engine calibration checksum 0x........` and
//! `engine READY`, and every connection gets `Ready`. From then on it halftones the pages
//! the controller sends (`PageDone` with the checksum) until jammed (`PageFailed "paper
//! jam"` until `ClearJam`). `engine heartbeat N` every `heartbeat_ms` (default 1000) ms
//! throughout. The protocol logic is `duplex_link::engine::Engine`.
//!
//! Coordinated snapshot: `PrepareSnapshot` is answered like every other message, in order
//! (so every page before it is done), approved unless jammed or warming up. The
//! heartbeat counter, `pages_printed`, the toner and the calibration area live in ordinary
//! memory, so after a restore from a snapshot set they simply go on.
//!
//! Without a vsock device it still calibrates and beats, and says so.

#![no_std]
#![no_main]

extern crate alloc;

#[path = "../../link/firmware/common.rs"]
mod common;

use alloc::vec::Vec;

use duplex_link::engine::Engine;
use duplex_link::print::{gamma_table, render_test_pattern, Crc32};
use duplex_link::{FromEngine, ToEngine, LINK_PORT};
use duplex_runtime::time::{self, Instant};
use duplex_runtime::vsock::{self, Vsock, VsockEvent, VsockEventType};
use duplex_runtime::{heap, heartbeat, println, BootInfo};

use common::{Beat, Conn};

duplex_runtime::entry!(main);

/// Default `calib_mib`.
const DEFAULT_CALIB_MIB: u64 = 48;
/// Calibration work between two looks at the link.
const CALIB_STEP: usize = 1 << 20;
/// Heap left free when `calib_mib` asks for more than there is.
const HEAP_RESERVE: usize = 8 << 20;
/// Events handled between two rounds of sending.
const EVENT_BATCH: usize = 32;

fn main(boot: &BootInfo) -> ! {
    println!("duplex engine: role=engine cmdline=\"{}\"", boot.cmdline);
    let mut vsock = vsock::open_vsock(boot);
    match &mut vsock {
        Some(v) => {
            v.listen(LINK_PORT);
            println!(
                "engine: vsock cid {} listening on port {LINK_PORT}",
                vsock::local_cid(v)
            );
        }
        None => println!("engine: no vsock device; the print link is off"),
    }
    let mut fw = Firmware {
        engine: Engine::new(gamma_table()),
        conns: Vec::new(),
        scratch: common::scratch(),
        beat: Beat::new(
            "engine",
            heartbeat::period_ms(boot, heartbeat::DEFAULT_PERIOD_MS),
        ),
    };
    let mut calib = Calibration::new(boot);
    loop {
        if let Some(cal) = calib.as_mut() {
            if cal.step() {
                cal.report();
                calib = None;
                let ready = fw.engine.calibrated();
                println!("engine READY");
                for c in fw.conns.iter_mut() {
                    c.send(&ready);
                }
            }
        }
        fw.beat.tick();
        let Some(v) = vsock.as_mut() else {
            if calib.is_none() {
                time::sleep_until(Instant::from_tsc(fw.beat.next));
            }
            continue;
        };
        let progressed = fw.flush(v);
        // While calibrating, or after sending, only look; otherwise sleep until an event or
        // the next heartbeat.
        let mut event = if progressed || calib.is_some() {
            poll(v)
        } else {
            let deadline = fw
                .conns
                .iter()
                .filter_map(Conn::deadline)
                .fold(fw.beat.next, u64::min);
            vsock::wait_for_event(v, deadline)
        };
        for _ in 0..EVENT_BATCH {
            let Some(e) = event else { break };
            fw.handle(v, e);
            event = poll(v);
        }
        if let Some(e) = event {
            fw.handle(v, e);
        }
    }
}

/// [`vsock::poll`], printing errors.
fn poll(v: &mut Vsock) -> Option<VsockEvent> {
    vsock::poll(v).unwrap_or_else(|e| {
        println!("engine: vsock: {e}");
        None
    })
}

/// Milliseconds since boot, the engine's clock.
fn now_ms() -> u64 {
    time::now_ns() / 1_000_000
}

/// The cold-start calibration, done in steps.
struct Calibration {
    area: Vec<u8>,
    size: usize,
    gamma: [u8; 256],
    crc: Crc32,
    start: Instant,
}

impl Calibration {
    fn new(boot: &BootInfo) -> Option<Self> {
        let want_mib = boot.arg_u64("calib_mib").unwrap_or(DEFAULT_CALIB_MIB);
        let want = usize::try_from(want_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let room = heap::free().saturating_sub(HEAP_RESERVE) & !(CALIB_STEP - 1);
        let size = if want > room {
            println!(
                "engine: calib_mib={want_mib} does not fit the heap; calibrating {} MiB",
                room >> 20
            );
            room
        } else {
            want
        };
        let start = Instant::now();
        Some(Calibration {
            area: Vec::with_capacity(size),
            size,
            gamma: gamma_table(),
            crc: Crc32::new(),
            start,
        })
    }

    /// One step; true when calibration is complete.
    fn step(&mut self) -> bool {
        let done = self.area.len();
        let n = CALIB_STEP.min(self.size - done);
        if n > 0 {
            self.area.resize(done + n, 0);
            let chunk = &mut self.area[done..];
            render_test_pattern(chunk, done as u64, &self.gamma);
            self.crc.update(chunk);
        }
        self.area.len() == self.size
    }

    fn report(&mut self) {
        let ms = self.start.elapsed().as_millis();
        println!("engine calibrated {} MiB in {ms} ms", self.size >> 20);
        let crc = core::mem::take(&mut self.crc).finish();
        println!("engine calibration checksum {crc:#010x}");
        // The rendered pattern stays in memory: it is part of the engine's state.
        core::mem::forget(core::mem::take(&mut self.area));
    }
}

struct Firmware {
    engine: Engine,
    conns: Vec<Conn<ToEngine>>,
    scratch: Vec<u8>,
    beat: Beat,
}

impl Firmware {
    /// Sends what credit allows on every connection; drops closed ones. Returns whether
    /// anything was sent.
    fn flush(&mut self, v: &mut Vsock) -> bool {
        let mut progressed = false;
        for c in self.conns.iter_mut() {
            progressed |= c.flush(v);
        }
        self.conns.retain(|c| !c.gone);
        progressed
    }

    fn handle(&mut self, v: &mut Vsock, event: VsockEvent) {
        let idx = self.conns.iter().position(|c| c.matches(&event));
        match event.event_type {
            VsockEventType::ConnectionRequest => {
                // The manager accepted it (only the link port is listened on).
                let mut c = Conn::new(event.source, event.destination.port);
                c.on_event(&event);
                println!("engine: link from cid {}", event.source.cid);
                if let Some(greeting) = self.engine.greeting() {
                    c.send(&greeting);
                }
                match idx {
                    Some(i) => self.conns[i] = c,
                    None => self.conns.push(c),
                }
            }
            VsockEventType::Received { .. } => {
                if let Some(i) = idx {
                    self.conns[i].on_event(&event);
                    self.serve(v, i);
                }
            }
            VsockEventType::Disconnected { reason } => {
                if let Some(i) = idx {
                    // Answer what arrived before the end, then forget the connection.
                    self.serve(v, i);
                    let c = &mut self.conns[i];
                    c.gone = true;
                    println!("engine: link from cid {} closed ({reason:?})", c.peer.cid);
                }
            }
            VsockEventType::Connected
            | VsockEventType::CreditUpdate
            | VsockEventType::CreditRequest => {
                if let Some(i) = idx {
                    self.conns[i].on_event(&event);
                }
            }
        }
    }

    /// Reads and answers everything connection `i` has sent.
    fn serve(&mut self, v: &mut Vsock, i: usize) {
        let c = &mut self.conns[i];
        c.drain(v, &mut self.scratch);
        while let Some(msg) = c.next_message() {
            match msg {
                Ok(ToEngine::Crash) => {
                    println!("engine: crash requested by cid {}", c.peer.cid);
                    // SAFETY: `ud2` raises #UD on purpose; the runtime's fault handler
                    // reports it and the monitor ends this partition (a test hook).
                    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
                }
                Ok(msg) => {
                    let reply: FromEngine = self.engine.handle(msg, now_ms());
                    c.send(&reply);
                }
                Err(e) => {
                    println!(
                        "engine: malformed frame from cid {}: {e}; closing",
                        c.peer.cid
                    );
                    c.close();
                    break;
                }
            }
        }
    }
}
