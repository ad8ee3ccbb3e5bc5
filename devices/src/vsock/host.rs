//! The host bridge's protocol: what the device event loop does when a `uds` listener or a
//! host socket is ready (`bridge.rs` keeps the sockets and their registrations). A host
//! program connects to a partition's `uds` and writes `CONNECT <port>\n`; the switch answers
//! `OK <hostport>\n` once the guest accepted, or an `ERR <reason>\n` line before closing
//! (see `docs/vsock.md`).
//!
//! Which events a socket waits for follows the connection ([`Inner::update_interest`]):
//! readable only while the guest has credit and its backlog is short (so a slow guest is
//! never buffered for), writable only while bytes wait for the host.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use event_manager::EventSet;

use super::bridge::{Phase, IN, OUT};
use super::hostlink::ERR_TIMEOUT;
use super::packet::{op, Endpoint, HOST_CID};
use super::state::{ConnState, Connection, HostLink, HostOrigin};
use super::switch::Inner;
use super::uds::parse_connect;
use super::{HOST_BUF_ALLOC, MAX_CONNS_PER_CID};

/// Longest `CONNECT` line, newline included.
pub(crate) const MAX_CONNECT_LINE: usize = 64;
/// Most host connections of one partition still sending their `CONNECT` line.
const MAX_PENDING_LINES: usize = 64;
/// Error lines.
pub(crate) const ERR_MALFORMED: &str = "ERR malformed CONNECT line\n";
pub(crate) const ERR_UNAVAILABLE: &str = "ERR partition unavailable\n";
const ERR_TOO_MANY: &str = "ERR too many connections\n";

const HUP_OR_ERR: u32 = EventSet::HANG_UP.bits() | EventSet::ERROR.bits();
const ERR: u32 = EventSet::ERROR.bits();

/// A fresh id for a listener or host socket: unique in the process (a restore in the same
/// process finds its host sockets by these ids, see `HostLink::token`), from a random base
/// so that ids saved by another process do not match by accident.
pub(crate) fn fresh_token() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        h.write_u128(now.map_or(0, |d| d.as_nanos()));
        h.finish()
    });
    loop {
        let t = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        if t != 0 {
            return t;
        }
    }
}

impl Inner {
    /// An event of the loop for a listener or a host socket.
    pub(crate) fn on_event(&mut self, token: u64, events: u32) {
        if self.bridge.listeners.contains_key(&token) {
            self.accept(token);
            return;
        }
        match self.bridge.phase(token) {
            None => {}
            Some(Phase::Line) => self.read_connect_line(token),
            Some(Phase::Linked(key)) => {
                if events & OUT != 0 {
                    self.flush_to_host(token);
                }
                if events & IN != 0 {
                    self.pump_host_to_guest(token);
                }
                if events & HUP_OR_ERR != 0 {
                    self.host_hangup(token, events & ERR != 0);
                }
                self.after_host_change(key);
            }
        }
    }

    fn accept(&mut self, token: u64) {
        loop {
            let Some(l) = self.bridge.listeners.get(&token) else {
                return;
            };
            let cid = l.cid;
            match l.sock.accept() {
                Ok((stream, _)) => {
                    let pending = self
                        .bridge
                        .socks
                        .values()
                        .filter(|s| s.cid == cid && s.phase == Phase::Line)
                        .count();
                    if pending >= MAX_PENDING_LINES || stream.set_nonblocking(true).is_err() {
                        self.state.counters.host_errors += 1;
                        continue;
                    }
                    let t = self
                        .bridge
                        .add(cid, stream, Phase::Line, Some(self.connect_timeout));
                    self.update_interest(t);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        log::warn!("vsock: accept on CID {cid}'s uds: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line of a host socket.
    fn read_connect_line(&mut self, token: u64) {
        let Some(sock) = self.bridge.sock_mut(token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE.saturating_sub(sock.line.len());
        match (&sock.stream).read(&mut buf[..room]) {
            Ok(0) => {
                self.bridge.close(token, None);
                return;
            }
            Ok(n) => sock.line.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(_) => {
                self.bridge.close(token, None);
                return;
            }
        }
        let Some(end) = sock.line.iter().position(|&b| b == b'\n') else {
            if sock.line.len() >= MAX_CONNECT_LINE {
                self.state.counters.host_errors += 1;
                self.bridge.close(token, Some(ERR_MALFORMED));
            }
            return;
        };
        let rest = sock.line.split_off(end + 1);
        match parse_connect(&sock.line[..end]) {
            Some(port) => self.host_connect(token, port, rest),
            None => {
                self.state.counters.host_errors += 1;
                self.bridge.close(token, Some(ERR_MALFORMED));
            }
        }
    }

    /// A host program asked for guest port `port`: REQUEST from a fresh host port.
    fn host_connect(&mut self, token: u64, port: u32, early_data: Vec<u8>) {
        let Some(cid) = self.bridge.sock(token).map(|s| s.cid) else {
            return;
        };
        let refuse = if !self.ports.contains_key(&cid) {
            Some(ERR_UNAVAILABLE)
        } else if self.state.conns_of(cid) >= MAX_CONNS_PER_CID {
            Some(ERR_TOO_MANY)
        } else {
            None
        };
        let host_port = self.alloc_host_port();
        if let Some(line) = refuse.or(host_port.is_none().then_some(ERR_TOO_MANY)) {
            self.state.counters.host_errors += 1;
            self.bridge.close(token, Some(line));
            return;
        }
        let Some(host_port) = host_port else {
            return;
        };
        let host = Endpoint {
            cid: HOST_CID,
            port: host_port,
        };
        let guest = Endpoint { cid, port };
        let key = (host, guest);
        let mut link = HostLink::new(token, HostOrigin::Connect, HOST_BUF_ALLOC);
        link.early_data = early_data;
        self.state
            .conns
            .insert(key, Connection::new(host, guest, Some(link)));
        if let Some(sock) = self.bridge.sock_mut(token) {
            sock.phase = Phase::Linked(key);
            sock.line = Vec::new();
        }
        self.bridge.set_deadline(token, Some(self.connect_timeout));
        self.send_to_guest(key, op::REQUEST, 0, Vec::new());
        self.update_interest(token);
    }

    /// A host port no connection uses, from [`super::switch::FIRST_HOST_PORT`] up.
    fn alloc_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNS_PER_CID * 4 {
            let port = self.state.next_host_port;
            self.state.next_host_port = port
                .checked_add(1)
                .unwrap_or(super::switch::FIRST_HOST_PORT);
            let ep = Endpoint {
                cid: HOST_CID,
                port,
            };
            if !self.state.conns.keys().any(|(c, s)| *c == ep || *s == ep) {
                return Some(port);
            }
        }
        None
    }

    /// Registers a host socket for what its connection needs now.
    pub(crate) fn update_interest(&mut self, token: u64) {
        let Some(sock) = self.bridge.sock(token) else {
            return;
        };
        let want = match sock.phase {
            Phase::Line => IN,
            Phase::Linked(key) => {
                let Some(conn) = self.state.conns.get(&key) else {
                    self.bridge.close(token, None);
                    return;
                };
                let to_host = conn.host.as_ref().is_some_and(|l| !l.to_host.is_empty());
                let mut m = 0;
                if !sock.line_out.is_empty() || to_host {
                    m |= OUT;
                }
                if self.host_read_budget(&key) > 0 {
                    m |= IN;
                }
                m
            }
        };
        self.bridge.set_interest(token, want);
    }

    /// `cid`'s RX queue got room: its host connections may read again.
    pub(crate) fn refresh_host_interest(&mut self, cid: u64) {
        let tokens: Vec<u64> = self
            .bridge
            .socks
            .iter()
            .filter(|(_, s)| s.cid == cid && s.phase != Phase::Line)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            self.update_interest(token);
        }
    }

    /// Ends host sockets whose deadline passed; returns how long until the next (at most a
    /// second: the loop looks again then), or `None` when no socket has one.
    pub(crate) fn check_timeouts(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .bridge
            .socks
            .iter()
            .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            match self.bridge.phase(token) {
                Some(Phase::Line) => {
                    self.state.counters.host_errors += 1;
                    self.bridge.close(token, Some(ERR_TIMEOUT));
                }
                Some(Phase::Linked(key)) => {
                    let conn = self.state.conns.get(&key);
                    let connecting = conn.is_some_and(|c| c.state == ConnState::Connecting);
                    let gone = conn
                        .and_then(|c| c.host.as_ref())
                        .is_some_and(|l| l.host_gone);
                    if connecting {
                        self.state.counters.host_errors += 1;
                        self.abort_host(key, Some(ERR_TIMEOUT));
                    } else if gone || conn.is_none() {
                        self.abort_host(key, None);
                        self.bridge.close(token, None);
                    } else {
                        self.bridge.set_deadline(token, None);
                    }
                }
                None => {}
            }
        }
        self.bridge
            .socks
            .values()
            .filter_map(|s| s.deadline)
            .min()
            .map(|d| {
                let left = d.saturating_duration_since(Instant::now()) + Duration::from_millis(1);
                left.min(Duration::from_secs(1))
            })
    }
}
