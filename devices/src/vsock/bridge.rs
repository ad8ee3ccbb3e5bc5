//! The host bridge's sockets and their place on the device event loop: the partitions'
//! `uds` listeners and the host sockets ([`Bridge`], inside the switch's lock), and the
//! `event-manager` subscriber ([`BridgeSubscriber`]) that waits on them.
//!
//! Which events a socket waits for follows its connection (readable only while the guest
//! has credit and its backlog is short, writable only while bytes wait for the host), and
//! the connection changes on any thread: a vCPU thread's packet, the loop's own events. So
//! the bridge records what each socket *wants* and the loop puts that into effect
//! ([`Bridge::sync`]) after each of its events, under the switch's lock; a change made on
//! another thread writes the bridge's eventfd so that the loop looks. Sockets and listeners
//! closed while the loop has them registered are shut down at once (the host reads EOF)
//! and closed by the loop once it has taken them out: an fd leaves the loop before it is
//! closed. While the switch is frozen (a snapshot's cut, a restore's exchange) the loop
//! handles no socket: an event then takes its socket out of the loop until the thaw.

use std::collections::{HashMap, HashSet};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::state::ConnKey;
use super::{Shared, VsockError};

pub(crate) const IN: u32 = EventSet::IN.bits();
pub(crate) const OUT: u32 = EventSet::OUT.bits();

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
    /// The events its connection waits for now (`IN`, `OUT`).
    want: u32,
    /// The interest the loop has it registered with, if registered.
    registered: Option<u32>,
    /// The peer hung up (epoll reports it whatever the interest, so the socket is taken
    /// out of the loop while there is nothing to do on it).
    pub hup: bool,
    pub deadline: Option<Instant>,
}

/// A partition's `uds` listener (its socket file is removed when it is closed).
pub(crate) struct Listener {
    pub cid: u64,
    pub sock: UnixListener,
    pub path: PathBuf,
    registered: bool,
}

/// The host sockets and listeners, and what the loop has registered of them.
pub(crate) struct Bridge {
    pub listeners: HashMap<u64, Listener>,
    pub socks: HashMap<u64, HostSock>,
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
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for l in self.listeners.values() {
            let _ = std::fs::remove_file(&l.path);
        }
    }
}

impl Bridge {
    pub fn new() -> io::Result<Self> {
        Ok(Bridge {
            listeners: HashMap::new(),
            socks: HashMap::new(),
            dirty: HashSet::new(),
            retired: Vec::new(),
            by_fd: HashMap::new(),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            kicked: false,
            loop_thread: None,
        })
    }

    /// `token` wants another registration: tells the loop (unless the loop is the caller,
    /// which syncs after every event anyway).
    fn touch(&mut self, token: u64) {
        self.dirty.insert(token);
        self.kick_loop();
    }

    fn kick_loop(&mut self) {
        if self.kicked || self.loop_thread == Some(std::thread::current().id()) {
            return;
        }
        self.kicked = true;
        if let Err(e) = self.kick.write(1) {
            log::warn!("vsock: waking the host bridge: {e}");
        }
    }

    /// Every listener and socket is looked at again (after a thaw).
    pub fn touch_all(&mut self) {
        let tokens: Vec<u64> = self
            .listeners
            .keys()
            .chain(self.socks.keys())
            .copied()
            .collect();
        self.dirty.extend(tokens);
        self.kick_loop();
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
        if let Err(e) = sock.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(uds_err(e));
        }
        let token = super::host::fresh_token();
        self.listeners.insert(
            token,
            Listener {
                cid,
                sock,
                path: path.to_path_buf(),
                registered: false,
            },
        );
        self.touch(token);
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

    /// Closes every listener for which `keep(cid, path)` is false; their socket files are
    /// removed at once.
    pub fn retain_listeners(&mut self, mut keep: impl FnMut(u64, &Path) -> bool) {
        let gone: Vec<u64> = self
            .listeners
            .iter()
            .filter(|(_, l)| !keep(l.cid, &l.path))
            .map(|(t, _)| *t)
            .collect();
        for token in gone {
            if let Some(l) = self.listeners.remove(&token) {
                let _ = std::fs::remove_file(&l.path);
                if l.registered {
                    self.retired.push(OwnedFd::from(l.sock));
                    self.kick_loop();
                }
            }
        }
    }

    /// Closes `cid`'s listener and removes its socket file; its host sockets stay.
    pub fn unbind_listener(&mut self, cid: u64) {
        self.retain_listeners(|c, _| c != cid);
    }

    /// Adds a host socket (it waits for nothing until its connection says).
    pub fn add(
        &mut self,
        cid: u64,
        stream: UnixStream,
        phase: Phase,
        timeout: Option<Duration>,
    ) -> u64 {
        let token = super::host::fresh_token();
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
        self.dirty.remove(&token);
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

    pub fn sock(&self, token: u64) -> Option<&HostSock> {
        self.socks.get(&token)
    }

    pub fn sock_mut(&mut self, token: u64) -> Option<&mut HostSock> {
        self.socks.get_mut(&token)
    }

    pub fn set_deadline(&mut self, token: u64, timeout: Option<Duration>) {
        if let Some(sock) = self.socks.get_mut(&token) {
            sock.deadline = timeout.map(|t| Instant::now() + t);
            // The loop re-arms its timer.
            self.kick_loop();
        }
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
    fn token_of(&self, fd: RawFd) -> Option<u64> {
        self.by_fd.get(&fd).copied()
    }

    /// On the loop, while the switch is frozen: takes `token`'s fd out of the loop until the
    /// thaw (its events wait in the kernel).
    fn suspend(&mut self, token: u64, ops: &mut EventOps) {
        let fd = if let Some(l) = self.listeners.get_mut(&token) {
            std::mem::take(&mut l.registered).then(|| l.sock.as_raw_fd())
        } else if let Some(s) = self.socks.get_mut(&token) {
            s.registered.take().map(|_| s.stream.as_raw_fd())
        } else {
            None
        };
        if let Some(fd) = fd {
            let _ = ops.remove(Events::empty_raw(fd));
            self.by_fd.remove(&fd);
            self.dirty.insert(token);
        }
    }

    /// On the loop: closes the retired fds (after taking them out) and, unless the switch
    /// is `frozen`, registers every changed listener and socket as it wants.
    fn sync(&mut self, ops: &mut EventOps, frozen: bool) {
        for fd in std::mem::take(&mut self.retired) {
            let raw = fd.as_raw_fd();
            let _ = ops.remove(Events::empty_raw(raw));
            self.by_fd.remove(&raw);
        }
        if frozen {
            return;
        }
        for token in std::mem::take(&mut self.dirty) {
            if let Some(l) = self.listeners.get_mut(&token) {
                if !l.registered {
                    let fd = l.sock.as_raw_fd();
                    match ops.add(Events::new_raw(fd, EventSet::IN)) {
                        Ok(()) => {
                            l.registered = true;
                            self.by_fd.insert(fd, token);
                        }
                        Err(e) => {
                            log::warn!("vsock: listener {} in the loop: {e}", l.path.display())
                        }
                    }
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

/// The host bridge on the device event loop: the bridge's eventfd, a timer for the
/// sockets' deadlines, and every listener and host socket as they want.
pub(crate) struct BridgeSubscriber {
    shared: Arc<Shared>,
    timer: TimerFd,
}

impl BridgeSubscriber {
    pub fn new(shared: Arc<Shared>) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: F_SETFL on an fd this process owns; no pointers. The timer is read only
        // after the loop saw it readable, nonblocking is a safeguard.
        let rc = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BridgeSubscriber { shared, timer })
    }

    /// After an event: puts registrations into effect and re-arms the deadline timer.
    fn settle(&mut self, inner: &mut super::switch::Inner, ops: &mut EventOps) {
        let frozen = inner.frozen > 0;
        inner.bridge.sync(ops, frozen);
        if frozen {
            return;
        }
        let next = inner.check_timeouts();
        let armed = match next {
            Some(d) => self.timer.reset(d.max(Duration::from_millis(1)), None),
            None => self.timer.clear(),
        };
        if let Err(e) = armed {
            log::warn!("vsock: host bridge timer: {e}");
        }
    }
}

impl MutEventSubscriber for BridgeSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let timer_fd = self.timer.as_raw_fd();
        let shared = self.shared.clone();
        shared.with(|inner| {
            if fd == inner.bridge.kick.as_raw_fd() {
                let _ = inner.bridge.kick.read();
                inner.bridge.kicked = false;
            } else if fd == timer_fd {
                let _ = self.timer.wait();
            } else if let Some(token) = inner.bridge.token_of(fd) {
                if inner.frozen > 0 {
                    inner.bridge.suspend(token, ops);
                } else {
                    inner.on_event(token, events.event_set().bits());
                }
            }
            self.settle(inner, ops);
        });
    }

    fn init(&mut self, ops: &mut EventOps) {
        let timer_fd = self.timer.as_raw_fd();
        let shared = self.shared.clone();
        shared.with(|inner| {
            inner.bridge.loop_thread = Some(std::thread::current().id());
            for fd in [inner.bridge.kick.as_raw_fd(), timer_fd] {
                if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                    log::error!("vsock: the host bridge cannot wait on the loop: {e}");
                }
            }
            inner.bridge.touch_all();
            self.settle(inner, ops);
        });
    }
}
