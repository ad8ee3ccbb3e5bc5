//! What the device event loop does when a `uds` listener or a host socket is ready, the
//! `CONNECT` protocol, deadlines, and what a restore does with host connections. A host
//! program connects to a partition's `uds` and writes `CONNECT <port>\n`; the switch answers
//! `OK <hostport>\n` once the guest accepted, or an `ERR <reason>\n` line before closing
//! (see `docs/vsock.md`). Built on [`HostEndpoint`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::bridge::{LineRead, Phase, IN, OUT};
use super::hostlink::{HostEndpoint, ERR_TIMEOUT};
use super::limits::{HOST_BUF_ALLOC, MAX_CONNS_PER_CID};
use super::packet::{op, Endpoint, HOST_CID};
use super::state::{ConnKey, ConnState, Connection, HostLink, HostOrigin};

/// Error lines.
pub(crate) const ERR_MALFORMED: &str = "ERR malformed CONNECT line\n";
pub(crate) const ERR_UNAVAILABLE: &str = "ERR partition unavailable\n";
const ERR_TOO_MANY: &str = "ERR too many connections\n";

const HUP_OR_ERR: u32 = EventSet::HANG_UP.bits() | EventSet::ERROR.bits();
const ERR: u32 = EventSet::ERROR.bits();

/// The host bridge's event handling, over a [`HostEndpoint`].
pub(crate) struct HostEvents<'a> {
    ep: HostEndpoint<'a>,
}

impl<'a> HostEvents<'a> {
    pub fn new(ep: HostEndpoint<'a>) -> Self {
        HostEvents { ep }
    }

    /// An event of the loop for a listener or a host socket.
    pub fn on_event(&mut self, token: u64, events: u32) {
        if self.ep.bridge().is_listener(token) {
            self.accept(token);
            return;
        }
        match self.ep.bridge().phase(token) {
            None => {}
            Some(Phase::Line) => self.read_connect_line(token),
            Some(Phase::Linked(key)) => {
                if events & OUT != 0 {
                    self.ep.flush_to_host(token);
                }
                if events & IN != 0 {
                    self.ep.pump_host_to_guest(token);
                }
                if events & HUP_OR_ERR != 0 {
                    self.ep.host_hangup(token, events & ERR != 0);
                }
                self.ep.after_host_change(key);
            }
        }
    }

    fn accept(&mut self, token: u64) {
        let timeout = self.ep.connect_timeout();
        let accepted = self.ep.bridge().accept(token, timeout);
        let c = self.ep.counters();
        c.host_busy += accepted.refused;
        c.accept_backoffs += accepted.backoffs;
        for t in accepted.tokens {
            self.ep.update_interest(t);
        }
    }

    /// Reads the `CONNECT <port>\n` line of a host socket.
    fn read_connect_line(&mut self, token: u64) {
        match self.ep.bridge().read_line(token) {
            LineRead::Waiting | LineRead::Closed => {}
            LineRead::Malformed => {
                self.ep.counters().host_errors += 1;
                self.ep.bridge().close(token, Some(ERR_MALFORMED));
            }
            LineRead::Connect(port, rest) => self.host_connect(token, port, rest),
        }
    }

    /// A host program asked for guest port `port`: REQUEST from a fresh host port.
    fn host_connect(&mut self, token: u64, port: u32, early_data: Vec<u8>) {
        let Some(cid) = self.ep.bridge().cid_of(token) else {
            return;
        };
        let refuse = if !self.ep.router().is_attached(cid) {
            Some(ERR_UNAVAILABLE)
        } else if self.ep.table().conns_of(cid) >= MAX_CONNS_PER_CID {
            Some(ERR_TOO_MANY)
        } else {
            None
        };
        let host_port = self.ep.table().alloc_host_port();
        let (Some(host_port), None) = (host_port, refuse) else {
            self.ep.counters().host_errors += 1;
            self.ep
                .bridge()
                .close(token, Some(refuse.unwrap_or(ERR_TOO_MANY)));
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
        self.ep
            .table()
            .insert(Connection::new(host, guest, Some(link)));
        self.ep.bridge().link(token, key);
        let timeout = self.ep.connect_timeout();
        self.ep.bridge().set_deadline(token, Some(timeout));
        self.ep.send_to_guest(key, op::REQUEST, 0, Vec::new());
        self.ep.update_interest(token);
    }

    /// Ends host sockets whose deadline passed and listeners' back-offs that are over;
    /// returns how long until the next deadline (at most a second: the loop looks again
    /// then), or `None` when there is none.
    pub fn check_timeouts(&mut self) -> Option<Duration> {
        let now = Instant::now();
        for token in self.ep.bridge().expired(now) {
            match self.ep.bridge().phase(token) {
                Some(Phase::Line) => {
                    self.ep.counters().host_errors += 1;
                    self.ep.bridge().close(token, Some(ERR_TIMEOUT));
                }
                Some(Phase::Linked(key)) => {
                    let conn = self.ep.table().get(&key);
                    let connecting = conn.is_some_and(|c| c.state == ConnState::Connecting);
                    let gone = conn
                        .and_then(|c| c.host.as_ref())
                        .is_some_and(|l| l.host_gone);
                    let missing = conn.is_none();
                    if connecting {
                        self.ep.counters().host_errors += 1;
                        self.ep.abort_host(key, Some(ERR_TIMEOUT));
                    } else if gone || missing {
                        self.ep.abort_host(key, None);
                        self.ep.bridge().close(token, None);
                    } else {
                        self.ep.bridge().set_deadline(token, None);
                    }
                }
                None => {}
            }
        }
        self.ep.bridge().next_deadline(now).map(|d| {
            let left = d.saturating_duration_since(Instant::now()) + Duration::from_millis(1);
            left.min(Duration::from_secs(1))
        })
    }

    /// The host connections of a restored table (now in place; `live` is the table as it
    /// was): each is kept only if `keep_host_sockets` and nothing happened on it since the
    /// cut (its live entry equals the saved one); the others are reset (an RST for the
    /// guest, queued for its resume). Host sockets not kept are closed.
    pub fn restore_links(&mut self, live: &BTreeMap<ConnKey, Connection>, keep_host_sockets: bool) {
        let host_keys: Vec<ConnKey> = self
            .ep
            .table()
            .values()
            .filter(|c| c.host.is_some())
            .map(|c| (c.client, c.server))
            .collect();
        let mut kept = BTreeSet::new();
        for key in host_keys {
            let Some(conn) = self.ep.table().get(&key).cloned() else {
                continue;
            };
            let Some(token) = conn.host.as_ref().map(|l| l.token) else {
                continue;
            };
            // The socket is kept only if nothing happened on the connection since the cut:
            // otherwise bytes crossed the socket that the restored guests do not know of.
            let unchanged = live.get(&key) == Some(&conn)
                && self.ep.bridge().phase(token) == Some(Phase::Linked(key));
            if keep_host_sockets && unchanged {
                kept.insert(token);
                continue;
            }
            log::info!(
                "vsock: host connection {} -> {} is reset by the restore",
                conn.client,
                conn.server
            );
            // RST from the host side, queued for the guest's resume.
            self.ep.send_to_guest(key, op::RST, 0, Vec::new());
            self.ep.table().remove(&key);
        }
        // Sockets gone from the set, opened after the cut, or from another process's set.
        for token in self.ep.bridge().all_tokens() {
            if !kept.contains(&token) {
                self.ep.bridge().close(token, None);
            }
        }
        for token in kept {
            self.ep.update_interest(token);
        }
    }

    /// Closes `cid`'s host sockets still sending their `CONNECT` line (a restore removes
    /// the partition).
    pub fn close_lines_of(&mut self, cid: u64) {
        for token in self.ep.bridge().tokens_of(cid) {
            if self.ep.bridge().phase(token) == Some(Phase::Line) {
                self.ep.bridge().close(token, Some(ERR_UNAVAILABLE));
            }
        }
    }
}
