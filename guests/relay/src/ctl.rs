//! The vsock connection to the controller's job port (1024), carrying the logic's
//! `HostRequest`s and bringing back `HostReply`s (`docs/link-protocol.md`). The logic
//! decides when to connect, gives up on stale attempts and reconnects
//! ([`duplex_relay::Relay`]); this moves the frames (through the link's `Conn`, which
//! follows the peer's credit) and reports what happened.

use alloc::format;
use alloc::vec::Vec;

use duplex_link::{HostReply, HostRequest, JOB_PORT};
use duplex_relay::Relay;
use duplex_runtime::println;
use duplex_runtime::vsock::{Vsock, VsockAddr, VsockEvent, VsockEventType};

use crate::common::{self, Conn};

/// Local ports for connections to the controller: a fresh one per attempt.
const PORT_FIRST: u32 = 49152;

enum Link {
    Idle,
    Connecting { port: u32 },
    Up(Conn<HostReply>),
}

/// The controller link.
pub struct CtlLink {
    addr: VsockAddr,
    link: Link,
    next_port: u32,
    scratch: Vec<u8>,
}

impl CtlLink {
    pub fn new(cid: u64) -> Self {
        CtlLink {
            addr: VsockAddr {
                cid,
                port: JOB_PORT,
            },
            link: Link::Idle,
            next_port: PORT_FIRST,
            scratch: common::scratch(),
        }
    }

    /// Starts a connection (the logic's `ControllerConnect`).
    pub fn connect(&mut self, v: &mut Vsock, logic: &mut Relay, now: u64) {
        self.drop_link(v);
        let port = self.next_port;
        self.next_port = if port >= u32::from(u16::MAX) {
            PORT_FIRST
        } else {
            port + 1
        };
        match v.connect(self.addr, port) {
            Ok(()) => self.link = Link::Connecting { port },
            Err(e) => {
                println!("relay: vsock connect to the controller: {e}");
                logic.on_controller_closed(now);
            }
        }
    }

    /// Drops the connection (the logic's `ControllerClose`).
    pub fn close(&mut self, v: &mut Vsock) {
        self.drop_link(v);
    }

    fn drop_link(&mut self, v: &mut Vsock) {
        match core::mem::replace(&mut self.link, Link::Idle) {
            Link::Idle => {}
            Link::Connecting { port } => {
                let _ = v.force_close(self.addr, port);
            }
            Link::Up(mut conn) => conn.abort(v),
        }
    }

    /// Queues a request.
    pub fn send(&mut self, req: &HostRequest) {
        if let Link::Up(conn) = &mut self.link {
            conn.send(req);
        }
    }

    /// Sends what the controller's credit allows; reports a connection that failed.
    /// Returns whether anything was sent.
    pub fn flush(&mut self, v: &mut Vsock, logic: &mut Relay, now: u64) -> bool {
        let Link::Up(conn) = &mut self.link else {
            return false;
        };
        let sent = conn.flush(v);
        if conn.gone {
            self.link = Link::Idle;
            logic.on_controller_closed(now);
        }
        sent
    }

    /// When the link next has something to do by the clock (TSC).
    pub fn deadline(&self) -> Option<u64> {
        match &self.link {
            Link::Up(conn) => conn.deadline(),
            _ => None,
        }
    }

    /// Handles a vsock event (every event: the relay has no other vsock connection).
    pub fn handle(&mut self, v: &mut Vsock, event: VsockEvent, logic: &mut Relay, now: u64) {
        let ours = event.source == self.addr;
        match &mut self.link {
            Link::Connecting { port } if ours && event.destination.port == *port => {
                match event.event_type {
                    VsockEventType::Connected => {
                        let mut conn = Conn::new(self.addr, *port);
                        conn.on_event(&event);
                        self.link = Link::Up(conn);
                        logic.on_controller_connected(now);
                    }
                    VsockEventType::Disconnected { .. } => {
                        self.link = Link::Idle;
                        logic.on_controller_closed(now);
                    }
                    _ => {}
                }
            }
            Link::Up(conn) if conn.matches(&event) => {
                conn.on_event(&event);
                match event.event_type {
                    VsockEventType::Received { .. } => self.serve(v, logic, now),
                    VsockEventType::Disconnected { reason } => {
                        self.serve(v, logic, now);
                        println!("relay: controller link closed ({reason:?})");
                        self.link = Link::Idle;
                        logic.on_controller_closed(now);
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

    /// Reads what arrived and hands each reply to the logic.
    fn serve(&mut self, v: &mut Vsock, logic: &mut Relay, now: u64) {
        let Link::Up(conn) = &mut self.link else {
            return;
        };
        conn.drain(v, &mut self.scratch);
        let mut replies = Vec::new();
        let mut bad = None;
        while let Some(m) = conn.next_message() {
            match m {
                Ok(r) => replies.push(r),
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        for r in replies {
            logic.on_controller_reply(r, now);
        }
        if let Some(e) = bad {
            if let Link::Up(conn) = &mut self.link {
                conn.abort(v);
            }
            self.link = Link::Idle;
            logic.on_controller_malformed(&format!("{e}"), now);
        }
    }
}
