//! The partitions' `uds` listeners, owned by the bridge: bound with a private umask and
//! the configured mode (never over a live socket), taken out of the device event loop for
//! [`ACCEPT_BACKOFF`] when `accept` finds no file descriptor (`EMFILE`, `ENFILE`), so that
//! the level-triggered loop does not spin. Their socket files are removed when they close.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events};

use super::limits::{VsockError, ACCEPT_BACKOFF};
use super::uds::bind_listener;

/// What one `accept` gave.
pub(crate) enum AcceptOne {
    /// A host connection to partition `cid`.
    Stream(u64, UnixStream),
    /// Nothing (more) waits, or the listener is gone.
    Done,
    /// No file descriptor: the listener backs off (logged once per episode).
    Starved,
}

struct Listener {
    cid: u64,
    sock: UnixListener,
    path: PathBuf,
    registered: bool,
    /// Out of the loop until then.
    backoff_until: Option<Instant>,
    /// In an episode of `EMFILE`s (logged once; ends with an accept that works).
    starved: bool,
}

/// The listeners, by token.
#[derive(Default)]
pub(crate) struct Listeners {
    map: HashMap<u64, Listener>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for l in self.map.values() {
            let _ = std::fs::remove_file(&l.path);
        }
    }
}

impl Listeners {
    /// Listens on `path` for partition `cid` (see [`bind_listener`]); returns its token.
    pub fn bind(&mut self, cid: u64, path: &Path, mode: u32) -> Result<u64, VsockError> {
        let sock = bind_listener(path, mode)?;
        let token = super::tokens::fresh_token();
        let l = Listener {
            cid,
            sock,
            path: path.to_path_buf(),
            registered: false,
            backoff_until: None,
            starved: false,
        };
        self.map.insert(token, l);
        Ok(token)
    }

    pub fn contains(&self, token: u64) -> bool {
        self.map.contains_key(&token)
    }

    pub fn tokens(&self) -> Vec<u64> {
        self.map.keys().copied().collect()
    }

    /// Whether `cid` has a listener on `path`.
    pub fn listens(&self, cid: u64, path: &Path) -> bool {
        self.map.values().any(|l| l.cid == cid && l.path == path)
    }

    /// Closes every listener for which `keep(cid, path)` is false (their socket files are
    /// removed at once); returns the fds the loop has registered, to be retired.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &Path) -> bool) -> Vec<OwnedFd> {
        let gone: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, l)| !keep(l.cid, &l.path))
            .map(|(t, _)| *t)
            .collect();
        let mut retired = Vec::new();
        for token in gone {
            if let Some(l) = self.map.remove(&token) {
                let _ = std::fs::remove_file(&l.path);
                if l.registered {
                    retired.push(OwnedFd::from(l.sock));
                }
            }
        }
        retired
    }

    /// One `accept` on listener `token`.
    pub fn accept_one(&mut self, token: u64) -> AcceptOne {
        let Some(l) = self.map.get_mut(&token) else {
            return AcceptOne::Done;
        };
        loop {
            match l.sock.accept() {
                Ok((stream, _)) => {
                    l.starved = false;
                    return AcceptOne::Stream(l.cid, stream);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return AcceptOne::Done,
                Err(e) => {
                    let starved = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if !starved {
                        log::warn!("vsock: accept on {}: {e}", l.path.display());
                        return AcceptOne::Done;
                    }
                    if !l.starved {
                        log::warn!(
                            "vsock: accept on {}: {e}; retrying every {ACCEPT_BACKOFF:?} until \
                             file descriptors are free (logged once)",
                            l.path.display()
                        );
                    }
                    l.starved = true;
                    l.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return AcceptOne::Starved;
                }
            }
        }
    }

    /// Ends the back-offs that are over; returns those listeners' tokens.
    pub fn end_backoffs(&mut self, now: Instant) -> Vec<u64> {
        let mut over = Vec::new();
        for (t, l) in &mut self.map {
            if l.backoff_until.is_some_and(|d| d <= now) {
                l.backoff_until = None;
                over.push(*t);
            }
        }
        over
    }

    /// The next end of a back-off.
    pub fn next_backoff(&self) -> Option<Instant> {
        self.map.values().filter_map(|l| l.backoff_until).min()
    }

    /// On the loop, while frozen: takes listener `token` out; its fd if it was in.
    pub fn suspend(&mut self, token: u64, ops: &mut EventOps) -> Option<RawFd> {
        let l = self.map.get_mut(&token)?;
        if !std::mem::take(&mut l.registered) {
            return None;
        }
        let fd = l.sock.as_raw_fd();
        let _ = ops.remove(Events::empty_raw(fd));
        Some(fd)
    }

    /// On the loop: registers listener `token` unless it backs off (or takes it out).
    /// `None` if `token` is no listener; otherwise the fd and whether it is registered.
    pub fn sync(&mut self, token: u64, ops: &mut EventOps) -> Option<(RawFd, bool)> {
        let l = self.map.get_mut(&token)?;
        let fd = l.sock.as_raw_fd();
        let want = l.backoff_until.is_none();
        let result = match (l.registered, want) {
            (false, true) => ops.add(Events::new_raw(fd, EventSet::IN)),
            (true, false) => ops.remove(Events::empty_raw(fd)),
            _ => Ok(()),
        };
        match result {
            Ok(()) => l.registered = want,
            Err(e) => log::warn!("vsock: listener {} in the loop: {e}", l.path.display()),
        }
        Some((fd, l.registered))
    }
}
