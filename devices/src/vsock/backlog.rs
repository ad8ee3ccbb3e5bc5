//! One partition's backlog: the packets waiting for room in its RX queue, kept per
//! **flow** (the packets of one connection in one direction, in order) and per **source**
//! (the sending CID), and delivered round-robin: one RX buffer to each waiting source in
//! turn, and within a source to each of its flows in turn. So a sender with many
//! connections, or with much queued, delays another source's next packet by at most one
//! packet (one RX buffer) per other waiting source.
//!
//! Byte counts are kept as packets come and go (per flow: the per-connection cap; per
//! source; in all), so no step scans the backlog; dropping a flow costs that flow's packets
//! only. The rings hold (key, generation) entries: an entry of a flow or source that was
//! dropped is skipped when reached, and the rings are compacted when such entries pile up.

use std::collections::{HashMap, VecDeque};

use super::packet::{Endpoint, Pending};

/// A flow's key: (sender, receiver) of its packets.
pub(crate) type FlowKey = (Endpoint, Endpoint);

#[derive(Debug)]
struct Flow {
    packets: VecDeque<Pending>,
    bytes: usize,
    id: u64,
}

#[derive(Debug)]
struct Source {
    /// Its flows, in turn (entries of dropped flows are stale).
    ring: VecDeque<(FlowKey, u64)>,
    /// Flows that exist.
    flows: usize,
    bytes: usize,
    id: u64,
}

/// Packets waiting for one partition's RX queue.
#[derive(Debug, Default)]
pub(crate) struct DestBacklog {
    flows: HashMap<FlowKey, Flow>,
    sources: HashMap<u64, Source>,
    /// Sources, in turn (entries of sources that went away are stale).
    ring: VecDeque<(u64, u64)>,
    bytes: usize,
    packets: usize,
    next_id: u64,
}

impl DestBacklog {
    /// A backlog holding `packets` (a saved one), each in its flow in order.
    pub fn from_packets<'a>(packets: impl IntoIterator<Item = &'a Pending>) -> Self {
        let mut b = DestBacklog::default();
        for p in packets {
            b.push(p.clone());
        }
        b
    }

    /// The packets, as saved: flow after flow, each in order.
    pub fn to_packets(&self) -> VecDeque<Pending> {
        let mut out = VecDeque::with_capacity(self.packets);
        for (cid, id) in &self.ring {
            let Some(s) = self.sources.get(cid).filter(|s| s.id == *id) else {
                continue;
            };
            for (key, fid) in &s.ring {
                if let Some(f) = self.flows.get(key).filter(|f| f.id == *fid) {
                    out.extend(f.packets.iter().cloned());
                }
            }
        }
        out
    }

    /// Bytes (headers + undelivered payload) waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn packets(&self) -> usize {
        self.packets
    }

    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Bytes waiting on one flow.
    pub fn flow_bytes(&self, key: &FlowKey) -> usize {
        self.flows.get(key).map_or(0, |f| f.bytes)
    }

    /// Bytes waiting from one source CID.
    pub fn source_bytes(&self, cid: u64) -> usize {
        self.sources.get(&cid).map_or(0, |s| s.bytes)
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Appends a packet to its flow.
    pub fn push(&mut self, p: Pending) {
        let key = (p.hdr.src(), p.hdr.dst());
        let cost = p.cost();
        if !self.flows.contains_key(&key) {
            let id = self.fresh_id();
            self.flows.insert(
                key,
                Flow {
                    packets: VecDeque::new(),
                    bytes: 0,
                    id,
                },
            );
            if !self.sources.contains_key(&key.0.cid) {
                let sid = self.fresh_id();
                self.sources.insert(
                    key.0.cid,
                    Source {
                        ring: VecDeque::new(),
                        flows: 0,
                        bytes: 0,
                        id: sid,
                    },
                );
                self.ring.push_back((key.0.cid, sid));
            }
            if let Some(s) = self.sources.get_mut(&key.0.cid) {
                s.ring.push_back((key, id));
                s.flows += 1;
            }
        }
        if let Some(f) = self.flows.get_mut(&key) {
            f.packets.push_back(p);
            f.bytes += cost;
        }
        if let Some(s) = self.sources.get_mut(&key.0.cid) {
            s.bytes += cost;
        }
        self.bytes += cost;
        self.packets += 1;
    }

    /// The flow whose turn it is (skipping stale ring entries).
    pub fn next_flow(&mut self) -> Option<FlowKey> {
        loop {
            let &(cid, sid) = self.ring.front()?;
            let Some(s) = self.sources.get_mut(&cid).filter(|s| s.id == sid) else {
                self.ring.pop_front();
                continue;
            };
            while let Some(&(key, fid)) = s.ring.front() {
                if self.flows.get(&key).is_some_and(|f| f.id == fid) {
                    return Some(key);
                }
                s.ring.pop_front();
            }
            // No live flow left (cannot happen: an empty source is removed).
            self.sources.remove(&cid);
            self.ring.pop_front();
        }
    }

    /// The packet at the head of a flow.
    pub fn head(&self, key: &FlowKey) -> Option<&Pending> {
        self.flows.get(key).and_then(|f| f.packets.front())
    }

    /// Records that `n` payload bytes of the head of `key` (the flow [`next_flow`] gave)
    /// were delivered, drops the packet once all of it was, and passes the turn on.
    ///
    /// [`next_flow`]: DestBacklog::next_flow
    pub fn advance(&mut self, key: &FlowKey, n: usize) {
        let Some(f) = self.flows.get_mut(key) else {
            return;
        };
        let Some(front) = f.packets.front_mut() else {
            return;
        };
        let before = front.cost();
        front.sent = (front.sent + n).min(front.data.len());
        let done = front.remaining() == 0;
        let after = if done { 0 } else { front.cost() };
        let freed = before - after;
        if done {
            f.packets.pop_front();
            self.packets -= 1;
        }
        f.bytes -= freed;
        let flow_empty = f.packets.is_empty();
        self.bytes -= freed;
        let cid = key.0.cid;
        let Some(s) = self.sources.get_mut(&cid) else {
            return;
        };
        s.bytes -= freed;
        // Pass the turn: the flow goes to the back of its source's ring (or away), the
        // source to the back of the ring (or away).
        if let Some(entry) = s.ring.pop_front() {
            if flow_empty {
                self.flows.remove(key);
                s.flows -= 1;
            } else {
                s.ring.push_back(entry);
            }
        }
        let source_empty = s.flows == 0;
        if let Some(entry) = self.ring.pop_front() {
            if source_empty {
                self.sources.remove(&cid);
            } else {
                self.ring.push_back(entry);
            }
        }
    }

    /// Drops a flow's packets; returns how many bytes they held.
    pub fn purge_flow(&mut self, key: &FlowKey) -> usize {
        let Some(f) = self.flows.remove(key) else {
            return 0;
        };
        self.bytes -= f.bytes;
        self.packets -= f.packets.len();
        let cid = key.0.cid;
        if let Some(s) = self.sources.get_mut(&cid) {
            s.bytes -= f.bytes;
            s.flows -= 1;
            if s.flows == 0 {
                self.sources.remove(&cid);
            } else if s.ring.len() > 2 * s.flows + 16 {
                let flows = &self.flows;
                s.ring
                    .retain(|(k, id)| flows.get(k).is_some_and(|f| f.id == *id));
            }
        }
        if self.ring.len() > 2 * self.sources.len() + 16 {
            let sources = &self.sources;
            self.ring
                .retain(|(c, id)| sources.get(c).is_some_and(|s| s.id == *id));
        }
        f.bytes
    }

    /// Empties the backlog.
    pub fn clear(&mut self) {
        *self = DestBacklog {
            next_id: self.next_id,
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::packet::{Hdr, HDR_SIZE};

    fn ep(cid: u64, port: u32) -> Endpoint {
        Endpoint { cid, port }
    }

    fn pkt(src: Endpoint, n: usize) -> Pending {
        Pending::new(Hdr::new(src, ep(4, 80), 5), vec![0; n])
    }

    /// Delivers whole packets until empty; returns their sources in order.
    fn drain(b: &mut DestBacklog) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let Some(k) = b.next_flow() else { break };
            let n = b.head(&k).map_or(0, Pending::remaining);
            b.advance(&k, n);
            out.push(k.0);
        }
        out
    }

    #[test]
    fn sources_take_turns_then_flows_within_a_source() {
        let mut b = DestBacklog::default();
        let (a1, a2, c) = (ep(3, 1), ep(3, 2), ep(5, 1));
        for _ in 0..3 {
            b.push(pkt(a1, 10));
            b.push(pkt(a2, 10));
        }
        b.push(pkt(c, 10));
        b.push(pkt(c, 10));
        assert_eq!(b.packets(), 8);
        assert_eq!(b.bytes(), 8 * (HDR_SIZE + 10));
        assert_eq!(b.flow_bytes(&(a1, ep(4, 80))), 3 * (HDR_SIZE + 10));
        assert_eq!(b.source_bytes(3), 6 * (HDR_SIZE + 10));
        let order = drain(&mut b);
        assert_eq!(order, vec![a1, c, a2, c, a1, a2, a1, a2]);
        assert_eq!((b.bytes(), b.packets()), (0, 0));
    }

    #[test]
    fn split_packets_and_purges_keep_the_counts() {
        let mut b = DestBacklog::default();
        let (a, c) = (ep(3, 1), ep(5, 1));
        b.push(pkt(a, 100));
        b.push(pkt(c, 10));
        let k = b.next_flow().unwrap();
        assert_eq!(k.0, a);
        b.advance(&k, 60);
        assert_eq!(b.bytes(), HDR_SIZE + 40 + HDR_SIZE + 10);
        // C's turn, then A's rest.
        assert_eq!(b.next_flow().unwrap().0, c);
        assert_eq!(b.purge_flow(&(c, ep(4, 80))), HDR_SIZE + 10);
        assert_eq!(b.source_bytes(5), 0);
        let k = b.next_flow().unwrap();
        assert_eq!((k.0, b.head(&k).unwrap().remaining()), (a, 40));
        b.advance(&k, 40);
        assert!(b.is_empty() && b.next_flow().is_none());
        // Many purged flows leave no growing rings behind.
        for p in 0..10_000 {
            b.push(pkt(ep(3, p), 0));
            b.purge_flow(&(ep(3, p), ep(4, 80)));
        }
        b.push(pkt(c, 1));
        assert!(b.ring.len() < 64);
        assert_eq!(drain(&mut b), vec![c]);
        let saved = {
            b.push(pkt(a, 1));
            b.push(pkt(c, 2));
            b.push(pkt(a, 3));
            b.to_packets()
        };
        let back = DestBacklog::from_packets(&saved);
        assert_eq!(back.to_packets(), saved);
        assert_eq!(back.bytes(), b.bytes());
    }
}
