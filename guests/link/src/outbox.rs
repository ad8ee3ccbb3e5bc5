//! Outgoing bytes of one stream connection, sent in chunks as the peer's credit allows.
//!
//! A vsock peer accepts a packet only if it fits the receive credit it last advertised
//! (virtio-drivers' `send` fails with "insufficient buffer space" otherwise, and asks the
//! peer for a credit update). An [`Outbox`] keeps whatever has not gone out yet, so a
//! 64 KiB `Print` frame crosses a link with a 1 KiB receive buffer in many packets: the
//! firmware calls [`Outbox::flush`] again after each event from the peer (a credit update
//! in particular). The connection is a [`Sink`]: it decides how much is worth sending now
//! (the firmware's sink follows the runtime's `PeerCredit::plan`: whole packets or
//! worthwhile parts of the peer's credit, nothing while it is short, and a credit request
//! only after the peer has been quiet for a while) and sends one packet.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use serde::Serialize;

use crate::frame::encode;

/// What a send of one chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The chunk was sent.
    Sent,
    /// The peer has no room for a chunk this long; try again (shorter, or later).
    NoCredit,
    /// The connection is gone (or the device failed); nothing more can be sent.
    Failed,
}

/// Where an [`Outbox`] sends its bytes: one connection.
pub trait Sink {
    /// How many of the next `want` (≥ 1) queued bytes to send now as one packet: at most
    /// `want` (and at most the transport's packet size); 0 when nothing is worth trying now
    /// (the peer is short of credit: wait for its next credit update).
    fn limit(&mut self, want: usize) -> usize;
    /// Sends one packet, all of `data` or nothing.
    fn send(&mut self, data: &[u8]) -> SendOutcome;
}

/// What [`Outbox::flush`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued has been sent.
    Done,
    /// Some bytes wait for credit from the peer.
    Blocked,
    /// The send failed; the queued bytes are dropped.
    Failed,
}

/// Outgoing frames of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Vec<u8>>,
    /// Bytes of the front frame already sent.
    offset: usize,
    /// Bytes queued and not sent.
    pending: usize,
    scratch: Vec<u8>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues an encoded frame (or any bytes).
    pub fn push_bytes(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.pending += bytes.len();
            self.frames.push_back(bytes);
        }
    }

    /// Queues a message as one frame.
    pub fn push<T: Serialize + ?Sized>(&mut self, msg: &T) {
        self.push_bytes(encode(msg));
    }

    /// Bytes waiting to be sent.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.offset = 0;
        self.pending = 0;
    }

    /// Sends queued bytes through `sink`, one packet of [`Sink::limit`] bytes at a time
    /// (small frames are coalesced into one packet), until everything is sent, the sink
    /// says to wait (limit 0), or the peer refuses a packet for lack of credit: then
    /// [`Flush::Blocked`] until the next call (no smaller retry: the refusal has asked the
    /// peer for a credit update).
    pub fn flush(&mut self, sink: &mut impl Sink) -> Flush {
        while self.pending > 0 {
            let len = sink.limit(self.pending).min(self.pending);
            if len == 0 {
                return Flush::Blocked;
            }
            self.gather(len);
            match sink.send(&self.scratch) {
                SendOutcome::Sent => self.consume(len),
                SendOutcome::NoCredit => return Flush::Blocked,
                SendOutcome::Failed => {
                    self.clear();
                    return Flush::Failed;
                }
            }
        }
        Flush::Done
    }

    /// Copies the next `len` pending bytes into `scratch`.
    fn gather(&mut self, len: usize) {
        self.scratch.clear();
        let mut offset = self.offset;
        for frame in &self.frames {
            let want = len - self.scratch.len();
            if want == 0 {
                break;
            }
            let take = (frame.len() - offset).min(want);
            self.scratch
                .extend_from_slice(&frame[offset..offset + take]);
            offset = 0;
        }
    }

    /// Marks `len` bytes as sent.
    fn consume(&mut self, mut len: usize) {
        self.pending -= len;
        while len > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.offset;
            if len >= left {
                len -= left;
                self.offset = 0;
                self.frames.pop_front();
            } else {
                self.offset += len;
                len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A peer with a receive buffer of `cap` bytes that the application drains on demand;
    /// the sender knows its credit exactly and sends packets of at most 4 KiB, or waits
    /// while less than `min_part` bytes of credit are free and the packet would not fit.
    struct Peer {
        cap: usize,
        unread: usize,
        received: Vec<u8>,
        packets: usize,
        max_packet: usize,
        min_part: usize,
        /// `want` of every `limit` call.
        asked: Vec<usize>,
    }

    impl Peer {
        fn new(cap: usize, min_part: usize) -> Self {
            Peer {
                cap,
                unread: 0,
                received: Vec::new(),
                packets: 0,
                max_packet: 0,
                min_part,
                asked: Vec::new(),
            }
        }
    }

    impl Sink for Peer {
        fn limit(&mut self, want: usize) -> usize {
            self.asked.push(want);
            let want = want.min(4096);
            let free = self.cap - self.unread;
            if free >= want {
                want
            } else if free >= self.min_part {
                free
            } else {
                0
            }
        }

        fn send(&mut self, chunk: &[u8]) -> SendOutcome {
            if self.unread + chunk.len() > self.cap {
                return SendOutcome::NoCredit;
            }
            self.unread += chunk.len();
            self.received.extend_from_slice(chunk);
            self.packets += 1;
            self.max_packet = self.max_packet.max(chunk.len());
            SendOutcome::Sent
        }
    }

    #[test]
    fn large_frame_crosses_a_small_buffer() {
        let frame: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let mut out = Outbox::new();
        out.push_bytes(frame.clone());
        out.push_bytes(vec![1, 2, 3]);
        let mut peer = Peer::new(1000, 250);
        let mut rounds = 0;
        loop {
            match out.flush(&mut peer) {
                Flush::Done => break,
                Flush::Blocked => {
                    // The peer drains and sends a credit update.
                    peer.unread = 0;
                    rounds += 1;
                }
                Flush::Failed => panic!("failed"),
            }
            assert!(rounds < 1000);
        }
        assert_eq!(peer.received.len(), 70_003);
        assert_eq!(&peer.received[..70_000], &frame[..]);
        assert_eq!(&peer.received[70_000..], &[1, 2, 3]);
        assert!(peer.max_packet <= 1000);
        assert!(out.is_empty());
        // Every packet but the last filled the peer's buffer: no slivers.
        assert_eq!(peer.packets, 71);
        assert_eq!(rounds, 70);
        // The sink is asked about everything pending, and decides the packet size.
        assert_eq!(peer.asked[0], 70_003);
    }

    #[test]
    fn slivers_of_credit_wait_for_more() {
        let mut out = Outbox::new();
        out.push_bytes(vec![5; 3000]);
        let mut peer = Peer::new(1000, 250);
        peer.unread = 900; // 100 bytes free: not worth a packet
        assert_eq!(out.flush(&mut peer), Flush::Blocked);
        assert_eq!(peer.packets, 0);
        assert_eq!(out.pending(), 3000);
        peer.unread = 700; // 300 free: worth it
        assert_eq!(out.flush(&mut peer), Flush::Blocked);
        assert_eq!((peer.packets, peer.received.len()), (1, 300));
        // A tail that fits goes out whole, however small.
        let mut out = Outbox::new();
        out.push_bytes(vec![6; 40]);
        peer.unread = 950; // 50 free
        assert_eq!(out.flush(&mut peer), Flush::Done);
        assert_eq!(peer.received.len(), 340);
    }

    #[test]
    fn known_credit_is_used_exactly() {
        let mut out = Outbox::new();
        out.push_bytes(vec![7; 10_000]);
        let mut peer = Peer::new(3000, 1);
        assert_eq!(out.flush(&mut peer), Flush::Blocked);
        assert_eq!(peer.packets, 1);
        assert_eq!(peer.received.len(), 3000);
        peer.unread = 0;
        assert_eq!(out.flush(&mut peer), Flush::Blocked);
        assert_eq!(peer.received.len(), 6000);
    }

    /// A sink that takes everything, with a fixed limit.
    struct Any<F: FnMut(&[u8]) -> SendOutcome>(usize, F);

    impl<F: FnMut(&[u8]) -> SendOutcome> Sink for Any<F> {
        fn limit(&mut self, want: usize) -> usize {
            want.min(self.0)
        }
        fn send(&mut self, data: &[u8]) -> SendOutcome {
            (self.1)(data)
        }
    }

    #[test]
    fn small_frames_are_coalesced() {
        let mut out = Outbox::new();
        for i in 0..10u8 {
            out.push_bytes(vec![i; 10]);
        }
        let mut packets = Vec::new();
        assert_eq!(
            out.flush(&mut Any(64, |c: &[u8]| {
                packets.push(c.to_vec());
                SendOutcome::Sent
            })),
            Flush::Done
        );
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].len(), 64);
        assert_eq!(
            packets.concat(),
            (0..10u8).flat_map(|i| [i; 10]).collect::<Vec<_>>()
        );
    }

    #[test]
    fn failure_drops_everything() {
        let mut out = Outbox::new();
        out.push(&crate::ToEngine::Status);
        assert_eq!(
            out.flush(&mut Any(64, |_: &[u8]| SendOutcome::Failed)),
            Flush::Failed
        );
        assert!(out.is_empty());
    }

    #[test]
    fn blocked_keeps_bytes_for_later() {
        let mut out = Outbox::new();
        out.push_bytes(vec![9; 50]);
        // A refused packet is tried once per flush, not again in smaller pieces.
        let mut tries = 0;
        assert_eq!(
            out.flush(&mut Any(64, |_: &[u8]| {
                tries += 1;
                SendOutcome::NoCredit
            })),
            Flush::Blocked
        );
        assert_eq!(tries, 1);
        assert_eq!(out.pending(), 50);
        // A sink that says "wait" is not sent to at all.
        assert_eq!(
            out.flush(&mut Any(0, |_: &[u8]| unreachable!())),
            Flush::Blocked
        );
        let mut got = Vec::new();
        assert_eq!(
            out.flush(&mut Any(64, |c: &[u8]| {
                got.extend_from_slice(c);
                SendOutcome::Sent
            })),
            Flush::Done
        );
        assert_eq!(got, vec![9; 50]);
    }
}
