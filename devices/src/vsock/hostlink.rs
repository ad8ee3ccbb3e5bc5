//! The switch as the vsock endpoint of host connections (CID 2): the guest's packets to the
//! host, the bytes from the host socket to the guest, and the credit flow control that bounds
//! what the monitor buffers (see `docs/vsock.md`, "Credit and buffer limits").
//!
//! [`HostEndpoint`] is a view over the parts of the switch it works on (the table, the
//! router and the bridge), made for one operation under the switch's lock.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use super::bridge::{Bridge, GuestConnectError, Phase, IN, OUT};
use super::limits::{
    BACKLOG_CAP, CONTROL_SLACK, HOST_BACKLOG_LIMIT, HOST_BUF_ALLOC, HOST_CHUNK, LINGER_TIMEOUT,
};
use super::packet::{op, Hdr, Pending, SHUTDOWN_F_RECEIVE, SHUTDOWN_F_SEND};
use super::router::Router;
use super::state::{ConnKey, ConnState, Connection, HostLink, HostOrigin, VsockCounters};
use super::table::ConnTable;
use super::uds::uds_port_path;

/// Error lines written to a host program before its connection is closed.
pub(crate) const ERR_REFUSED: &str = "ERR connection refused\n";
pub(crate) const ERR_TIMEOUT: &str = "ERR timeout\n";

/// The host endpoint, over the switch's parts.
pub(crate) struct HostEndpoint<'a> {
    table: &'a mut ConnTable,
    router: &'a mut Router,
    bridge: &'a mut Bridge,
    counters: &'a mut VsockCounters,
    connect_timeout: Duration,
}

impl<'a> HostEndpoint<'a> {
    pub fn new(
        table: &'a mut ConnTable,
        router: &'a mut Router,
        bridge: &'a mut Bridge,
        counters: &'a mut VsockCounters,
        connect_timeout: Duration,
    ) -> Self {
        HostEndpoint {
            table,
            router,
            bridge,
            counters,
            connect_timeout,
        }
    }

    pub fn table(&mut self) -> &mut ConnTable {
        self.table
    }

    pub fn bridge(&mut self) -> &mut Bridge {
        self.bridge
    }

    pub fn router(&mut self) -> &mut Router {
        self.router
    }

    pub fn counters(&mut self) -> &mut VsockCounters {
        self.counters
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Queues a packet the switch made for partition `dst` (within the backlog's cap plus
    /// [`CONTROL_SLACK`]; beyond, it is dropped and counted) and delivers what fits.
    pub fn deliver(&mut self, dst: u64, p: Pending) {
        if !self.router.enqueue(dst, p, BACKLOG_CAP + CONTROL_SLACK) {
            if self.router.is_attached(dst) {
                self.counters.backlog_drops += 1;
            }
            return;
        }
        self.drain(dst);
    }

    /// Delivers `cid`'s backlog as its RX buffers allow; room may let host sockets read.
    pub fn drain(&mut self, cid: u64) {
        if self.router.drain_rx(cid, self.counters) {
            self.refresh_host_interest(cid);
        }
    }

    /// Answers a packet with an RST from the endpoint it was addressed to.
    pub fn rst_reply(&mut self, h: &Hdr) {
        if !self.router.is_attached(h.src_cid) {
            return;
        }
        self.counters.rst_sent += 1;
        self.deliver(
            h.src_cid,
            Pending::new(Hdr::new(h.dst(), h.src(), op::RST), Vec::new()),
        );
    }

    /// A packet from a partition to CID 2.
    pub fn guest_to_host(&mut self, p: Pending) {
        let h = p.hdr;
        let (guest, host) = (h.src(), h.dst());
        if h.op == op::REQUEST {
            self.guest_connect(&h);
            return;
        }
        let Some(key) = self.table.find(guest, host) else {
            if h.op != op::RST {
                self.counters.rst_unknown += 1;
                self.rst_reply(&h);
            }
            return;
        };
        let counters = &mut *self.counters;
        let Some(conn) = self.table.get_mut(&key) else {
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

    /// A partition connects to CID 2 port P: the switch connects to `<uds>_<P>`, if the
    /// socket there is to be trusted.
    fn guest_connect(&mut self, h: &Hdr) {
        let (guest, host) = (h.src(), h.dst());
        if let Some(stale) = self.table.find(guest, host) {
            self.close_host(stale, None);
        }
        let uds = self.router.uds_of(guest.cid).and_then(|u| u.path.clone());
        let Some(uds) = uds else {
            self.counters.host_errors += 1;
            self.rst_reply(h);
            return;
        };
        if !self.table.may_connect_host(guest.cid) {
            self.counters.conn_limit += 1;
            self.rst_reply(h);
            return;
        }
        let path = uds_port_path(&uds, host.port);
        let key = (guest, host);
        let token = match self
            .bridge
            .connect_for_guest(guest.cid, Path::new(&path), key)
        {
            Ok(t) => t,
            Err(why) => {
                match why {
                    GuestConnectError::Busy => self.counters.host_busy += 1,
                    GuestConnectError::Untrusted(why) => {
                        log::debug!("vsock: {guest} -> {}: {why}", path.display());
                        self.counters.untrusted_sockets += 1;
                    }
                    GuestConnectError::Failed(why) => {
                        log::debug!("vsock: {guest} -> {}: {why}", path.display());
                        self.counters.host_errors += 1;
                    }
                }
                self.rst_reply(h);
                return;
            }
        };
        let mut link = HostLink::new(token, HostOrigin::Guest, HOST_BUF_ALLOC);
        link.peer_buf_alloc = h.buf_alloc;
        link.peer_fwd_cnt = h.fwd_cnt;
        let mut conn = Connection::new(guest, host, Some(link));
        conn.state = ConnState::Established;
        self.table.insert(conn);
        self.counters.host_connections += 1;
        self.send_to_guest(key, op::RESPONSE, 0, Vec::new());
        self.update_interest(token);
    }

    /// Sends a packet from the host side of `key` to its guest side, with our credit.
    pub fn send_to_guest(&mut self, key: ConnKey, op: u16, flags: u32, data: Vec<u8>) {
        let Some(conn) = self.table.get_mut(&key) else {
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
            self.counters.rst_sent += 1;
        }
        self.deliver(to.cid, Pending::new(hdr, data));
    }

    /// How many bytes may be read from the host for the guest now.
    fn host_read_budget(&self, key: &ConnKey) -> usize {
        let Some(conn) = self.table.get(key) else {
            return 0;
        };
        let Some(link) = conn.host.as_ref() else {
            return 0;
        };
        let backlog = self
            .router
            .backlog_bytes(conn.guest_side().cid)
            .unwrap_or(usize::MAX);
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
    pub fn pump_host_to_guest(&mut self, token: u64) {
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
                .table
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
            let mut buf = vec![0u8; budget];
            match self.bridge.read(token, &mut buf) {
                None => return,
                Some(Ok(0)) => {
                    if let Some(l) = self.table.get_mut(&key).and_then(|c| c.host.as_mut()) {
                        l.host_eof = true;
                    }
                    self.send_to_guest(key, op::SHUTDOWN, SHUTDOWN_F_SEND, Vec::new());
                    return;
                }
                Some(Ok(n)) => {
                    buf.truncate(n);
                    self.send_to_guest(key, op::RW, 0, buf);
                }
                Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => return,
                Some(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Some(Err(_)) => {
                    self.abort_host(key, None);
                    return;
                }
            }
        }
    }

    /// Writes what waits for the host socket (protocol line, then the guest's bytes);
    /// advances our `fwd_cnt` by what the socket accepted.
    pub fn flush_to_host(&mut self, token: u64) {
        let mut failed = match self.bridge.flush_line_out(token) {
            Ok(true) => false,
            Ok(false) => return,
            Err(_) => true,
        };
        let Some(Phase::Linked(key)) = self.bridge.phase(token) else {
            return;
        };
        let mut wrote = 0usize;
        let bridge = &mut *self.bridge;
        if let Some(link) = self.table.get_mut(&key).and_then(|c| c.host.as_mut()) {
            while !failed && !link.to_host.is_empty() {
                let (front, _) = link.to_host.as_slices();
                match bridge.write(token, front) {
                    Some(Ok(n)) => {
                        link.to_host.drain(..n);
                        link.fwd_cnt = link.fwd_cnt.wrapping_add(n as u32);
                        wrote += n;
                    }
                    Some(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Some(Err(_)) | None => failed = true,
                }
            }
            if !failed && link.guest_shut_send && link.to_host.is_empty() && !link.host_write_shut {
                bridge.shutdown_write(token);
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
        let Some(conn) = self.table.get_mut(&key) else {
            return;
        };
        let established = conn.state == ConnState::Established;
        let Some(link) = conn.host.as_mut() else {
            return;
        };
        let blocked_on_credit = established
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
        let Some(link) = self.table.get(&key).and_then(|c| c.host.as_ref()) else {
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
    pub fn after_host_change(&mut self, key: ConnKey) {
        let Some(link) = self.table.get(&key).and_then(|c| c.host.as_ref()) else {
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
        let Some(link) = self.table.get(&key).and_then(|c| c.host.as_ref()) else {
            return;
        };
        let guest_done = link.guest_shut_send && link.to_host.is_empty();
        let host_done = link.host_eof || link.guest_shut_recv;
        if !link.host_gone && guest_done && host_done {
            self.abort_host(key, None);
        }
    }

    /// The host socket is fully closed.
    pub fn host_hangup(&mut self, token: u64, error: bool) {
        let Some(Phase::Linked(key)) = self.bridge.phase(token) else {
            self.bridge.close(token, None);
            return;
        };
        self.bridge.set_hup(token);
        let Some(conn) = self.table.get_mut(&key) else {
            self.bridge.close(token, None);
            return;
        };
        let connecting = conn.state == ConnState::Connecting;
        let Some(link) = conn.host.as_mut() else {
            return;
        };
        if error || connecting {
            if connecting {
                self.counters.host_errors += 1;
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
    pub fn abort_host(&mut self, key: ConnKey, line: Option<&str>) {
        self.send_to_guest(key, op::RST, 0, Vec::new());
        self.close_host(key, line);
    }

    /// Forgets a host connection and closes its socket (writing `line` first, best effort).
    pub fn close_host(&mut self, key: ConnKey, line: Option<&str>) {
        if let Some(conn) = self.table.remove(&key) {
            if let Some(link) = conn.host {
                self.bridge.close(link.token, line);
            }
        }
    }

    /// Registers a host socket for what its connection needs now.
    pub fn update_interest(&mut self, token: u64) {
        let want = match self.bridge.phase(token) {
            None => return,
            Some(Phase::Line) => IN,
            Some(Phase::Linked(key)) => {
                let Some(conn) = self.table.get(&key) else {
                    self.bridge.close(token, None);
                    return;
                };
                let to_host = conn.host.as_ref().is_some_and(|l| !l.to_host.is_empty());
                let mut m = 0;
                if self.bridge.has_line_out(token) || to_host {
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
    pub fn refresh_host_interest(&mut self, cid: u64) {
        for token in self.bridge.tokens_of(cid) {
            if self.bridge.phase(token) != Some(Phase::Line) {
                self.update_interest(token);
            }
        }
    }
}
