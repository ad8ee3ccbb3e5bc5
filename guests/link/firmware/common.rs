//! Firmware glue shared by the engine and the controller firmware, which include this file
//! with `#[path]` (it needs `duplex-runtime`, which the host-buildable `duplex-link` crate
//! must not depend on): one print-link connection over the runtime's vsock ([`Conn`]) and
//! a non-blocking heartbeat ([`Beat`]).
//!
//! A [`Conn`] owns the connection's [`FrameDecoder`] (received bytes → messages), its
//! [`Outbox`] (messages → packets within the peer's credit) and its credit bookkeeping
//! ([`PeerCredit`]). The firmware feeds it every event of its connection
//! ([`Conn::on_event`]), reads what arrived ([`Conn::drain`] then [`Conn::next_message`]),
//! queues replies ([`Conn::send`]) and calls [`Conn::flush`] each turn of its loop.
//!
//! Sending follows [`PeerCredit::plan`] (as `vsockecho` does): whole packets when the
//! peer has room, a worthwhile part of its credit otherwise, nothing while it is short
//! (the connection is then blocked until the peer's next credit update), and a credit
//! request only after the peer has been quiet for [`CREDIT_REQUEST_AFTER_MS`] — which is
//! why a blocked connection has a [`Conn::deadline`].

// Each firmware uses a different subset.
#![allow(dead_code)]

use alloc::vec::Vec;
use core::time::Duration;

use duplex_link::outbox::{Flush, Outbox, SendOutcome, Sink};
use duplex_link::{FrameDecoder, FrameError};
use duplex_runtime::println;
use duplex_runtime::time::{self, rdtsc};
use duplex_runtime::vsock::{
    PeerCredit, SendPlan, SocketError, VirtioError, Vsock, VsockAddr, VsockEvent,
    CREDIT_REQUEST_AFTER_MS, DEFAULT_CONNECTION_BUFFER, MAX_PACKET_DATA,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long a connection we shut down may wait for the peer's reset before it is forced.
const SHUTDOWN_GRACE_MS: u64 = 2000;

/// Scratch space for [`Conn::drain`]: one full packet.
pub fn scratch() -> Vec<u8> {
    alloc::vec![0u8; MAX_PACKET_DATA]
}

/// Whether `e` is "the connection is gone".
pub fn is_not_connected(e: &VirtioError) -> bool {
    matches!(e, VirtioError::SocketDeviceError(SocketError::NotConnected))
}

/// A TSC deadline `ms` milliseconds from now.
pub fn ms_from_now(ms: u64) -> u64 {
    rdtsc().saturating_add(time::ns_to_ticks(ms.saturating_mul(1_000_000)))
}

/// The [`Sink`] of one vsock connection.
struct VsockSink<'a> {
    vsock: &'a mut Vsock,
    peer: VsockAddr,
    port: u32,
    credit: &'a mut PeerCredit,
}

impl Sink for VsockSink<'_> {
    fn limit(&mut self, want: usize) -> usize {
        let want = want.min(MAX_PACKET_DATA);
        match self.credit.plan(want) {
            SendPlan::Send(n) => n,
            SendPlan::Wait => 0,
            // The full-size attempt fails, and makes the manager ask the peer for credit
            // (or succeeds if the manager knows of credit this bookkeeping missed).
            SendPlan::RequestCredit => want,
        }
    }

    fn send(&mut self, data: &[u8]) -> SendOutcome {
        match self.vsock.send(self.peer, self.port, data) {
            Ok(()) => {
                self.credit.sent(data.len());
                SendOutcome::Sent
            }
            Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                SendOutcome::NoCredit
            }
            Err(e) => {
                if !is_not_connected(&e) {
                    println!("link: send to {:?}: {e}", self.peer);
                }
                SendOutcome::Failed
            }
        }
    }
}

/// `<role> heartbeat N` every period, without blocking: [`Beat::next`] is the TSC deadline
/// for the event wait. A late beat causes no burst: the next is one period after it.
pub struct Beat {
    role: &'static str,
    period: u64,
    /// TSC value of the next beat.
    pub next: u64,
    count: u64,
}

impl Beat {
    /// Beats every `period_ms` (at least 1) milliseconds, the first one period from now.
    pub fn new(role: &'static str, period_ms: u64) -> Self {
        let period = time::duration_to_ticks(Duration::from_millis(period_ms.max(1)));
        Beat {
            role,
            period,
            next: rdtsc().saturating_add(period),
            count: 0,
        }
    }

    /// Prints the next beat if it is due.
    pub fn tick(&mut self) {
        let now = rdtsc();
        if now >= self.next {
            self.count += 1;
            println!("{} heartbeat {}", self.role, self.count);
            self.next = now.saturating_add(self.period);
        }
    }
}

/// One connection carrying frames of `In` inbound.
pub struct Conn<In> {
    /// The peer's address.
    pub peer: VsockAddr,
    /// Our port.
    pub port: u32,
    credit: PeerCredit,
    decoder: FrameDecoder<In>,
    outbox: Outbox,
    /// The last flush left bytes waiting for the peer's credit.
    blocked: bool,
    /// The connection is gone (the manager dropped it, or a send or recv failed).
    pub gone: bool,
    /// Shut down once the outbox is empty; input is dropped meanwhile.
    closing: bool,
    /// TSC deadline for the peer's answer to our shutdown.
    shut_deadline: Option<u64>,
}

impl<In: DeserializeOwned> Conn<In> {
    /// A connection with `peer` on our `port`.
    pub fn new(peer: VsockAddr, port: u32) -> Self {
        Conn {
            peer,
            port,
            credit: PeerCredit::new(DEFAULT_CONNECTION_BUFFER),
            decoder: FrameDecoder::new(),
            outbox: Outbox::new(),
            blocked: false,
            gone: false,
            closing: false,
            shut_deadline: None,
        }
    }

    /// Whether `event` belongs to this connection.
    pub fn matches(&self, event: &VsockEvent) -> bool {
        event.source == self.peer && event.destination.port == self.port
    }

    /// Takes the peer's credit from an event of this connection.
    pub fn on_event(&mut self, event: &VsockEvent) {
        self.credit.update(event);
    }

    /// Moves what the manager has buffered for this connection into the decoder (dropped
    /// while closing), advertising the freed space to the peer. Returns whether anything
    /// was read.
    pub fn drain(&mut self, vsock: &mut Vsock, scratch: &mut [u8]) -> bool {
        let mut any = false;
        while !self.gone {
            let n = match vsock.recv(self.peer, self.port, scratch) {
                Ok(n) => n,
                Err(e) => {
                    if !is_not_connected(&e) {
                        println!("link: recv from {:?}: {e}", self.peer);
                    }
                    self.gone = true;
                    break;
                }
            };
            if n == 0 {
                break;
            }
            any = true;
            if !self.closing {
                self.decoder.push(&scratch[..n]);
            }
            if self.credit.consumed(n) {
                match vsock.update_credit(self.peer, self.port) {
                    Ok(()) => self.credit.advertised(),
                    // The last recv may have closed it (the peer had shut down).
                    Err(e) if is_not_connected(&e) => self.gone = true,
                    Err(e) => println!("link: credit update to {:?}: {e}", self.peer),
                }
            }
        }
        any
    }

    /// The next received message (see [`FrameDecoder::next_message`]).
    pub fn next_message(&mut self) -> Option<Result<In, FrameError>> {
        if self.closing {
            return None;
        }
        self.decoder.next_message()
    }

    /// Queues a message.
    pub fn send<T: Serialize + ?Sized>(&mut self, msg: &T) {
        if !self.gone && !self.closing {
            self.outbox.push(msg);
        }
    }

    /// Shuts the connection down once what is queued has gone out.
    pub fn close(&mut self) {
        self.closing = true;
    }

    /// Whether [`Conn::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Bytes queued and not sent.
    pub fn pending(&self) -> usize {
        self.outbox.pending()
    }

    /// Sends what the peer's credit allows; shuts down a closing connection once empty,
    /// and forces it closed if the peer does not answer the shutdown in time. Returns
    /// whether anything was sent.
    pub fn flush(&mut self, vsock: &mut Vsock) -> bool {
        if self.gone {
            return false;
        }
        let before = self.outbox.pending();
        self.blocked = false;
        if before > 0 {
            let mut sink = VsockSink {
                vsock,
                peer: self.peer,
                port: self.port,
                credit: &mut self.credit,
            };
            match self.outbox.flush(&mut sink) {
                Flush::Done => {}
                Flush::Blocked => self.blocked = true,
                Flush::Failed => self.gone = true,
            }
        }
        if self.closing && !self.gone && self.outbox.is_empty() {
            match self.shut_deadline {
                None => {
                    self.shut_deadline = Some(ms_from_now(SHUTDOWN_GRACE_MS));
                    if vsock.shutdown(self.peer, self.port).is_err() {
                        self.gone = true;
                    }
                }
                Some(deadline) if rdtsc() >= deadline => {
                    let _ = vsock.force_close(self.peer, self.port);
                    self.gone = true;
                }
                Some(_) => {}
            }
        }
        self.outbox.pending() < before
    }

    /// When [`Conn::flush`] next has something to do by the clock, as a TSC deadline: the
    /// end of the shutdown grace period, or, while blocked on credit, the moment
    /// [`PeerCredit::plan`] may ask the peer for credit.
    pub fn deadline(&self) -> Option<u64> {
        if self.gone {
            return None;
        }
        let credit = self.blocked.then(|| ms_from_now(CREDIT_REQUEST_AFTER_MS));
        match (self.shut_deadline, credit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops the connection now (a reset to the peer).
    pub fn abort(&mut self, vsock: &mut Vsock) {
        if !self.gone {
            let _ = vsock.force_close(self.peer, self.port);
            self.gone = true;
        }
    }
}
