//! The `vsockecho` firmware: virtio-vsock services and a client for end-to-end tests and
//! benchmarks.
//!
//! Prints `duplex vsockecho: cid=<cid> cmdline="..."`, then either serves or, with
//! `connect=`, acts as a client.
//!
//! # Server (default)
//!
//! Listens on three ports, any number of connections at once, then prints `READY`:
//!
//! | port | service |
//! |---|---|
//! | 7 | echo: every byte received on a connection is sent back on it |
//! | 9 | discard: bytes are consumed and counted; when the peer shuts down, `vsockecho discard <bytes>` (with ` reset` appended if it reset instead) |
//! | 19 | source: sends `source_bytes` (default 64 MiB) in 64 KiB chunks as fast as credit allows, then shuts down |
//!
//! # Client: `connect=<cid>:<port>:<mode>`
//!
//! | mode | what | prints |
//! |---|---|---|
//! | `source` | sends `bytes` (default 64 MiB), shuts down, waits until the peer has consumed everything (its reset, or its credit showing nothing in flight) | `vsockecho sent <bytes> in <ns> ns`, then `vsockecho rate <MB/s> MB/s` |
//! | `sink` | receives until the peer shuts down | `vsockecho received <bytes> in <ns> ns` |
//! | `echo` | echoes what the peer sends until it shuts down | `vsockecho echoed <bytes>` |
//! | `rtt` | `count` (default 1000) round trips of `size` (default 64) bytes to an echo server | `vsockecho rtt <count> avg_ns=<n>`, then `vsockecho rtt min_ns=<n> max_ns=<n>` |
//!
//! Times come from the TSC. A connection refused or reset prints `vsockecho reset`; the
//! client then tries again 100 ms later, up to `tries` (default 100) times. When it is done
//! it prints `vsockecho done` and sleeps, or powers off with `done=off` (status 0, or 1
//! after a failure).
//!
//! Other options: `verbose` prints a line per connection (with packet and credit
//! counters); `conn_buf=N` sets each connection's receive buffer (the credit peers get,
//! default 128 KiB); `spin_us=N` makes waits poll for N µs before sleeping (default 50). Numbers are
//! decimal or `0x` hex.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use duplex_runtime::time::{self, rdtsc, ticks_to_ns};
use duplex_runtime::vsock::{
    self, DisconnectReason, PeerCredit, SendPlan, SocketError, VirtioError, Vsock, VsockAddr,
    VsockEvent, VsockEventType, DEFAULT_CONNECTION_BUFFER, MAX_PACKET_DATA,
};
use duplex_runtime::{println, sysctl, BootInfo};

duplex_runtime::entry!(main);

/// Echo service port.
const ECHO_PORT: u32 = 7;
/// Discard service port.
const DISCARD_PORT: u32 = 9;
/// Source (chargen-like) service port.
const SOURCE_PORT: u32 = 19;
/// Default `source_bytes` / `bytes`.
const DEFAULT_BYTES: u64 = 64 << 20;
/// Largest payload per packet.
const CHUNK: usize = MAX_PACKET_DATA;
/// Receive buffer per connection (`conn_buf=`, default [`DEFAULT_CONNECTION_BUFFER`]).
static CONN_BUF: AtomicU32 = AtomicU32::new(DEFAULT_CONNECTION_BUFFER);
/// Echo data held per connection before the firmware stops reading (back-pressure).
const ECHO_BACKLOG: usize = 256 * 1024;
/// First local port of client connections (one more per attempt).
const CLIENT_PORT_BASE: u32 = 49152;
/// How long a connection request may go unanswered.
const CONNECT_TIMEOUT_MS: u64 = 2000;
/// Pause between client attempts.
const RETRY_MS: u64 = 100;
/// How long a client waits for the peer without any event before giving up on it.
const IDLE_TIMEOUT_MS: u64 = 10_000;

fn main(boot: &BootInfo) -> ! {
    let conn_buf = boot
        .arg_u64("conn_buf")
        .and_then(|b| u32::try_from(b).ok())
        .filter(|&b| b >= 4096)
        .unwrap_or(DEFAULT_CONNECTION_BUFFER);
    CONN_BUF.store(conn_buf, Relaxed);
    let Some(mut vsock) = vsock::open_vsock_with(boot, conn_buf) else {
        println!(
            "duplex vsockecho: no virtio vsock device cmdline=\"{}\"",
            boot.cmdline
        );
        sysctl::power_off(1)
    };
    println!(
        "duplex vsockecho: cid={} cmdline=\"{}\"",
        vsock::local_cid(&vsock),
        boot.cmdline
    );
    let verbose = boot.arg("verbose").is_some();
    if let Some(us) = boot.arg_u64("spin_us") {
        vsock::set_spin_ns(us.saturating_mul(1000));
    }
    match boot.arg("connect") {
        None => serve(boot, &mut vsock, verbose),
        Some(spec) => {
            let ok = match parse_connect(spec) {
                Some((peer, mode)) => client(boot, &mut vsock, peer, mode),
                None => {
                    println!(
                        "vsockecho: bad connect={spec:?} (want <cid>:<port>:echo|source|sink|rtt)"
                    );
                    false
                }
            };
            println!("vsockecho done");
            if boot.arg("done") == Some("off") {
                sysctl::power_off(if ok { 0 } else { 1 })
            }
            sysctl::park()
        }
    }
}

/// A far deadline for waits that only end with an event.
fn far_deadline() -> u64 {
    rdtsc().saturating_add(time::ns_to_ticks(3_600 * 1_000_000_000))
}

fn ms_from_now(ms: u64) -> u64 {
    rdtsc().saturating_add(time::ns_to_ticks(ms * 1_000_000))
}

fn is_insufficient_credit(e: &VirtioError) -> bool {
    matches!(
        e,
        VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)
    )
}

fn is_not_connected(e: &VirtioError) -> bool {
    matches!(e, VirtioError::SocketDeviceError(SocketError::NotConnected))
}

/// What a connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Send back everything received.
    Echo,
    /// Count received bytes (discard service, sink client).
    Sink,
    /// Send `remaining` more bytes, then shut down; drop anything received.
    Source { remaining: u64 },
}

/// One connection of the server (or the client's single connection).
struct Conn {
    peer: VsockAddr,
    port: u32,
    role: Role,
    credit: PeerCredit,
    /// Echo: received bytes not yet sent back.
    pending: VecDeque<u8>,
    /// Bytes received.
    received: u64,
    /// Bytes sent.
    sent: u64,
    /// Packets sent with data.
    packets: u64,
    /// Credit updates sent.
    updates: u64,
    /// Receive calls that returned data.
    reads: u64,
    /// Shutdown sent (source finished).
    shut: bool,
    /// The manager dropped the connection (peer shut down or reset, and drained).
    gone: bool,
    /// Data is waiting for the peer's credit.
    blocked: bool,
}

impl Conn {
    fn new(peer: VsockAddr, port: u32, role: Role) -> Self {
        Conn {
            peer,
            port,
            role,
            credit: PeerCredit::new(CONN_BUF.load(Relaxed)),
            pending: VecDeque::new(),
            received: 0,
            sent: 0,
            packets: 0,
            updates: 0,
            reads: 0,
            shut: false,
            gone: false,
            blocked: false,
        }
    }

    /// Counters for `verbose`.
    fn stats(&self) -> alloc::string::String {
        alloc::format!(
            "received {} in {} reads, sent {} in {} packets, {} credit updates, peer credit {:?}",
            self.received,
            self.reads,
            self.sent,
            self.packets,
            self.updates,
            self.credit
        )
    }

    fn matches(&self, event: &VsockEvent) -> bool {
        event.source == self.peer && event.destination.port == self.port
    }

    /// Reads what the manager buffered: into `pending` (echo, up to the backlog) or counted
    /// and dropped. Returns whether anything was read.
    fn drain(&mut self, vsock: &mut Vsock, scratch: &mut [u8]) -> bool {
        let mut any = false;
        while !self.gone {
            let room = match self.role {
                Role::Echo => ECHO_BACKLOG.saturating_sub(self.pending.len()),
                _ => scratch.len(),
            }
            .min(scratch.len());
            if room == 0 {
                break;
            }
            let n = match vsock.recv(self.peer, self.port, &mut scratch[..room]) {
                Ok(n) => n,
                Err(e) => {
                    if !is_not_connected(&e) {
                        println!("vsockecho: recv from {:?}: {e}", self.peer);
                    }
                    self.gone = true;
                    break;
                }
            };
            if n == 0 {
                break;
            }
            any = true;
            self.reads += 1;
            self.received += n as u64;
            if self.role == Role::Echo {
                self.pending.extend(&scratch[..n]);
            }
            if self.credit.consumed(n) && !self.gone {
                match vsock.update_credit(self.peer, self.port) {
                    Ok(()) => {
                        self.credit.advertised();
                        self.updates += 1;
                    }
                    // The last `recv` may have closed the connection (peer shut down).
                    Err(e) if is_not_connected(&e) => self.gone = true,
                    Err(e) => println!("vsockecho: credit update to {:?}: {e}", self.peer),
                }
            }
        }
        any
    }

    /// Sends one chunk if there is something to send and credit for it; shuts a finished
    /// source down. Returns whether anything was sent.
    fn pump(&mut self, vsock: &mut Vsock, pattern: &[u8]) -> bool {
        self.blocked = false;
        if self.gone || self.shut {
            return false;
        }
        let result = match self.role {
            Role::Sink => return false,
            Role::Source { remaining: 0 } => {
                self.shut = true;
                if let Err(e) = vsock.shutdown(self.peer, self.port) {
                    println!("vsockecho: shutdown to {:?}: {e}", self.peer);
                }
                return true;
            }
            Role::Source { remaining } => {
                let n = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
                send_some(vsock, self.peer, self.port, &mut self.credit, &pattern[..n])
            }
            Role::Echo => {
                let data = self.pending.as_slices().0;
                let n = data.len().min(CHUNK);
                if n == 0 {
                    return false;
                }
                send_some(vsock, self.peer, self.port, &mut self.credit, &data[..n])
            }
        };
        match result {
            Ok(n) => {
                self.blocked = n == 0;
                self.sent += n as u64;
                self.packets += u64::from(n > 0);
                match &mut self.role {
                    Role::Echo => drop(self.pending.drain(..n)),
                    Role::Source { remaining } => *remaining -= n as u64,
                    Role::Sink => {}
                }
                n > 0
            }
            Err(e) => {
                if !is_not_connected(&e) {
                    println!("vsockecho: send to {:?}: {e}", self.peer);
                }
                self.gone = true;
                false
            }
        }
    }
}

/// Sends as much of `data` (at most one packet) as the peer's credit allows; returns how
/// much, 0 when there is no credit now.
fn send_some(
    vsock: &mut Vsock,
    peer: VsockAddr,
    port: u32,
    credit: &mut PeerCredit,
    data: &[u8],
) -> Result<usize, VirtioError> {
    let want = data.len().min(CHUNK);
    let n = match credit.plan(want) {
        SendPlan::Send(n) => n,
        SendPlan::Wait => return Ok(0),
        // The full-size attempt fails, and makes the manager ask the peer for credit.
        SendPlan::RequestCredit => want,
    };
    match vsock.send(peer, port, &data[..n]) {
        Ok(()) => {
            credit.sent(n);
            Ok(n)
        }
        Err(e) if is_insufficient_credit(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

/// The server: echo, discard and source, any number of connections.
fn serve(boot: &BootInfo, vsock: &mut Vsock, verbose: bool) -> ! {
    for port in [ECHO_PORT, DISCARD_PORT, SOURCE_PORT] {
        vsock.listen(port);
    }
    let mut server = Server {
        source_bytes: boot.arg_u64("source_bytes").unwrap_or(DEFAULT_BYTES),
        verbose,
        pattern: pattern(),
        scratch: vec![0u8; CHUNK],
        conns: Vec::new(),
    };
    println!("READY");
    loop {
        let progressed = server.pump(vsock);
        // Handle what has arrived (a bounded batch, so a flood of packets does not starve
        // the senders); sleep only when nothing moved.
        let mut event = if progressed {
            poll(vsock)
        } else {
            let blocked = server.conns.iter().any(|c| c.blocked);
            wait(vsock, far_deadline(), blocked)
        };
        for _ in 0..EVENT_BATCH {
            let Some(e) = event else { break };
            server.handle(vsock, e);
            event = poll(vsock);
        }
        if let Some(e) = event {
            server.handle(vsock, e);
        }
    }
}

/// Events handled between two rounds of sending.
const EVENT_BATCH: usize = 32;

/// Waits for an event until `deadline`; when a sender is `blocked` on credit, only until
/// the moment [`PeerCredit::plan`] may ask the peer for credit.
fn wait(vsock: &mut Vsock, deadline: u64, blocked: bool) -> Option<VsockEvent> {
    let deadline = if blocked {
        deadline.min(ms_from_now(vsock::CREDIT_REQUEST_AFTER_MS))
    } else {
        deadline
    };
    vsock::wait_for_event(vsock, deadline)
}

/// [`vsock::poll`], printing errors.
fn poll(vsock: &mut Vsock) -> Option<VsockEvent> {
    vsock::poll(vsock).unwrap_or_else(|e| {
        println!("vsock: {e}");
        None
    })
}

struct Server {
    source_bytes: u64,
    verbose: bool,
    pattern: Vec<u8>,
    scratch: Vec<u8>,
    conns: Vec<Conn>,
}

impl Server {
    /// Moves data: reads what echo connections can take, sends what credit allows (one
    /// chunk per connection per round). Returns whether anything moved.
    fn pump(&mut self, vsock: &mut Vsock) -> bool {
        let mut progressed = false;
        for c in self.conns.iter_mut() {
            if c.role == Role::Echo {
                progressed |= c.drain(vsock, &mut self.scratch);
            }
            progressed |= c.pump(vsock, &self.pattern);
        }
        let verbose = self.verbose;
        self.conns.retain(|c| {
            if c.gone && verbose {
                println!("vsockecho: closed {:?} port {}", c.peer, c.port);
            }
            !c.gone
        });
        progressed
    }

    fn handle(&mut self, vsock: &mut Vsock, event: VsockEvent) {
        let idx = self.conns.iter().position(|c| c.matches(&event));
        match event.event_type {
            VsockEventType::ConnectionRequest => {
                // The manager has accepted it (only listened ports get here).
                let role = match event.destination.port {
                    ECHO_PORT => Role::Echo,
                    DISCARD_PORT => Role::Sink,
                    _ => Role::Source {
                        remaining: self.source_bytes,
                    },
                };
                let mut c = Conn::new(event.source, event.destination.port, role);
                c.credit.update(&event);
                if self.verbose {
                    println!(
                        "vsockecho: accepted {:?} port {}",
                        event.source, event.destination.port
                    );
                }
                match idx {
                    Some(i) => self.conns[i] = c,
                    None => self.conns.push(c),
                }
            }
            VsockEventType::Received { .. } => {
                if let Some(i) = idx {
                    self.conns[i].credit.update(&event);
                    self.conns[i].drain(vsock, &mut self.scratch);
                }
            }
            VsockEventType::Disconnected { reason } => {
                let Some(i) = idx else { return };
                let mut c = self.conns.swap_remove(i);
                // What the manager still holds is drained (it closes the connection once
                // empty); echo data can no longer be sent back.
                if c.role == Role::Echo {
                    c.role = Role::Sink;
                }
                c.drain(vsock, &mut self.scratch);
                if c.port == DISCARD_PORT {
                    match reason {
                        DisconnectReason::Shutdown => println!("vsockecho discard {}", c.received),
                        DisconnectReason::Reset => {
                            println!("vsockecho discard {} reset", c.received)
                        }
                    }
                }
                if self.verbose {
                    println!(
                        "vsockecho: {:?} port {} disconnected ({reason:?}), {}",
                        c.peer,
                        c.port,
                        c.stats()
                    );
                }
            }
            VsockEventType::CreditUpdate | VsockEventType::Connected => {
                if let Some(i) = idx {
                    self.conns[i].credit.update(&event);
                }
            }
            VsockEventType::CreditRequest => {}
        }
    }
}

/// 64 KiB of recognisable data for the source.
fn pattern() -> Vec<u8> {
    (0..CHUNK).map(|i| (i % 251) as u8).collect()
}

/// Client modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Echo,
    Source,
    Sink,
    Rtt,
}

fn parse_connect(spec: &str) -> Option<(VsockAddr, Mode)> {
    let mut parts = spec.split(':');
    let cid = duplex_runtime::bootinfo::parse_u64(parts.next()?)?;
    let port = u32::try_from(duplex_runtime::bootinfo::parse_u64(parts.next()?)?).ok()?;
    let mode = match parts.next()? {
        "echo" => Mode::Echo,
        "source" => Mode::Source,
        "sink" => Mode::Sink,
        "rtt" => Mode::Rtt,
        _ => return None,
    };
    parts
        .next()
        .is_none()
        .then_some((VsockAddr { cid, port }, mode))
}

/// Why a client attempt ended early.
enum Failure {
    /// Refused or reset: try again.
    Reset,
    /// Anything else: give up.
    Fatal,
}

/// The client: connects (retrying on reset), runs `mode`, prints the result.
fn client(boot: &BootInfo, vsock: &mut Vsock, peer: VsockAddr, mode: Mode) -> bool {
    let tries = boot.arg_u64("tries").unwrap_or(100).max(1);
    let pattern = pattern();
    let mut scratch = vec![0u8; CHUNK];
    for attempt in 0..tries {
        if attempt > 0 {
            time::sleep_ms(RETRY_MS);
        }
        let port = CLIENT_PORT_BASE + (attempt % 16384) as u32;
        let result = match connect(vsock, peer, port) {
            Ok(c) => run_client(boot, vsock, c, mode, &pattern, &mut scratch),
            Err(f) => Err(f),
        };
        match result {
            Ok(()) => return true,
            Err(Failure::Reset) => println!("vsockecho reset"),
            Err(Failure::Fatal) => return false,
        }
        // Whatever is left of the attempt's connection goes.
        let _ = vsock.force_close(peer, port);
    }
    println!("vsockecho failed: no connection to {peer:?} after {tries} tries");
    false
}

/// Connects from local `port` and waits for the answer.
fn connect(vsock: &mut Vsock, peer: VsockAddr, port: u32) -> Result<Conn, Failure> {
    if let Err(e) = vsock.connect(peer, port) {
        println!("vsockecho: connect to {peer:?}: {e}");
        return Err(Failure::Fatal);
    }
    let deadline = ms_from_now(CONNECT_TIMEOUT_MS);
    let mut conn = Conn::new(peer, port, Role::Sink);
    loop {
        let Some(event) = vsock::wait_for_event(vsock, deadline) else {
            println!("vsockecho: no answer from {peer:?}");
            return Err(Failure::Reset);
        };
        if !conn.matches(&event) {
            continue;
        }
        conn.credit.update(&event);
        match event.event_type {
            VsockEventType::Connected => return Ok(conn),
            VsockEventType::Disconnected { .. } => return Err(Failure::Reset),
            _ => {}
        }
    }
}

fn run_client(
    boot: &BootInfo,
    vsock: &mut Vsock,
    mut conn: Conn,
    mode: Mode,
    pattern: &[u8],
    scratch: &mut [u8],
) -> Result<(), Failure> {
    let verbose = boot.arg("verbose").is_some();
    match mode {
        Mode::Source => {
            let bytes = boot.arg_u64("bytes").unwrap_or(DEFAULT_BYTES);
            conn.role = Role::Source { remaining: bytes };
            let start = rdtsc();
            // Send everything and the shutdown; then wait until the peer has consumed it
            // all: its reset/shutdown, or a credit update showing nothing in flight.
            let done = run_until(vsock, &mut conn, pattern, scratch, |c| {
                c.shut && c.credit.in_flight() == 0
            })?;
            let ns = ticks_to_ns(rdtsc() - start).max(1);
            if !done && !conn.shut {
                return Err(Failure::Reset);
            }
            println!("vsockecho sent {bytes} in {ns} ns");
            let mbps = u128::from(bytes) * 1000 / u128::from(ns);
            println!("vsockecho rate {mbps} MB/s");
            if verbose {
                println!("vsockecho: {}", conn.stats());
            }
            Ok(())
        }
        Mode::Sink | Mode::Echo => {
            conn.role = if mode == Mode::Echo {
                Role::Echo
            } else {
                Role::Sink
            };
            let start = rdtsc();
            run_until(vsock, &mut conn, pattern, scratch, |_| false)?;
            let ns = ticks_to_ns(rdtsc() - start);
            if mode == Mode::Echo {
                println!("vsockecho echoed {}", conn.sent);
            } else {
                println!("vsockecho received {} in {ns} ns", conn.received);
            }
            let _ = vsock.shutdown(conn.peer, conn.port);
            Ok(())
        }
        Mode::Rtt => rtt(boot, vsock, conn, pattern, scratch),
    }
}

/// Runs `conn` until `finished` says so (true) or the peer disconnects (false). A reset
/// before `finished` is a [`Failure::Reset`]; a peer going silent for
/// [`IDLE_TIMEOUT_MS`] is fatal.
fn run_until(
    vsock: &mut Vsock,
    conn: &mut Conn,
    pattern: &[u8],
    scratch: &mut [u8],
    finished: impl Fn(&Conn) -> bool,
) -> Result<bool, Failure> {
    let mut idle_deadline = ms_from_now(IDLE_TIMEOUT_MS);
    loop {
        if finished(conn) {
            return Ok(true);
        }
        let mut progressed = conn.drain(vsock, scratch);
        progressed |= conn.pump(vsock, pattern);
        if conn.gone {
            return Err(Failure::Reset);
        }
        let mut event = if progressed {
            idle_deadline = ms_from_now(IDLE_TIMEOUT_MS);
            poll(vsock)
        } else {
            match wait(vsock, idle_deadline, conn.blocked) {
                Some(e) => Some(e),
                None if rdtsc() < idle_deadline => None,
                None => {
                    println!("vsockecho: peer {:?} silent", conn.peer);
                    return Err(Failure::Fatal);
                }
            }
        };
        for n in 1..=EVENT_BATCH {
            let Some(e) = event else { break };
            if conn.matches(&e) {
                idle_deadline = ms_from_now(IDLE_TIMEOUT_MS);
                conn.credit.update(&e);
                if let VsockEventType::Disconnected { reason } = e.event_type {
                    if conn.role == Role::Echo {
                        conn.role = Role::Sink;
                    }
                    conn.drain(vsock, scratch);
                    conn.gone = true;
                    // After our shutdown any answer means the peer is done; before it, a
                    // reset is a failure and a shutdown the normal end of a sink/echo
                    // session.
                    return match (conn.shut, reason) {
                        (true, _) => Ok(true),
                        (false, DisconnectReason::Shutdown) => Ok(false),
                        (false, DisconnectReason::Reset) => Err(Failure::Reset),
                    };
                }
            }
            event = if n < EVENT_BATCH { poll(vsock) } else { None };
        }
    }
}

/// `count` round trips of `size` bytes.
fn rtt(
    boot: &BootInfo,
    vsock: &mut Vsock,
    mut conn: Conn,
    pattern: &[u8],
    scratch: &mut [u8],
) -> Result<(), Failure> {
    let count = boot.arg_u64("count").unwrap_or(1000).max(1);
    let size = boot.arg_u64("size").unwrap_or(64).max(1);
    let (mut total, mut min, mut max) = (0u64, u64::MAX, 0u64);
    // Received bytes are counted and dropped.
    conn.role = Role::Sink;
    for _ in 0..count {
        let start = rdtsc();
        let target = conn.received + size;
        let mut to_send = size;
        let mut idle_deadline = ms_from_now(IDLE_TIMEOUT_MS);
        while conn.received < target {
            let mut progressed = conn.drain(vsock, scratch);
            let mut blocked = false;
            if to_send > 0 && !conn.gone {
                let n = usize::try_from(to_send).map_or(CHUNK, |r| r.min(CHUNK));
                match send_some(vsock, conn.peer, conn.port, &mut conn.credit, &pattern[..n]) {
                    Ok(n) => {
                        to_send -= n as u64;
                        progressed |= n > 0;
                        blocked = n == 0;
                    }
                    Err(e) => {
                        if !is_not_connected(&e) {
                            println!("vsockecho: send to {:?}: {e}", conn.peer);
                        }
                        conn.gone = true;
                    }
                }
            }
            if conn.gone {
                return Err(Failure::Reset);
            }
            if conn.received >= target {
                break;
            }
            let event = if progressed {
                poll(vsock)
            } else {
                match wait(vsock, idle_deadline, blocked) {
                    Some(e) => Some(e),
                    None if rdtsc() < idle_deadline => None,
                    None => {
                        println!("vsockecho: no echo from {:?}", conn.peer);
                        return Err(Failure::Fatal);
                    }
                }
            };
            let Some(event) = event else { continue };
            if !conn.matches(&event) {
                continue;
            }
            idle_deadline = ms_from_now(IDLE_TIMEOUT_MS);
            conn.credit.update(&event);
            if let VsockEventType::Disconnected { .. } = event.event_type {
                return Err(Failure::Reset);
            }
        }
        let t = rdtsc() - start;
        total += t;
        min = min.min(t);
        max = max.max(t);
    }
    let _ = vsock.shutdown(conn.peer, conn.port);
    println!(
        "vsockecho rtt {count} avg_ns={}",
        ticks_to_ns(total / count)
    );
    println!(
        "vsockecho rtt min_ns={} max_ns={}",
        ticks_to_ns(min),
        ticks_to_ns(max)
    );
    Ok(())
}
