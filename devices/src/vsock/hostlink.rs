//! The switch as the vsock endpoint of host connections (CID 2): the guest's packets to the
//! host, the bytes from the host socket to the guest, and the credit flow control that bounds
//! what the monitor buffers (see `docs/vsock.md`, "Credit and buffer limits").

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::path::Path;

use super::bridge::Phase;
use super::packet::{op, Hdr, Pending, SHUTDOWN_F_RECEIVE, SHUTDOWN_F_SEND};
use super::state::{ConnKey, ConnState, Connection, HostLink, HostOrigin};
use super::switch::Inner;
use super::uds::{connect_nonblocking, uds_port_path};
use super::{HOST_BACKLOG_LIMIT, HOST_BUF_ALLOC, HOST_CHUNK, LINGER_TIMEOUT, MAX_CONNS_PER_CID};

/// Error line written to a host program before its connection is closed.
pub(crate) const ERR_REFUSED: &str = "ERR connection refused\n";
pub(crate) const ERR_TIMEOUT: &str = "ERR timeout\n";

impl Inner {
    /// A packet from a partition to CID 2.
    pub(crate) fn guest_to_host(&mut self, p: Pending) {
        let h = p.hdr;
        let (guest, host) = (h.src(), h.dst());
        if h.op == op::REQUEST {
            self.guest_connect(&h);
            return;
        }
        let Some(key) = self.state.find(guest, host) else {
            if h.op != op::RST {
                self.rst_reply(&h);
            }
            return;
        };
        let counters = &mut self.state.counters;
        let Some(conn) = self.state.conns.get_mut(&key) else {
            return;
        };
        let host_is_client = key.0 == host;
        let state = conn.state;
        let Some(link) = conn.host.as_mut() else {
            return;
        };
        if (link.peer_buf_alloc, link.peer_fwd_cnt) != (h.buf_alloc, h.fwd_cnt) {
            link.credit_requested = false;
        }
        link.peer_buf_alloc = h.buf_alloc;
        link.peer_fwd_cnt = h.fwd_cnt;
        let token = link.token;
        match h.op {
            op::RESPONSE if state == ConnState::Connecting && host_is_client => {
                conn.state = ConnState::Established;
                counters.host_connections += 1;
                self.bridge.established(token, host.port);
                self.flush_to_host(token);
            }
            op::RW => {
                if state != ConnState::Established || link.host_gone || link.guest_shut_send {
                    self.abort_host(key, None);
                    return;
                }
                if link.to_host.len() + p.data.len() > link.buf_alloc as usize {
                    log::warn!("vsock: {guest} sent beyond its credit to {host}: reset");
                    counters.credit_violations += 1;
                    self.abort_host(key, None);
                    return;
                }
                link.to_host.extend(&p.data);
                link.rx_cnt = link.rx_cnt.wrapping_add(p.data.len() as u32);
                if host_is_client {
                    conn.bytes_to_client += p.data.len() as u64;
                } else {
                    conn.bytes_to_server += p.data.len() as u64;
                }
                self.flush_to_host(token);
            }
            op::CREDIT_REQUEST => self.send_to_guest(key, op::CREDIT_UPDATE, 0, Vec::new()),
            op::SHUTDOWN => {
                link.guest_shut_send |= h.flags & SHUTDOWN_F_SEND != 0;
                link.guest_shut_recv |= h.flags & SHUTDOWN_F_RECEIVE != 0;
                if state == ConnState::Established {
                    conn.state = ConnState::Closing;
                }
                self.flush_to_host(token);
            }
            op::RST => {
                let refused = state == ConnState::Connecting;
                if refused {
                    counters.host_errors += 1;
                }
                self.close_host(key, refused.then_some(ERR_REFUSED));
                return;
            }
            _ => {}
        }
        self.after_host_change(key);
    }

    /// A partition connects to CID 2 port P: the switch connects to `<uds>_<P>`.
    fn guest_connect(&mut self, h: &Hdr) {
        let (guest, host) = (h.src(), h.dst());
        if let Some(stale) = self.state.find(guest, host) {
            self.close_host(stale, None);
        }
        let uds = self.ports.get(&guest.cid).and_then(|p| p.uds.clone());
        let Some(uds) = uds else {
            self.state.counters.host_errors += 1;
            self.rst_reply(h);
            return;
        };
        if self.state.conns_of(guest.cid) >= MAX_CONNS_PER_CID {
            self.rst_reply(h);
            return;
        }
        let path = uds_port_path(&uds, host.port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: {guest} -> {}: {e}", path.display());
                self.state.counters.host_errors += 1;
                self.rst_reply(h);
                return;
            }
        };
        let key = (guest, host);
        let token = self.bridge.add(guest.cid, stream, Phase::Linked(key), None);
        let mut link = HostLink::new(token, HostOrigin::Guest, HOST_BUF_ALLOC);
        link.peer_buf_alloc = h.buf_alloc;
        link.peer_fwd_cnt = h.fwd_cnt;
        let mut conn = Connection::new(guest, host, Some(link));
        conn.state = ConnState::Established;
        self.state.conns.insert(key, conn);
        self.state.counters.host_connections += 1;
        self.send_to_guest(key, op::RESPONSE, 0, Vec::new());
        self.update_interest(token);
    }

    /// Sends a packet from the host side of `key` to its guest side, with our credit.
    pub(crate) fn send_to_guest(&mut self, key: ConnKey, op: u16, flags: u32, data: Vec<u8>) {
        let Some(conn) = self.state.conns.get_mut(&key) else {
            return;
        };
        let (from, to) = (conn.host_side(), conn.guest_side());
        let host_is_client = conn.client == from;
        let Some(link) = conn.host.as_mut() else {
            return;
        };
        let mut hdr = Hdr::new(from, to, op);
        hdr.flags = flags;
        hdr.buf_alloc = link.buf_alloc;
        hdr.fwd_cnt = link.fwd_cnt;
        link.last_fwd_cnt_sent = link.fwd_cnt;
        if op == op::RW {
            link.tx_cnt = link.tx_cnt.wrapping_add(data.len() as u32);
            if host_is_client {
                conn.bytes_to_server += data.len() as u64;
            } else {
                conn.bytes_to_client += data.len() as u64;
            }
        }
        if op == op::RST {
            self.state.counters.rst_sent += 1;
        }
        self.deliver(to.cid, Pending::new(hdr, data));
    }

    /// How many bytes may be read from the host for the guest now.
    pub(crate) fn host_read_budget(&self, key: &ConnKey) -> usize {
        let Some(conn) = self.state.conns.get(key) else {
            return 0;
        };
        let Some(link) = conn.host.as_ref() else {
            return 0;
        };
        let backlog = self
            .state
            .backlogs
            .get(&conn.guest_side().cid)
            .map_or(usize::MAX, |b| b.bytes);
        if conn.state != ConnState::Established
            || link.host_eof
            || link.host_gone
            || link.guest_shut_recv
            || backlog >= HOST_BACKLOG_LIMIT
        {
            return 0;
        }
        (link.peer_credit() as usize).min(HOST_CHUNK)
    }

    /// Reads from the host socket into RW packets for the guest, within the guest's credit.
    pub(crate) fn pump_host_to_guest(&mut self, token: u64) {
        loop {
            let Some(Phase::Linked(key)) = self.bridge.phase(token) else {
                return;
            };
            let budget = self.host_read_budget(&key);
            if budget == 0 {
                self.maybe_request_credit(key);
                return;
            }
            let early = self
                .state
                .conns
                .get_mut(&key)
                .and_then(|c| c.host.as_mut())
                .filter(|l| !l.early_data.is_empty())
                .map(|l| {
                    l.early_data
                        .drain(..budget.min(l.early_data.len()))
                        .collect()
                });
            if let Some(chunk) = early {
                self.send_to_guest(key, op::RW, 0, chunk);
                continue;
            }
            let Some(sock) = self.bridge.sock(token) else {
                return;
            };
            let mut buf = vec![0u8; budget];
            match (&sock.stream).read(&mut buf) {
                Ok(0) => {
                    if let Some(l) = self.state.conns.get_mut(&key).and_then(|c| c.host.as_mut()) {
                        l.host_eof = true;
                    }
                    self.send_to_guest(key, op::SHUTDOWN, SHUTDOWN_F_SEND, Vec::new());
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.send_to_guest(key, op::RW, 0, buf);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.abort_host(key, None);
                    return;
                }
            }
        }
    }

    /// Writes what waits for the host socket (protocol line, then the guest's bytes);
    /// advances our `fwd_cnt` by what the socket accepted.
    pub(crate) fn flush_to_host(&mut self, token: u64) {
        let Some(sock) = self.bridge.sock_mut(token) else {
            return;
        };
        let mut failed = false;
        while !sock.line_out.is_empty() {
            match (&sock.stream).write(&sock.line_out) {
                Ok(n) => {
                    sock.line_out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let Phase::Linked(key) = sock.phase else {
            return;
        };
        let mut wrote = 0usize;
        if let Some(link) = self.state.conns.get_mut(&key).and_then(|c| c.host.as_mut()) {
            while !failed && !link.to_host.is_empty() {
                let (front, _) = link.to_host.as_slices();
                match (&sock.stream).write(front) {
                    Ok(n) => {
                        link.to_host.drain(..n);
                        link.fwd_cnt = link.fwd_cnt.wrapping_add(n as u32);
                        wrote += n;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => failed = true,
                }
            }
            if !failed && link.guest_shut_send && link.to_host.is_empty() && !link.host_write_shut {
                let _ = sock.stream.shutdown(Shutdown::Write);
                link.host_write_shut = true;
            }
        }
        if failed {
            self.abort_host(key, None);
        } else if wrote > 0 {
            self.maybe_credit_update(key);
        }
    }

    /// Host data is held back only by the guest's credit: ask for an update, once until the
    /// guest's credit changes (a guest that consumes without telling would stall otherwise).
    fn maybe_request_credit(&mut self, key: ConnKey) {
        let Some(conn) = self.state.conns.get_mut(&key) else {
            return;
        };
        let Some(link) = conn.host.as_mut() else {
            return;
        };
        let blocked_on_credit = conn.state == ConnState::Established
            && !link.host_eof
            && !link.host_gone
            && !link.guest_shut_recv
            && link.peer_credit() == 0;
        if blocked_on_credit && !link.credit_requested {
            link.credit_requested = true;
            self.send_to_guest(key, op::CREDIT_REQUEST, 0, Vec::new());
        }
    }

    /// Tells the guest about freed buffer space once it believes less than half is free.
    fn maybe_credit_update(&mut self, key: ConnKey) {
        let Some(link) = self.state.conns.get(&key).and_then(|c| c.host.as_ref()) else {
            return;
        };
        if link.fwd_cnt == link.last_fwd_cnt_sent {
            return;
        }
        let believed_used = link.rx_cnt.wrapping_sub(link.last_fwd_cnt_sent);
        if link.buf_alloc.saturating_sub(believed_used) < link.buf_alloc / 2 {
            self.send_to_guest(key, op::CREDIT_UPDATE, 0, Vec::new());
        }
    }

    /// After a change to a host connection: send early data, finish a clean close, and
    /// adjust what the bridge waits for on the socket.
    pub(crate) fn after_host_change(&mut self, key: ConnKey) {
        let Some(link) = self.state.conns.get(&key).and_then(|c| c.host.as_ref()) else {
            return;
        };
        let token = link.token;
        if !link.early_data.is_empty() {
            self.pump_host_to_guest(token);
        }
        self.maybe_finish(key);
        self.update_interest(token);
    }

    /// Both directions are done: RST to the guest (completing its clean disconnect) and
    /// close the host socket.
    fn maybe_finish(&mut self, key: ConnKey) {
        let Some(link) = self.state.conns.get(&key).and_then(|c| c.host.as_ref()) else {
            return;
        };
        let guest_done = link.guest_shut_send && link.to_host.is_empty();
        let host_done = link.host_eof || link.guest_shut_recv;
        if !link.host_gone && guest_done && host_done {
            self.abort_host(key, None);
        }
    }

    /// The host socket is fully closed.
    pub(crate) fn host_hangup(&mut self, token: u64, error: bool) {
        let Some(Phase::Linked(key)) = self.bridge.phase(token) else {
            self.bridge.close(token, None);
            return;
        };
        if let Some(sock) = self.bridge.sock_mut(token) {
            sock.hup = true;
        }
        let Some(conn) = self.state.conns.get_mut(&key) else {
            self.bridge.close(token, None);
            return;
        };
        let connecting = conn.state == ConnState::Connecting;
        let Some(link) = conn.host.as_mut() else {
            return;
        };
        if error || connecting {
            if connecting {
                self.state.counters.host_errors += 1;
            }
            self.abort_host(key, None);
        } else if link.host_eof && !link.host_gone {
            // Everything the host sent was read: it is gone for good.
            link.host_gone = true;
            link.to_host.clear();
            self.send_to_guest(
                key,
                op::SHUTDOWN,
                SHUTDOWN_F_SEND | SHUTDOWN_F_RECEIVE,
                Vec::new(),
            );
            self.bridge.set_deadline(token, Some(LINGER_TIMEOUT));
        }
        // Otherwise unread host data remains; it is read as the guest's credit allows.
    }

    /// Resets a host connection: RST to the guest, then close.
    pub(crate) fn abort_host(&mut self, key: ConnKey, line: Option<&str>) {
        self.send_to_guest(key, op::RST, 0, Vec::new());
        self.close_host(key, line);
    }

    /// Forgets a host connection and closes its socket (writing `line` first, best effort).
    pub(crate) fn close_host(&mut self, key: ConnKey, line: Option<&str>) {
        if let Some(conn) = self.state.conns.remove(&key) {
            if let Some(link) = conn.host {
                self.bridge.close(link.token, line);
            }
        }
    }
}
