//! Outgoing bytes of one stream connection, sent in chunks as the peer's credit allows.
//!
//! A vsock peer accepts a packet only if it fits the receive credit it last advertised
//! (virtio-drivers' `send` fails with "insufficient buffer space" otherwise, and asks the
//! peer for a credit update). An [`Outbox`] keeps whatever has not gone out yet, so a
//! 64 KiB `Print` frame crosses a link with a 1 KiB receive buffer in many packets: the
//! firmware calls [`Outbox::flush`] again after each event from the peer (a credit update
//! in particular). The connection is a [`Sink`]: it says how long a packet is worth trying
//! and sends one.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use serde::Serialize;

use crate::frame::encode;

/// Chunks are not split below this many bytes when the peer is short of credit (a tail
/// shorter than this still goes out whole).
pub const MIN_CHUNK: usize = 64;

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
    /// The longest packet worth trying now (the peer's credit as last known, capped at the
    /// transport's packet size; when the credit is thought to be zero, the packet size:
    /// the transport knows better and a refused try costs nothing).
    fn limit(&self) -> usize;
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

    /// Sends queued bytes through `sink`, one packet of at most [`Sink::limit`] bytes at
    /// a time (small frames are coalesced into one packet). When the peer refuses a packet
    /// for lack of credit it is halved, down to [`MIN_CHUNK`], before giving up until the
    /// next call.
    pub fn flush(&mut self, sink: &mut impl Sink) -> Flush {
        let mut limit = sink.limit().max(1);
        while self.pending > 0 {
            let len = self.pending.min(limit);
            self.gather(len);
            match sink.send(&self.scratch) {
                SendOutcome::Sent => {
                    self.consume(len);
                    limit = sink.limit().max(1);
                }
                SendOutcome::NoCredit if len > MIN_CHUNK => limit = (len / 2).max(MIN_CHUNK),
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

    /// A peer with a receive buffer of `cap` bytes that the application drains on demand.
    struct Peer {
        cap: usize,
        unread: usize,
        received: Vec<u8>,
        packets: usize,
        max_packet: usize,
        /// What the sender believes the credit is (None: it does not know, 0).
        known_free: Option<usize>,
    }

    impl Sink for Peer {
        fn limit(&self) -> usize {
            match self.known_free {
                Some(f) if f > 0 => f.min(4096),
                _ => 4096,
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
        let mut peer = Peer {
            cap: 1000,
            unread: 0,
            received: Vec::new(),
            packets: 0,
            max_packet: 0,
            known_free: None,
        };
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
        // Halving stops at MIN_CHUNK: the packets are not tiny.
        assert!(
            peer.packets < 70_003 / MIN_CHUNK,
            "{} packets",
            peer.packets
        );
    }

    #[test]
    fn known_credit_is_used_exactly() {
        let mut out = Outbox::new();
        out.push_bytes(vec![7; 10_000]);
        let mut peer = Peer {
            cap: 3000,
            unread: 0,
            received: Vec::new(),
            packets: 0,
            max_packet: 0,
            known_free: Some(3000),
        };
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
        fn limit(&self) -> usize {
            self.0
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
        assert_eq!(
            out.flush(&mut Any(64, |_: &[u8]| SendOutcome::NoCredit)),
            Flush::Blocked
        );
        assert_eq!(out.pending(), 50);
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
