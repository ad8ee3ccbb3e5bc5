//! The host bridge: the Unix sockets of host connections, and the thread that waits on them
//! (epoll, level-triggered, nonblocking sockets). A host program connects to a partition's
//! `uds` and writes `CONNECT <port>\n`; the switch answers `OK <hostport>\n` once the guest
//! accepted, or an `ERR <reason>\n` line before closing (see `docs/vsock.md`).
//!
//! Which events a socket is registered for follows the connection: readable only while the
//! guest has credit and its backlog is short (so a slow guest is never buffered for),
//! writable only while bytes wait for the host.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::hostlink::ERR_TIMEOUT;
use super::packet::{op, Endpoint, HOST_CID};
use super::state::{ConnKey, ConnState, Connection, HostLink, HostOrigin};
use super::switch::Inner;
use super::uds::parse_connect;
use super::{Shared, VsockError, HOST_BUF_ALLOC, MAX_CONNS_PER_CID};

/// The epoll token of the stop event.
const STOP_TOKEN: u64 = 0;
/// Longest `CONNECT` line, newline included.
pub(crate) const MAX_CONNECT_LINE: usize = 64;
/// Most host connections of one partition still sending their `CONNECT` line.
const MAX_PENDING_LINES: usize = 64;
/// Error lines.
pub(crate) const ERR_MALFORMED: &str = "ERR malformed CONNECT line\n";
pub(crate) const ERR_UNAVAILABLE: &str = "ERR partition unavailable\n";
const ERR_TOO_MANY: &str = "ERR too many connections\n";

const IN: u32 = EventSet::IN.bits();
const OUT: u32 = EventSet::OUT.bits();
const HUP_OR_ERR: u32 = EventSet::HANG_UP.bits() | EventSet::ERROR.bits();
const ERR: u32 = EventSet::ERROR.bits();

/// What a host socket is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepted; reading the `CONNECT` line.
    Line,
    /// Part of a connection.
    Linked(ConnKey),
}

/// A host socket.
pub(crate) struct HostSock {
    pub cid: u64,
    pub stream: UnixStream,
    pub phase: Phase,
    /// The `CONNECT` line read so far (and any bytes after it).
    pub line: Vec<u8>,
    /// A protocol line (`OK <port>\n`) waiting to be written.
    pub line_out: Vec<u8>,
    /// The epoll interest the socket is registered with, if registered.
    registered: Option<u32>,
    /// The peer hung up (epoll reports it whatever the interest, so the socket is taken
    /// out of epoll while there is nothing to do on it).
    pub hup: bool,
    pub deadline: Option<Instant>,
}

/// A partition's `uds` listener; its socket file is removed when it is dropped.
struct Listener {
    cid: u64,
    sock: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A fresh id for a listener or host socket: unique in the process (a restore in the same
/// process finds its host sockets by these ids, see `HostLink::token`), from a random base
/// so that ids saved by another process do not match by accident.
fn fresh_token() -> u64 {
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
        if t != STOP_TOKEN {
            return t;
        }
    }
}

/// The host sockets and the epoll instance that watches them.
pub(crate) struct Bridge {
    epoll: Arc<Epoll>,
    listeners: HashMap<u64, Listener>,
    socks: HashMap<u64, HostSock>,
}

impl Bridge {
    /// A bridge whose epoll also watches `stop`.
    pub fn new(stop: &EventFd) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(Bridge {
            epoll: Arc::new(epoll),
            listeners: HashMap::new(),
            socks: HashMap::new(),
        })
    }

    pub fn epoll(&self) -> Arc<Epoll> {
        self.epoll.clone()
    }

    fn token(&mut self) -> u64 {
        fresh_token()
    }

    /// Listens on `path` for host connections to partition `cid`.
    pub fn bind(&mut self, cid: u64, path: &Path) -> Result<(), VsockError> {
        let uds_err = |source| VsockError::Uds {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(uds_err)?,
            Ok(_) => return Err(VsockError::UdsNotSocket(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(uds_err(e)),
        }
        let sock = UnixListener::bind(path).map_err(uds_err)?;
        let listener = Listener {
            cid,
            sock,
            path: path.to_path_buf(),
        };
        listener.sock.set_nonblocking(true).map_err(uds_err)?;
        let token = self.token();
        self.epoll
            .ctl(
                ControlOperation::Add,
                listener.sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(uds_err)?;
        self.listeners.insert(token, listener);
        Ok(())
    }

    /// Closes `cid`'s listener (removing its socket file) and its remaining host sockets.
    pub fn unbind(&mut self, cid: u64) {
        self.unbind_listener(cid);
        for token in self.tokens_of(cid) {
            self.close(token, None);
        }
    }

    /// The host sockets of `cid` (all of them with `None`).
    pub fn tokens_of(&self, cid: impl Into<Option<u64>>) -> Vec<u64> {
        let cid = cid.into();
        self.socks
            .iter()
            .filter(|(_, s)| cid.is_none_or(|c| s.cid == c))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Whether `cid` has a listener on `path`.
    pub fn listens(&self, cid: u64, path: &Path) -> bool {
        self.listeners
            .values()
            .any(|l| l.cid == cid && l.path == path)
    }

    /// Closes `cid`'s listener on `path`.
    pub fn close_listener(&mut self, cid: u64, path: &Path) {
        self.retain_listeners(|c, p| !(c == cid && p == path));
    }

    /// Closes every listener for which `keep(cid, path)` is false.
    pub fn retain_listeners(&mut self, mut keep: impl FnMut(u64, &Path) -> bool) {
        let gone: Vec<u64> = self
            .listeners
            .iter()
            .filter(|(_, l)| !keep(l.cid, &l.path))
            .map(|(t, _)| *t)
            .collect();
        for token in gone {
            if let Some(l) = self.listeners.remove(&token) {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    l.sock.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// Closes `cid`'s listener and removes its socket file; its host sockets stay.
    pub fn unbind_listener(&mut self, cid: u64) {
        self.retain_listeners(|c, _| c != cid);
    }

    /// Adds a host socket (not yet registered with epoll).
    pub fn add(
        &mut self,
        cid: u64,
        stream: UnixStream,
        phase: Phase,
        timeout: Option<Duration>,
    ) -> u64 {
        let token = self.token();
        let sock = HostSock {
            cid,
            stream,
            phase,
            line: Vec::new(),
            line_out: Vec::new(),
            registered: None,
            hup: false,
            deadline: timeout.map(|t| Instant::now() + t),
        };
        self.socks.insert(token, sock);
        token
    }

    /// Closes a host socket, writing `line` first (best effort).
    pub fn close(&mut self, token: u64, line: Option<&str>) {
        let Some(sock) = self.socks.remove(&token) else {
            return;
        };
        if sock.registered.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                sock.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if let Some(line) = line {
            // Unread input would turn the host's EOF into a reset: discard some first.
            let mut buf = [0u8; 4096];
            for _ in 0..16 {
                if !matches!((&sock.stream).read(&mut buf), Ok(n) if n > 0) {
                    break;
                }
            }
            let _ = (&sock.stream).write(line.as_bytes());
        }
    }

    /// The guest accepted a `CONNECT`: the host gets `OK <host_port>`.
    pub fn established(&mut self, token: u64, host_port: u32) {
        if let Some(sock) = self.socks.get_mut(&token) {
            sock.line_out = format!("OK {host_port}\n").into_bytes();
            sock.deadline = None;
        }
    }

    pub fn phase(&self, token: u64) -> Option<Phase> {
        self.socks.get(&token).map(|s| s.phase)
    }

    pub fn sock(&self, token: u64) -> Option<&HostSock> {
        self.socks.get(&token)
    }

    pub fn sock_mut(&mut self, token: u64) -> Option<&mut HostSock> {
        self.socks.get_mut(&token)
    }

    pub fn set_deadline(&mut self, token: u64, timeout: Option<Duration>) {
        if let Some(sock) = self.socks.get_mut(&token) {
            sock.deadline = timeout.map(|t| Instant::now() + t);
        }
    }

    /// Registers the socket for `want` (or unregisters it after a hang-up with nothing to do).
    fn set_interest(&mut self, token: u64, want: u32) {
        let Some(sock) = self.socks.get_mut(&token) else {
            return;
        };
        let target = if sock.hup && want == 0 {
            None
        } else {
            Some(want)
        };
        if target == sock.registered {
            return;
        }
        let fd = sock.stream.as_raw_fd();
        let event = |m: u32| EpollEvent::new(EventSet::from_bits_truncate(m), token);
        let result = match (sock.registered, target) {
            (None, Some(m)) => self.epoll.ctl(ControlOperation::Add, fd, event(m)),
            (Some(_), Some(m)) => self.epoll.ctl(ControlOperation::Modify, fd, event(m)),
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => sock.registered = target,
            Err(e) => log::warn!("vsock: epoll for host socket {token}: {e}"),
        }
    }
}

/// The host-bridge thread: waits for socket events and timeouts, handles them under the lock.
pub(crate) fn run(weak: Weak<Shared>, epoll: Arc<Epoll>) {
    let mut events = vec![EpollEvent::default(); 64];
    let mut timeout = -1;
    loop {
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => {
                log::error!("vsock: host bridge stops: epoll: {e}");
                return;
            }
        };
        let ready = events.get(..n).unwrap_or(&[]);
        if ready.iter().any(|e| e.data() == STOP_TOKEN) {
            return;
        }
        let Some(shared) = weak.upgrade() else {
            return;
        };
        // Waits while the switch is frozen (snapshot, restore).
        timeout = shared.with_thawed(|inner| {
            for e in ready {
                inner.on_event(e.data(), e.events());
            }
            inner.check_timeouts()
        });
    }
}

impl Inner {
    /// An epoll event for a listener or a host socket.
    fn on_event(&mut self, token: u64, events: u32) {
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

    /// Ends host sockets whose deadline passed; returns the epoll timeout until the next.
    fn check_timeouts(&mut self) -> i32 {
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
            .map_or(-1, |d| {
                let ms = d.saturating_duration_since(Instant::now()).as_millis() + 1;
                ms.min(1000) as i32
            })
    }
}
