//! The host bridge's sockets: the partitions' `uds` listeners and the host sockets, which
//! it owns (nobody else reads, writes or closes them), and what the device event loop has
//! registered of them. The protocol spoken on them is `hostlink.rs` / `hostevents.rs`.
//!
//! Which events a socket waits for follows its connection, and the connection changes on
//! any thread; so the bridge records what each socket *wants* and the loop puts that into
//! effect ([`Bridge::sync`]) after each of its events; a change made on another thread
//! writes the bridge's eventfd so that the loop looks. Sockets and listeners closed while
//! the loop has them registered are shut down at once (the host reads EOF) and closed by
//! the loop once it has taken them out. While the switch is frozen the loop handles no
//! socket: an event then takes its socket out of the loop until the thaw.
//!
//! Limits: at most [`MAX_HOST_SOCKS_PER_CID`] host sockets per partition and
//! [`MAX_HOST_SOCKS`] in all (more get `ERR busy`); a listener whose `accept` fails for lack
//! of file descriptors is taken out of the loop for a while (`listeners.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

use super::limits::{VsockError, MAX_CONNECT_LINE, MAX_HOST_SOCKS, MAX_HOST_SOCKS_PER_CID};
use super::listeners::{AcceptOne, Listeners};
use super::state::ConnKey;
use super::uds::{check_trusted, connect_nonblocking, parse_connect, peer_uid, Trust};

pub(crate) const IN: u32 = EventSet::IN.bits();
pub(crate) const OUT: u32 = EventSet::OUT.bits();
/// Most host connections of one partition still sending their `CONNECT` line.
const MAX_PENDING_LINES: usize = 64;
pub(crate) const ERR_BUSY: &str = "ERR busy\n";

/// What a host socket is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepted; reading the `CONNECT` line.
    Line,
    /// Part of a connection.
    Linked(ConnKey),
}

/// What reading a `CONNECT` line gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// Not complete yet.
    Waiting,
    /// The host closed or failed (the socket is closed).
    Closed,
    /// Not a `CONNECT <port>` line, or too long.
    Malformed,
    /// The port, and the bytes that came after the line.
    Connect(u32, Vec<u8>),
}

/// Why a guest's connection to the host was not made.
#[derive(Debug)]
pub(crate) enum GuestConnectError {
    /// Too many host sockets.
    Busy,
    /// The socket is not to be trusted (why).
    Untrusted(String),
    /// Absent, refused, or another error.
    Failed(String),
}

/// What `accept` on a listener gave.
#[derive(Debug, Default)]
pub(crate) struct Accepted {
    /// New host sockets (phase [`Phase::Line`]), by token.
    pub tokens: Vec<u64>,
    /// Connections closed at once with `ERR busy` (or for other local reasons).
    pub refused: u64,
    /// Times the listener ran out of file descriptors (it waits for a while).
    pub backoffs: u64,
}

struct HostSock {
    cid: u64,
    stream: UnixStream,
    phase: Phase,
    /// The `CONNECT` line read so far (and any bytes after it).
    line: Vec<u8>,
    /// A protocol line (`OK <port>\n`) waiting to be written.
    line_out: Vec<u8>,
    /// The events its connection waits for now (`IN`, `OUT`).
    want: u32,
    /// The interest the loop has it registered with, if registered.
    registered: Option<u32>,
    /// The peer hung up (epoll reports it whatever the interest, so the socket is taken
    /// out of the loop while there is nothing to do on it).
    hup: bool,
    deadline: Option<Instant>,
}

impl HostSock {
    /// The registration the socket should have: none once it hung up with nothing to do.
    fn target(&self) -> Option<u32> {
        if self.hup && self.want == 0 {
            None
        } else {
            Some(self.want)
        }
    }
}

/// The host sockets and listeners, and what the loop has registered of them.
pub(crate) struct Bridge {
    listeners: Listeners,
    socks: HashMap<u64, HostSock>,
    by_cid: HashMap<u64, BTreeSet<u64>>,
    /// Tokens whose registration may differ from what they want.
    dirty: HashSet<u64>,
    /// Registered fds closed meanwhile: the loop takes them out, then closes them.
    retired: Vec<OwnedFd>,
    /// Registered fds, by fd (the loop's events name fds).
    by_fd: HashMap<RawFd, u64>,
    /// Written when something changed on a thread other than the loop's.
    kick: EventFd,
    kicked: bool,
    /// The loop's thread, once it has run the subscriber.
    loop_thread: Option<ThreadId>,
    /// Partitions whose untrusted `<uds>_<port>` was logged (once each).
    warned: HashSet<u64>,
}

impl Bridge {
    pub fn new() -> io::Result<Self> {
        Ok(Bridge {
            listeners: Listeners::default(),
            socks: HashMap::new(),
            by_cid: HashMap::new(),
            dirty: HashSet::new(),
            retired: Vec::new(),
            by_fd: HashMap::new(),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            kicked: false,
            loop_thread: None,
            warned: HashSet::new(),
        })
    }

    pub fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// The loop read the eventfd.
    pub fn kicked(&mut self) {
        let _ = self.kick.read();
        self.kicked = false;
    }

    /// The loop runs on the calling thread.
    pub fn set_loop_thread(&mut self) {
        self.loop_thread = Some(std::thread::current().id());
    }

    /// `token` wants another registration: tells the loop (unless the loop is the caller,
    /// which syncs after every event anyway).
    fn touch(&mut self, token: u64) {
        self.dirty.insert(token);
        self.kick_loop();
    }

    fn kick_loop(&mut self) {
        if self.loop_thread == Some(std::thread::current().id()) {
            return;
        }
        self.kick_now();
    }

    /// Makes the loop run again (also from the loop's own thread: work is left).
    pub fn kick_now(&mut self) {
        if self.kicked {
            return;
        }
        self.kicked = true;
        if let Err(e) = self.kick.write(1) {
            log::warn!("vsock: waking the host bridge: {e}");
        }
    }

    /// Every listener and socket is looked at again (after a thaw).
    pub fn touch_all(&mut self) {
        let mut tokens = self.listeners.tokens();
        tokens.extend(self.socks.keys());
        self.dirty.extend(tokens);
        self.kick_loop();
    }

    /// Listens on `path` for host connections to partition `cid` (see
    /// [`bind_listener`]: private umask, `mode`, a live socket is never unlinked).
    pub fn bind(&mut self, cid: u64, path: &Path, mode: u32) -> Result<(), VsockError> {
        let token = self.listeners.bind(cid, path, mode)?;
        self.touch(token);
        Ok(())
    }

    pub fn is_listener(&self, token: u64) -> bool {
        self.listeners.contains(token)
    }

    /// Accepts what waits on listener `token`, within the caps.
    pub fn accept(&mut self, token: u64, timeout: Duration) -> Accepted {
        let mut out = Accepted::default();
        // Bounded: one loop turn takes at most a cap's worth.
        for _ in 0..MAX_HOST_SOCKS_PER_CID {
            let (cid, stream) = match self.listeners.accept_one(token) {
                AcceptOne::Stream(cid, stream) => (cid, stream),
                AcceptOne::Done => break,
                AcceptOne::Starved => {
                    out.backoffs += 1;
                    self.touch(token);
                    break;
                }
            };
            let n = self.by_cid.get(&cid).map_or(0, BTreeSet::len);
            let lines = self.by_cid.get(&cid).map_or(0, |set| {
                set.iter()
                    .filter(|t| self.phase(**t) == Some(Phase::Line))
                    .take(MAX_PENDING_LINES)
                    .count()
            });
            let busy = n >= MAX_HOST_SOCKS_PER_CID
                || self.socks.len() >= MAX_HOST_SOCKS
                || lines >= MAX_PENDING_LINES;
            if busy || stream.set_nonblocking(true).is_err() {
                let _ = stream.set_nonblocking(true);
                refuse(&stream, ERR_BUSY);
                out.refused += 1;
                continue;
            }
            out.tokens
                .push(self.add(cid, stream, Phase::Line, Some(timeout)));
        }
        out
    }

    /// Connects to `path` for partition `cid`'s guest, if the socket there is to be
    /// trusted (see [`check_trusted`]; the listening process must also be ours or
    /// root's) and the caps allow.
    pub fn connect_for_guest(
        &mut self,
        cid: u64,
        path: &Path,
        key: ConnKey,
    ) -> Result<u64, GuestConnectError> {
        let n = self.by_cid.get(&cid).map_or(0, BTreeSet::len);
        if n >= MAX_HOST_SOCKS_PER_CID || self.socks.len() >= MAX_HOST_SOCKS {
            return Err(GuestConnectError::Busy);
        }
        let untrusted = |bridge: &mut Bridge, why: String| {
            if bridge.warned.insert(cid) {
                log::warn!(
                    "vsock: CID {cid}: not connecting to {}: {why} (logged once)",
                    path.display()
                );
            }
            GuestConnectError::Untrusted(why)
        };
        let failed = |e: io::Error| GuestConnectError::Failed(e.to_string());
        match check_trusted(path) {
            Ok(()) => {}
            Err(Trust::Io(e)) => return Err(failed(e)),
            Err(Trust::Untrusted(why)) => return Err(untrusted(self, why)),
        }
        let stream = connect_nonblocking(path).map_err(failed)?;
        // SAFETY: geteuid has no arguments and cannot fail.
        let me = unsafe { libc::geteuid() };
        match peer_uid(&stream) {
            Ok(uid) if uid == me || uid == 0 => {}
            Ok(uid) => return Err(untrusted(self, format!("listener runs as uid {uid}"))),
            Err(e) => return Err(failed(e)),
        }
        Ok(self.add(cid, stream, Phase::Linked(key), None))
    }

    /// Closes `cid`'s listener (removing its socket file) and its remaining host sockets.
    pub fn unbind(&mut self, cid: u64) {
        self.unbind_listener(cid);
        for token in self.tokens_of(cid) {
            self.close(token, None);
        }
    }

    /// The host sockets of `cid`.
    pub fn tokens_of(&self, cid: u64) -> Vec<u64> {
        self.by_cid
            .get(&cid)
            .map_or_else(Vec::new, |s| s.iter().copied().collect())
    }

    /// Every host socket.
    pub fn all_tokens(&self) -> Vec<u64> {
        self.socks.keys().copied().collect()
    }

    /// Whether `cid` has a listener on `path`.
    pub fn listens(&self, cid: u64, path: &Path) -> bool {
        self.listeners.listens(cid, path)
    }

    /// Closes `cid`'s listener on `path`.
    pub fn close_listener(&mut self, cid: u64, path: &Path) {
        self.retain_listeners(|c, p| !(c == cid && p == path));
    }

    /// Closes every listener for which `keep(cid, path)` is false; their socket files are
    /// removed at once.
    pub fn retain_listeners(&mut self, keep: impl FnMut(u64, &Path) -> bool) {
        let retired = self.listeners.retain(keep);
        if !retired.is_empty() {
            self.retired.extend(retired);
            self.kick_loop();
        }
    }

    /// Closes `cid`'s listener and removes its socket file; its host sockets stay.
    pub fn unbind_listener(&mut self, cid: u64) {
        self.retain_listeners(|c, _| c != cid);
    }

    /// Adds a host socket (it waits for nothing until its connection says).
    fn add(
        &mut self,
        cid: u64,
        stream: UnixStream,
        phase: Phase,
        timeout: Option<Duration>,
    ) -> u64 {
        let token = super::tokens::fresh_token();
        let sock = HostSock {
            cid,
            stream,
            phase,
            line: Vec::new(),
            line_out: Vec::new(),
            want: 0,
            registered: None,
            hup: false,
            deadline: timeout.map(|t| Instant::now() + t),
        };
        self.socks.insert(token, sock);
        self.by_cid.entry(cid).or_default().insert(token);
        if timeout.is_some() {
            // The loop re-arms its timer.
            self.kick_loop();
        }
        token
    }

    /// Closes a host socket, writing `line` first (best effort). The host reads EOF at once;
    /// a socket the loop has registered is closed once the loop has taken it out.
    pub fn close(&mut self, token: u64, line: Option<&str>) {
        let Some(sock) = self.socks.remove(&token) else {
            return;
        };
        if let Some(set) = self.by_cid.get_mut(&sock.cid) {
            set.remove(&token);
            if set.is_empty() {
                self.by_cid.remove(&sock.cid);
            }
        }
        self.dirty.remove(&token);
        if let Some(line) = line {
            refuse(&sock.stream, line);
        }
        if sock.registered.is_some() {
            let _ = sock.stream.shutdown(Shutdown::Both);
            self.retired.push(OwnedFd::from(sock.stream));
            self.kick_loop();
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

    pub fn cid_of(&self, token: u64) -> Option<u64> {
        self.socks.get(&token).map(|s| s.cid)
    }

    /// The socket is now part of connection `key`.
    pub fn link(&mut self, token: u64, key: ConnKey) {
        if let Some(sock) = self.socks.get_mut(&token) {
            sock.phase = Phase::Linked(key);
            sock.line = Vec::new();
        }
    }

    pub fn has_line_out(&self, token: u64) -> bool {
        self.socks
            .get(&token)
            .is_some_and(|s| !s.line_out.is_empty())
    }

    /// The host hung up.
    pub fn set_hup(&mut self, token: u64) {
        if let Some(sock) = self.socks.get_mut(&token) {
            sock.hup = true;
        }
    }

    /// Reads what the host sent.
    pub fn read(&mut self, token: u64, buf: &mut [u8]) -> Option<io::Result<usize>> {
        self.socks.get(&token).map(|s| (&s.stream).read(buf))
    }

    /// Writes to the host.
    pub fn write(&mut self, token: u64, buf: &[u8]) -> Option<io::Result<usize>> {
        self.socks.get(&token).map(|s| (&s.stream).write(buf))
    }

    /// Shuts the socket's write side (the host reads EOF).
    pub fn shutdown_write(&mut self, token: u64) {
        if let Some(s) = self.socks.get(&token) {
            let _ = s.stream.shutdown(Shutdown::Write);
        }
    }

    /// Writes the pending protocol line: `Ok(true)` when it is all written.
    pub fn flush_line_out(&mut self, token: u64) -> io::Result<bool> {
        let Some(sock) = self.socks.get_mut(&token) else {
            return Ok(true);
        };
        while !sock.line_out.is_empty() {
            match (&sock.stream).write(&sock.line_out) {
                Ok(n) => {
                    sock.line_out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads the `CONNECT <port>\n` line of a host socket.
    pub fn read_line(&mut self, token: u64) -> LineRead {
        let Some(sock) = self.socks.get_mut(&token) else {
            return LineRead::Closed;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE.saturating_sub(sock.line.len());
        match (&sock.stream).read(&mut buf[..room]) {
            Ok(0) => {
                self.close(token, None);
                return LineRead::Closed;
            }
            Ok(n) => sock.line.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                return LineRead::Waiting
            }
            Err(_) => {
                self.close(token, None);
                return LineRead::Closed;
            }
        }
        let Some(end) = sock.line.iter().position(|&b| b == b'\n') else {
            if sock.line.len() >= MAX_CONNECT_LINE {
                return LineRead::Malformed;
            }
            return LineRead::Waiting;
        };
        let rest = sock.line.split_off(end + 1);
        match parse_connect(&sock.line[..end]) {
            Some(port) => LineRead::Connect(port, rest),
            None => LineRead::Malformed,
        }
    }

    pub fn set_deadline(&mut self, token: u64, timeout: Option<Duration>) {
        if let Some(sock) = self.socks.get_mut(&token) {
            sock.deadline = timeout.map(|t| Instant::now() + t);
            // The loop re-arms its timer.
            self.kick_loop();
        }
    }

    /// Host sockets whose deadline passed.
    pub fn expired(&self, now: Instant) -> Vec<u64> {
        self.socks
            .iter()
            .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Ends the listeners' back-offs that are over (they go back into the loop); returns
    /// the next deadline of a socket or a listener.
    pub fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        let over = self.listeners.end_backoffs(now);
        self.dirty.extend(over);
        let socks = self.socks.values().filter_map(|s| s.deadline);
        socks.chain(self.listeners.next_backoff()).min()
    }

    /// The socket now waits for `want` (`IN`, `OUT`; 0 for nothing).
    pub fn set_interest(&mut self, token: u64, want: u32) {
        let Some(sock) = self.socks.get_mut(&token) else {
            return;
        };
        sock.want = want;
        if sock.registered != sock.target() {
            self.touch(token);
        }
    }

    /// The token of a registered fd.
    pub fn token_of(&self, fd: RawFd) -> Option<u64> {
        self.by_fd.get(&fd).copied()
    }

    /// On the loop, while the switch is frozen: takes `token`'s fd out of the loop until the
    /// thaw (its events wait in the kernel).
    pub fn suspend(&mut self, token: u64, ops: &mut EventOps) {
        if let Some(fd) = self.listeners.suspend(token, ops) {
            self.by_fd.remove(&fd);
            self.dirty.insert(token);
            return;
        }
        let fd = self
            .socks
            .get_mut(&token)
            .and_then(|s| s.registered.take().map(|_| s.stream.as_raw_fd()));
        if let Some(fd) = fd {
            let _ = ops.remove(Events::empty_raw(fd));
            self.by_fd.remove(&fd);
            self.dirty.insert(token);
        }
    }

    /// On the loop: closes the retired fds (after taking them out) and, unless the switch
    /// is `frozen`, registers every changed listener and socket as it wants.
    pub fn sync(&mut self, ops: &mut EventOps, frozen: bool) {
        for fd in std::mem::take(&mut self.retired) {
            let raw = fd.as_raw_fd();
            let _ = ops.remove(Events::empty_raw(raw));
            self.by_fd.remove(&raw);
        }
        if frozen {
            return;
        }
        for token in std::mem::take(&mut self.dirty) {
            if let Some((fd, registered)) = self.listeners.sync(token, ops) {
                if registered {
                    self.by_fd.insert(fd, token);
                } else {
                    self.by_fd.remove(&fd);
                }
            } else if let Some(s) = self.socks.get_mut(&token) {
                let fd = s.stream.as_raw_fd();
                let target = s.target();
                let ev = |m: u32| Events::new_raw(fd, EventSet::from_bits_truncate(m));
                let result = match (s.registered, target) {
                    (None, Some(m)) => ops.add(ev(m)),
                    (Some(a), Some(b)) if a != b => ops.modify(ev(b)),
                    (Some(_), None) => ops.remove(ev(0)),
                    _ => Ok(()),
                };
                match result {
                    Ok(()) => {
                        s.registered = target;
                        if target.is_some() {
                            self.by_fd.insert(fd, token);
                        } else {
                            self.by_fd.remove(&fd);
                        }
                    }
                    Err(e) => log::warn!("vsock: host socket {token} in the loop: {e}"),
                }
            }
        }
    }
}

/// Writes `line` to a host socket about to be closed (best effort), after discarding some
/// unread input (which would turn the host's EOF into a reset).
fn refuse(stream: &UnixStream, line: &str) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        if !matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = (&*stream).write(line.as_bytes());
}
