//! The controller firmware: print jobs from host clients to the engine
//! (`docs/print-pipeline.md`, `docs/link-protocol.md`).
//!
//! Prints `duplex controller: role=controller cmdline="..."`, listens on vsock port 1024
//! (the job port) for any number of host clients, and connects to the engine at
//! `engine_cid` (default 3) port 5000, retrying every 100 ms until it answers and again
//! after the link resets. Prints `controller READY: engine ready (cid N)` when the engine
//! first says `Ready`, and `controller heartbeat N` every `heartbeat_ms` (default 1000) ms.
//! The job table and dispatch logic is `duplex_link::controller::Controller`; this file
//! moves its messages.
//!
//! Coordinated snapshot: the monitor's `PrepareSnapshot` is forwarded to the engine like
//! any other request (the logic answers it); a host's `RequestSnapshot` makes this
//! firmware write the guest ABI's `SNAPSHOT_REQUEST` register
//! (`duplex_runtime::sysctl::request_snapshot`) and print
//! `controller: snapshot requested (reboot=<b>)`. Nothing else changes: the monitor
//! pauses the partitions at its cut, and what is in flight then is part of the set.
//!
//! Documents: at start it opens its virtio-blk disk and the document service on it
//! (`docs.rs`, `duplex-docsvc`) and prints `controller: store ready (<stats>)`, or
//! `controller: no disk: documents disabled` (then every `Box` request is answered 503).
//! The link logic queues `Box` requests in each client's reply order; this firmware
//! answers them from the service after every round of events, and stores finished scans.
//!
//! Without a vsock device it only beats, and says so.

#![no_std]
#![no_main]

extern crate alloc;

#[path = "../../link/firmware/common.rs"]
mod common;
mod docs;

use alloc::vec::Vec;

use duplex_docsvc::DocService;
use duplex_link::controller::{Action, ClientId, Controller};
use duplex_link::{FromEngine, HostRequest, DEFAULT_ENGINE_CID, JOB_PORT, LINK_PORT};
use duplex_runtime::time::{self, rdtsc, sleep_until, Instant};
use duplex_runtime::vsock::{self, Vsock, VsockAddr, VsockEvent, VsockEventType};
use duplex_runtime::{heartbeat, println, sysctl, BootInfo};

use common::{ms_from_now, Beat, Conn};

duplex_runtime::entry!(main);

/// Pause between attempts to reach the engine.
const RETRY_MS: u64 = 100;
/// How long a connection request to the engine may go unanswered.
const CONNECT_TIMEOUT_MS: u64 = 1000;
/// How long the engine may stay silent while the controller waits for an answer.
const ENGINE_SILENCE_MS: u64 = 10_000;
/// Local ports for connections to the engine: a fresh one per attempt.
const ENGINE_PORT_FIRST: u32 = 49152;
/// Events handled between two rounds of sending.
const EVENT_BATCH: usize = 32;

fn main(boot: &BootInfo) -> ! {
    println!(
        "duplex controller: role=controller cmdline=\"{}\"",
        boot.cmdline
    );
    let mut beat = Beat::new(
        "controller",
        heartbeat::period_ms(boot, heartbeat::DEFAULT_PERIOD_MS),
    );
    let store = docs::open(boot);
    let Some(mut v) = vsock::open_vsock(boot) else {
        println!("controller: no vsock device; no jobs, no engine");
        loop {
            sleep_until(Instant::from_tsc(beat.next));
            beat.tick();
        }
    };
    v.listen(JOB_PORT);
    let engine_cid = boot.arg_u64("engine_cid").unwrap_or(DEFAULT_ENGINE_CID);
    println!(
        "controller: vsock cid {} listening on port {JOB_PORT}, engine at cid {engine_cid} port {LINK_PORT}",
        vsock::local_cid(&v)
    );
    let mut fw = Firmware {
        ctl: Controller::new(),
        engine_addr: VsockAddr {
            cid: engine_cid,
            port: LINK_PORT,
        },
        link: EngineLink::Idle { retry_at: 0 },
        next_port: ENGINE_PORT_FIRST,
        attempts: 0,
        clients: Vec::new(),
        next_client: 1,
        scratch: common::scratch(),
        ready_seen: false,
        docs: store,
    };
    loop {
        beat.tick();
        fw.maintain(&mut v);
        fw.serve_docs();
        let progressed = fw.flush(&mut v);
        let mut event = if progressed {
            poll(&mut v)
        } else {
            let deadline = fw.deadline().map_or(beat.next, |d| d.min(beat.next));
            vsock::wait_for_event(&mut v, deadline)
        };
        for _ in 0..EVENT_BATCH {
            let Some(e) = event else { break };
            fw.handle(&mut v, e);
            event = poll(&mut v);
        }
        if let Some(e) = event {
            fw.handle(&mut v, e);
        }
    }
}

/// [`vsock::poll`], printing errors.
fn poll(v: &mut Vsock) -> Option<VsockEvent> {
    vsock::poll(v).unwrap_or_else(|e| {
        println!("controller: vsock: {e}");
        None
    })
}

/// [`ENGINE_SILENCE_MS`] in TSC ticks.
fn silence_ticks() -> u64 {
    time::ns_to_ticks(ENGINE_SILENCE_MS * 1_000_000)
}

/// The connection to the engine.
enum EngineLink {
    /// Not connected; the next attempt at this TSC value.
    Idle { retry_at: u64 },
    /// Connection requested from local `port`; given up at `deadline`.
    Connecting { port: u32, deadline: u64 },
    /// Connected; `heard` is the TSC of the engine's last event or of the last message
    /// sent to it, whichever is later.
    Up { conn: Conn<FromEngine>, heard: u64 },
}

struct Firmware {
    ctl: Controller,
    engine_addr: VsockAddr,
    link: EngineLink,
    next_port: u32,
    /// Failed attempts in a row (the first is reported, then every 100th).
    attempts: u64,
    clients: Vec<(ClientId, Conn<HostRequest>)>,
    next_client: ClientId,
    scratch: Vec<u8>,
    ready_seen: bool,
    /// The document service (`None`: no disk).
    docs: Option<DocService<docs::BlkDisk>>,
}

impl Firmware {
    /// Answers the `Box` and share requests the logic queued and stores the scans it
    /// finished.
    fn serve_docs(&mut self) {
        loop {
            let requests = self.ctl.take_box_requests();
            let scans = self.ctl.take_scans_done();
            let shares = self.ctl.take_share_requests();
            if requests.is_empty() && scans.is_empty() && shares.is_empty() {
                return;
            }
            for r in shares {
                let actions = docs::serve_share(&mut self.ctl, self.docs.as_mut(), r);
                self.apply(actions);
            }
            for r in requests {
                let actions = docs::serve(&mut self.ctl, self.docs.as_mut(), r);
                self.apply(actions);
            }
            for d in scans {
                let actions = docs::store_scan(&mut self.ctl, self.docs.as_mut(), d);
                self.apply(actions);
            }
        }
    }

    /// Starts connection attempts and gives up on stale ones, by the clock.
    fn maintain(&mut self, v: &mut Vsock) {
        let now = rdtsc();
        match &mut self.link {
            EngineLink::Idle { retry_at } if now >= *retry_at => {
                let port = self.next_port;
                self.next_port = if port == u32::from(u16::MAX) {
                    ENGINE_PORT_FIRST
                } else {
                    port + 1
                };
                match v.connect(self.engine_addr, port) {
                    Ok(()) => {
                        self.link = EngineLink::Connecting {
                            port,
                            deadline: ms_from_now(CONNECT_TIMEOUT_MS),
                        }
                    }
                    Err(e) => {
                        println!("controller: connect to the engine: {e}");
                        self.retry_later();
                    }
                }
            }
            EngineLink::Connecting { port, deadline } if now >= *deadline => {
                let _ = v.force_close(self.engine_addr, *port);
                self.note_failure("no answer");
                self.retry_later();
            }
            EngineLink::Up { conn, heard }
                if self.ctl.awaiting_engine() && now.saturating_sub(*heard) >= silence_ticks() =>
            {
                println!("controller: the engine went silent; resetting the link");
                conn.abort(v);
                self.engine_down();
            }
            _ => {}
        }
    }

    fn retry_later(&mut self) {
        self.link = EngineLink::Idle {
            retry_at: ms_from_now(RETRY_MS),
        };
    }

    fn note_failure(&mut self, why: &str) {
        if self.attempts.is_multiple_of(100) {
            println!(
                "controller: engine at cid {}: {why}; retrying every {RETRY_MS} ms",
                self.engine_addr.cid
            );
        }
        self.attempts += 1;
    }

    /// The engine link is gone: tell the logic, try again shortly.
    fn engine_down(&mut self) {
        let actions = self.ctl.on_engine_reset();
        self.retry_later();
        self.apply(actions);
    }

    /// The earliest clock deadline of the loop (besides the heartbeat).
    fn deadline(&self) -> Option<u64> {
        let link = match &self.link {
            EngineLink::Idle { retry_at } => Some(*retry_at),
            EngineLink::Connecting { deadline, .. } => Some(*deadline),
            EngineLink::Up { conn, heard } => {
                let silence = self
                    .ctl
                    .awaiting_engine()
                    .then(|| heard.saturating_add(silence_ticks()));
                silence.into_iter().chain(conn.deadline()).min()
            }
        };
        self.clients
            .iter()
            .filter_map(|(_, c)| c.deadline())
            .chain(link)
            .min()
    }

    /// Sends what credit allows everywhere; drops closed client connections.
    fn flush(&mut self, v: &mut Vsock) -> bool {
        let mut progressed = false;
        let mut failed = false;
        if let EngineLink::Up { conn, .. } = &mut self.link {
            progressed |= conn.flush(v);
            failed = conn.gone;
        }
        if failed {
            println!("controller: engine link failed");
            self.engine_down();
        }
        for (_, c) in self.clients.iter_mut() {
            progressed |= c.flush(v);
        }
        let ctl = &mut self.ctl;
        self.clients.retain(|(id, c)| {
            if c.gone {
                ctl.on_host_closed(*id);
            }
            !c.gone
        });
        progressed
    }

    fn handle(&mut self, v: &mut Vsock, event: VsockEvent) {
        if event.source == self.engine_addr {
            self.handle_engine(v, event);
            return;
        }
        let idx = self.clients.iter().position(|(_, c)| c.matches(&event));
        match event.event_type {
            VsockEventType::ConnectionRequest => {
                // Accepted by the manager (only the job port is listened on).
                let mut c = Conn::new(event.source, event.destination.port);
                c.on_event(&event);
                let id = self.next_client;
                self.next_client += 1;
                match idx {
                    Some(i) => {
                        let old = self.clients[i].0;
                        self.ctl.on_host_closed(old);
                        self.clients[i] = (id, c);
                    }
                    None => self.clients.push((id, c)),
                }
            }
            VsockEventType::Received { .. } => {
                if let Some(i) = idx {
                    self.clients[i].1.on_event(&event);
                    self.serve_client(v, i);
                }
            }
            VsockEventType::Disconnected { .. } => {
                if let Some(i) = idx {
                    // Requests that arrived before the end still count (a job submitted
                    // and the connection closed at once is still printed).
                    self.serve_client(v, i);
                    let (id, _) = self.clients.remove(i);
                    self.ctl.on_host_closed(id);
                }
            }
            VsockEventType::Connected
            | VsockEventType::CreditUpdate
            | VsockEventType::CreditRequest => {
                if let Some(i) = idx {
                    self.clients[i].1.on_event(&event);
                }
            }
        }
    }

    fn serve_client(&mut self, v: &mut Vsock, i: usize) {
        let (id, c) = &mut self.clients[i];
        let id = *id;
        c.drain(v, &mut self.scratch);
        let mut msgs = Vec::new();
        while let Some(m) = c.next_message() {
            let bad = m.is_err();
            msgs.push(m);
            if bad {
                break;
            }
        }
        for m in msgs {
            let actions = match m {
                Ok(req) => self.ctl.on_host(id, req),
                Err(e) => {
                    println!("controller: malformed frame from client {id}: {e}; closing it");
                    self.ctl.on_host_malformed(id, &e)
                }
            };
            self.apply(actions);
        }
    }

    fn handle_engine(&mut self, v: &mut Vsock, event: VsockEvent) {
        match &mut self.link {
            EngineLink::Connecting { port, .. } if event.destination.port == *port => {
                match event.event_type {
                    VsockEventType::Connected => {
                        let mut conn = Conn::new(self.engine_addr, *port);
                        conn.on_event(&event);
                        self.attempts = 0;
                        self.link = EngineLink::Up {
                            conn,
                            heard: rdtsc(),
                        };
                        let actions = self.ctl.on_engine_connected();
                        self.apply(actions);
                    }
                    VsockEventType::Disconnected { .. } => {
                        self.note_failure("refused");
                        self.retry_later();
                    }
                    _ => {}
                }
            }
            EngineLink::Up { conn, heard } if conn.matches(&event) => {
                conn.on_event(&event);
                *heard = rdtsc();
                match event.event_type {
                    VsockEventType::Received { .. } => self.serve_engine(v),
                    VsockEventType::Disconnected { reason } => {
                        self.serve_engine(v);
                        println!("controller: engine link closed ({reason:?})");
                        if let EngineLink::Up { conn, .. } = &mut self.link {
                            conn.gone = true;
                        }
                        self.engine_down();
                    }
                    _ => {}
                }
            }
            _ => {
                // A stale connection (an earlier attempt): make sure it is gone.
                if let VsockEventType::Received { .. } = event.event_type {
                    let _ = v.force_close(event.source, event.destination.port);
                }
            }
        }
    }

    fn serve_engine(&mut self, v: &mut Vsock) {
        let EngineLink::Up { conn, .. } = &mut self.link else {
            return;
        };
        conn.drain(v, &mut self.scratch);
        let mut msgs = Vec::new();
        let mut bad = None;
        while let Some(m) = conn.next_message() {
            match m {
                Ok(m) => msgs.push(m),
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        for m in msgs {
            let actions = self.ctl.on_engine(m);
            self.apply(actions);
        }
        if let Some(e) = bad {
            println!("controller: malformed frame from the engine: {e}; resetting the link");
            if let EngineLink::Up { conn, .. } = &mut self.link {
                conn.abort(v);
            }
            self.engine_down();
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Reply(id, reply) => {
                    if let Some((_, c)) = self.clients.iter_mut().find(|(c, _)| *c == id) {
                        c.send(&reply);
                    }
                }
                Action::Close(id) => {
                    if let Some((_, c)) = self.clients.iter_mut().find(|(c, _)| *c == id) {
                        c.close();
                    }
                }
                Action::Engine(msg) => {
                    if let EngineLink::Up { conn, heard } = &mut self.link {
                        conn.send(&msg);
                        *heard = rdtsc();
                    }
                }
                Action::EngineReady => {
                    if self.ready_seen {
                        println!("controller: engine ready again");
                    } else {
                        self.ready_seen = true;
                        println!(
                            "controller READY: engine ready (cid {})",
                            self.engine_addr.cid
                        );
                    }
                }
                Action::Log(line) => println!("controller: {line}"),
                Action::RequestSnapshot { reboot } => {
                    println!("controller: snapshot requested (reboot={reboot})");
                    sysctl::request_snapshot(reboot);
                }
            }
        }
    }
}
