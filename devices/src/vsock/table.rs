//! The connection table as a pure state machine: no I/O, no guest memory. It takes the
//! parsed headers of partition-to-partition packets and answers what to do with each
//! ([`Verdict`]), and keeps the counts its caps need (connections per partition, per pair
//! of partitions, half-open ones per client, host ports in use) up to date as entries come
//! and go, so that no decision scans the table. Host connections are entries too (the host
//! endpoint in `hostlink` changes their link state through [`ConnTable::get_mut`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::limits::{MAX_CONNECTING_PER_CID, MAX_CONNS_PER_CID, MAX_CONNS_PER_PAIR, MIN_GUEST_CID};
use super::packet::{op, Endpoint, Hdr, HOST_CID};
use super::state::{ConnKey, ConnState, Connection};

/// The first port handed out to host connections made with `CONNECT`.
pub(crate) const FIRST_HOST_PORT: u32 = 1 << 30;

/// What the switch does with a partition-to-partition packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Into the destination's backlog / RX queue.
    Forward,
    /// Not forwarded; the sender gets an RST from the endpoint it addressed.
    Refuse(Refusal),
    /// Not forwarded, not answered (an RST of a connection that does not exist).
    Drop,
}

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a REQUEST, and no connection between its endpoints is in the table.
    UnknownConnection,
    /// A REQUEST beyond a connection cap.
    TooMany,
}

/// The connection table and its counts.
#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    conns: BTreeMap<ConnKey, Connection>,
    /// The keys each partition (not the host) takes part in.
    by_cid: HashMap<u64, BTreeSet<ConnKey>>,
    /// Connections between two partitions, by (lower CID, higher CID).
    pairs: HashMap<(u64, u64), usize>,
    /// Partition-to-partition connections in `Connecting`, by client CID.
    connecting: HashMap<u64, usize>,
    /// Host ports of the table's connections.
    host_ports: HashSet<u32>,
    next_host_port: u32,
}

/// Whether both sides are partitions (not the host).
fn between_partitions(c: &Connection) -> bool {
    c.client.cid != HOST_CID && c.server.cid != HOST_CID
}

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

impl ConnTable {
    /// An empty table.
    pub fn new() -> Self {
        ConnTable {
            next_host_port: FIRST_HOST_PORT,
            ..Default::default()
        }
    }

    /// A table holding `conns` (a validated saved state).
    pub fn from_saved(conns: &BTreeMap<ConnKey, Connection>, next_host_port: u32) -> Self {
        let mut t = ConnTable {
            next_host_port,
            ..Default::default()
        };
        for c in conns.values() {
            t.insert(c.clone());
        }
        t
    }

    /// The table as saved.
    pub fn saved(&self) -> BTreeMap<ConnKey, Connection> {
        self.conns.clone()
    }

    pub fn next_host_port(&self) -> u32 {
        self.next_host_port
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values()
    }

    pub fn get(&self, key: &ConnKey) -> Option<&Connection> {
        self.conns.get(key)
    }

    /// A connection, to change its counters or host link (its endpoints and, for
    /// partition-to-partition connections, its state change only through this table).
    pub fn get_mut(&mut self, key: &ConnKey) -> Option<&mut Connection> {
        self.conns.get_mut(key)
    }

    /// The key of the connection between `a` and `b`, whichever side opened it.
    pub fn find(&self, a: Endpoint, b: Endpoint) -> Option<ConnKey> {
        [(a, b), (b, a)]
            .into_iter()
            .find(|k| self.conns.contains_key(k))
    }

    /// How many connections `cid` takes part in.
    pub fn conns_of(&self, cid: u64) -> usize {
        self.by_cid.get(&cid).map_or(0, BTreeSet::len)
    }

    /// The keys of the connections `cid` takes part in.
    pub fn keys_of(&self, cid: u64) -> Vec<ConnKey> {
        self.by_cid
            .get(&cid)
            .map_or_else(Vec::new, |s| s.iter().copied().collect())
    }

    /// Adds a connection (replacing one with the same key).
    pub fn insert(&mut self, c: Connection) {
        let key = (c.client, c.server);
        self.remove(&key);
        for side in [c.client, c.server] {
            if side.cid == HOST_CID {
                self.host_ports.insert(side.port);
            } else {
                self.by_cid.entry(side.cid).or_default().insert(key);
            }
        }
        if between_partitions(&c) {
            *self
                .pairs
                .entry(pair(c.client.cid, c.server.cid))
                .or_default() += 1;
            if c.state == ConnState::Connecting {
                *self.connecting.entry(c.client.cid).or_default() += 1;
            }
        }
        self.conns.insert(key, c);
    }

    /// Removes a connection.
    pub fn remove(&mut self, key: &ConnKey) -> Option<Connection> {
        let c = self.conns.remove(key)?;
        for side in [c.client, c.server] {
            if side.cid == HOST_CID {
                self.host_ports.remove(&side.port);
            } else if let Some(set) = self.by_cid.get_mut(&side.cid) {
                set.remove(key);
                if set.is_empty() {
                    self.by_cid.remove(&side.cid);
                }
            }
        }
        if between_partitions(&c) {
            decrement(&mut self.pairs, pair(c.client.cid, c.server.cid));
            if c.state == ConnState::Connecting {
                decrement(&mut self.connecting, c.client.cid);
            }
        }
        Some(c)
    }

    /// Empties the table; returns what it held.
    pub fn take_all(&mut self) -> BTreeMap<ConnKey, Connection> {
        let next_host_port = self.next_host_port;
        let old = std::mem::take(self);
        self.next_host_port = next_host_port;
        old.conns
    }

    /// A host port no connection uses, from [`FIRST_HOST_PORT`] up (`None` only if
    /// every port is taken, which the caps make impossible).
    pub fn alloc_host_port(&mut self) -> Option<u32> {
        for _ in 0..=self.host_ports.len() {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.host_ports.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Whether a partition may open another connection to a partition.
    fn may_connect(&self, client: u64, server: u64) -> bool {
        self.conns_of(client) < MAX_CONNS_PER_CID
            && self.conns_of(server) < MAX_CONNS_PER_CID
            && self.pairs.get(&pair(client, server)).copied().unwrap_or(0) < MAX_CONNS_PER_PAIR
            && self.connecting.get(&client).copied().unwrap_or(0) < MAX_CONNECTING_PER_CID
    }

    /// Whether a partition may open another connection to the host.
    pub fn may_connect_host(&self, cid: u64) -> bool {
        self.conns_of(cid) < MAX_CONNS_PER_CID
    }

    /// The table's answer to a stream packet between two attached partitions (its
    /// `src_cid` is the sender's): REQUEST adds (within the caps), RESPONSE establishes,
    /// SHUTDOWN closes, RST removes, RW counts; anything but a REQUEST needs its
    /// connection in the table.
    pub fn on_packet(&mut self, h: &Hdr) -> Verdict {
        let (src, dst) = (h.src(), h.dst());
        debug_assert!(src.cid >= MIN_GUEST_CID && dst.cid >= MIN_GUEST_CID);
        if h.op == op::REQUEST {
            if let Some(stale) = self.find(src, dst) {
                self.remove(&stale);
            }
            if !self.may_connect(src.cid, dst.cid) {
                return Verdict::Refuse(Refusal::TooMany);
            }
            self.insert(Connection::new(src, dst, None));
            return Verdict::Forward;
        }
        let Some(key) = self.find(src, dst) else {
            return if h.op == op::RST {
                Verdict::Drop
            } else {
                Verdict::Refuse(Refusal::UnknownConnection)
            };
        };
        match h.op {
            op::RESPONSE if key == (dst, src) => {
                if let Some(c) = self.conns.get_mut(&key) {
                    if c.state == ConnState::Connecting {
                        c.state = ConnState::Established;
                        decrement(&mut self.connecting, dst.cid);
                    }
                }
            }
            op::RST => {
                self.remove(&key);
            }
            op::SHUTDOWN => self.set_state(&key, ConnState::Closing),
            op::RW => {
                if let Some(c) = self.conns.get_mut(&key) {
                    let n = u64::from(h.len);
                    if key.0 == src {
                        c.bytes_to_server += n;
                    } else {
                        c.bytes_to_client += n;
                    }
                }
            }
            _ => {}
        }
        Verdict::Forward
    }

    /// Sets a connection's state, keeping the half-open count.
    pub fn set_state(&mut self, key: &ConnKey, state: ConnState) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let was_connecting = c.state == ConnState::Connecting;
        c.state = state;
        if was_connecting && state != ConnState::Connecting && between_partitions(c) {
            let client = c.client.cid;
            decrement(&mut self.connecting, client);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(cid: u64, port: u32) -> Endpoint {
        Endpoint { cid, port }
    }

    fn h(src: Endpoint, dst: Endpoint, o: u16) -> Hdr {
        Hdr::new(src, dst, o)
    }

    #[test]
    fn a_connection_lives_through_the_table() {
        let mut t = ConnTable::new();
        let (c, s) = (ep(3, 1000), ep(4, 80));
        assert_eq!(t.on_packet(&h(c, s, op::REQUEST)), Verdict::Forward);
        assert_eq!(t.get(&(c, s)).map(|x| x.state), Some(ConnState::Connecting));
        assert_eq!(t.on_packet(&h(s, c, op::RESPONSE)), Verdict::Forward);
        assert_eq!(
            t.get(&(c, s)).map(|x| x.state),
            Some(ConnState::Established)
        );
        let mut rw = h(c, s, op::RW);
        rw.len = 10;
        assert_eq!(t.on_packet(&rw), Verdict::Forward);
        assert_eq!(t.get(&(c, s)).map(|x| x.bytes_to_server), Some(10));
        assert_eq!(t.on_packet(&h(s, c, op::SHUTDOWN)), Verdict::Forward);
        assert_eq!(t.get(&(c, s)).map(|x| x.state), Some(ConnState::Closing));
        assert_eq!(t.on_packet(&h(c, s, op::RST)), Verdict::Forward);
        assert_eq!((t.len(), t.conns_of(3), t.conns_of(4)), (0, 0, 0));
    }

    #[test]
    fn packets_of_unknown_connections_are_refused_and_rst_dropped() {
        let mut t = ConnTable::new();
        let (c, s) = (ep(3, 1000), ep(4, 80));
        for o in [
            op::RESPONSE,
            op::SHUTDOWN,
            op::RW,
            op::CREDIT_UPDATE,
            op::CREDIT_REQUEST,
        ] {
            assert_eq!(
                t.on_packet(&h(c, s, o)),
                Verdict::Refuse(Refusal::UnknownConnection),
                "op {o}"
            );
        }
        assert_eq!(t.on_packet(&h(c, s, op::RST)), Verdict::Drop);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn request_floods_stop_at_the_caps_and_counts_follow_removals() {
        let mut t = ConnTable::new();
        let s = ep(4, 80);
        for p in 0..MAX_CONNECTING_PER_CID as u32 {
            assert_eq!(t.on_packet(&h(ep(3, p), s, op::REQUEST)), Verdict::Forward);
        }
        let over = h(ep(3, 99_999), s, op::REQUEST);
        assert_eq!(t.on_packet(&over), Verdict::Refuse(Refusal::TooMany));
        // Another partition may still connect to 4.
        assert_eq!(t.on_packet(&h(ep(5, 1), s, op::REQUEST)), Verdict::Forward);
        // Answered (refused by 4's stack): 3 may open again.
        assert_eq!(t.on_packet(&h(s, ep(3, 0), op::RST)), Verdict::Forward);
        assert_eq!(t.on_packet(&over), Verdict::Forward);
        // Established connections do not count as half-open, but count per pair.
        let mut t = ConnTable::new();
        for p in 0..MAX_CONNS_PER_PAIR as u32 {
            let (c, s) = (ep(3, p), ep(4, p));
            assert_eq!(t.on_packet(&h(c, s, op::REQUEST)), Verdict::Forward);
            assert_eq!(t.on_packet(&h(s, c, op::RESPONSE)), Verdict::Forward);
        }
        let over = h(ep(3, 99_999), ep(4, 1), op::REQUEST);
        assert_eq!(t.on_packet(&over), Verdict::Refuse(Refusal::TooMany));
        assert_eq!(t.conns_of(3), MAX_CONNS_PER_PAIR);
        let keys = t.keys_of(4);
        for k in &keys {
            t.remove(k);
        }
        assert_eq!((t.len(), t.conns_of(3), t.conns_of(4)), (0, 0, 0));
    }

    #[test]
    fn host_ports_are_unique_and_wrap() {
        let mut t = ConnTable::new();
        let p = t.alloc_host_port().unwrap();
        assert_eq!(p, FIRST_HOST_PORT);
        t.insert(Connection::new(ep(HOST_CID, p), ep(3, 80), None));
        let mut t2 = ConnTable::from_saved(&t.saved(), FIRST_HOST_PORT);
        assert_eq!(t2.alloc_host_port(), Some(FIRST_HOST_PORT + 1));
        let mut t3 = ConnTable::from_saved(&BTreeMap::new(), u32::MAX);
        assert_eq!(t3.alloc_host_port(), Some(u32::MAX));
        assert_eq!(t3.alloc_host_port(), Some(FIRST_HOST_PORT));
    }
}
