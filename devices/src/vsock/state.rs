//! The switch's state as plain data: the connection table (with the host side's credit
//! and buffered bytes), the per-destination backlogs and the counters. All of it is
//! serde-serializable so that a snapshot can carry it; `status` reads [`VsockStats`].

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::packet::{Endpoint, Pending, HOST_CID};

/// A connection's key: (client = the side that sent REQUEST, server).
pub type ConnKey = (Endpoint, Endpoint);

/// Where a connection is in its life, as the switch saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// REQUEST seen, no RESPONSE yet.
    Connecting,
    /// RESPONSE seen.
    Established,
    /// A SHUTDOWN was seen; waiting for the RST that ends it.
    Closing,
}

/// Who opened a host connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostOrigin {
    /// A host program connected to the partition's `uds` and wrote `CONNECT <port>`.
    Connect,
    /// The guest connected to CID 2; the switch connected to `<uds>_<port>`.
    Guest,
}

/// The host side of a connection: the switch is the vsock endpoint for the host socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLink {
    /// The host socket's id in the bridge: unique in the monitor process, so that a restore
    /// in the same process finds the socket again (ids from another process match nothing).
    pub token: u64,
    pub origin: HostOrigin,
    /// Our receive buffer, advertised to the guest.
    pub buf_alloc: u32,
    /// Bytes from the guest written to the host socket (our `fwd_cnt`).
    pub fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    pub last_fwd_cnt_sent: u32,
    /// Bytes received from the guest.
    pub rx_cnt: u32,
    /// The guest's advertised receive buffer and forward count.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
    /// Bytes from the guest not yet accepted by the host socket (≤ `buf_alloc`).
    #[serde(with = "hex_bytes")]
    pub to_host: VecDeque<u8>,
    /// Bytes the host wrote along with its `CONNECT` line, sent once connected.
    #[serde(with = "hex_bytes")]
    pub early_data: Vec<u8>,
    /// The host stopped sending (read EOF); SHUTDOWN(SEND) went to the guest.
    pub host_eof: bool,
    /// The host socket is gone; the guest was told SHUTDOWN(both) and we wait for its RST.
    pub host_gone: bool,
    /// The guest said it will send no more / receive no more.
    pub guest_shut_send: bool,
    pub guest_shut_recv: bool,
    /// Our write side of the host socket is shut (after the guest's SHUTDOWN(SEND)).
    pub host_write_shut: bool,
    /// We asked the guest for credit and it has not given more since.
    pub credit_requested: bool,
}

impl HostLink {
    /// A fresh link with our buffer of `buf_alloc` bytes.
    pub fn new(token: u64, origin: HostOrigin, buf_alloc: u32) -> Self {
        HostLink {
            token,
            origin,
            buf_alloc,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            to_host: VecDeque::new(),
            early_data: Vec::new(),
            host_eof: false,
            host_gone: false,
            guest_shut_send: false,
            guest_shut_recv: false,
            host_write_shut: false,
            credit_requested: false,
        }
    }

    /// How many bytes the guest can take now (its credit to us).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// One connection of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub client: Endpoint,
    pub server: Endpoint,
    pub state: ConnState,
    /// Payload bytes forwarded client → server and server → client.
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    /// Present when one side is the host (CID 2).
    pub host: Option<HostLink>,
}

impl Connection {
    /// A connection in state `Connecting`.
    pub fn new(client: Endpoint, server: Endpoint, host: Option<HostLink>) -> Self {
        Connection {
            client,
            server,
            state: ConnState::Connecting,
            bytes_to_server: 0,
            bytes_to_client: 0,
            host,
        }
    }

    /// The partition side of a host connection (the side that is not CID 2).
    pub fn guest_side(&self) -> Endpoint {
        if self.client.cid == HOST_CID {
            self.server
        } else {
            self.client
        }
    }

    /// The host side of a host connection.
    pub fn host_side(&self) -> Endpoint {
        if self.client.cid == HOST_CID {
            self.client
        } else {
            self.server
        }
    }

    /// Whether `cid` is one of the two sides.
    pub fn involves(&self, cid: u64) -> bool {
        self.client.cid == cid || self.server.cid == cid
    }
}

/// Packets waiting for room in one partition's RX queue, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    pub packets: VecDeque<Pending>,
    /// Sum of the packets' [`Pending::cost`].
    pub bytes: usize,
}

impl Backlog {
    /// Appends a packet.
    pub fn push(&mut self, p: Pending) {
        self.bytes += p.cost();
        self.packets.push_back(p);
    }

    /// Records that `n` payload bytes of the front packet were delivered; drops the packet
    /// once all of it was.
    pub fn advance_front(&mut self, n: usize) {
        let Some(front) = self.packets.front_mut() else {
            return;
        };
        let before = front.cost();
        front.sent = (front.sent + n).min(front.data.len());
        let done = front.remaining() == 0;
        let after = if done { 0 } else { front.cost() };
        self.bytes = self.bytes.saturating_sub(before - after);
        if done {
            self.packets.pop_front();
        }
    }

    /// Removes the packets `drop` selects.
    pub fn purge(&mut self, mut drop: impl FnMut(&Pending) -> bool) {
        self.packets.retain(|p| !drop(p));
        self.bytes = self.packets.iter().map(Pending::cost).sum();
    }

    /// Empties the backlog.
    pub fn clear(&mut self) {
        self.packets.clear();
        self.bytes = 0;
    }
}

/// Counters shown in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockCounters {
    /// Well-formed packets taken from TX queues.
    pub tx_packets: u64,
    /// Packets (or fragments) written into RX queues.
    pub rx_packets: u64,
    /// TX chains that were not a valid packet (dropped, buffer returned).
    pub malformed_tx: u64,
    /// RX chains that could not hold a packet (returned empty).
    pub malformed_rx: u64,
    /// Packets whose src_cid was not the sender's CID (dropped).
    pub spoofed: u64,
    /// Packets to a CID nobody has (REQUEST answered with RST, others dropped).
    pub unknown_cid: u64,
    /// Packets of another socket type or an unknown operation (dropped).
    pub unsupported: u64,
    /// Connections reset because their destination's backlog exceeded the cap.
    pub backlog_overflows: u64,
    /// Switch-made packets (RST, credit update) dropped: the destination's backlog was full.
    pub backlog_drops: u64,
    /// RST packets the switch generated.
    pub rst_sent: u64,
    /// Host connections established (either direction).
    pub host_connections: u64,
    /// Host connections that failed: bad CONNECT line, refused, timeout, connect error.
    pub host_errors: u64,
    /// Host connections reset because the guest sent beyond the credit we gave it.
    pub credit_violations: u64,
    /// Times an update of the switch panicked: the half-updated connection table was not
    /// reused; every connection was reset instead (see `docs/vsock.md`).
    #[serde(default)]
    pub panics_recovered: u64,
}

/// The switch's serializable state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchState {
    #[serde(with = "conn_table")]
    pub conns: BTreeMap<ConnKey, Connection>,
    /// Backlog per attached destination CID.
    pub backlogs: BTreeMap<u64, Backlog>,
    pub counters: VsockCounters,
    /// The next host port handed out for a `CONNECT`.
    pub next_host_port: u32,
}

impl SwitchState {
    /// The key of the connection between `a` and `b`, whichever side opened it.
    pub fn find(&self, a: Endpoint, b: Endpoint) -> Option<ConnKey> {
        [(a, b), (b, a)]
            .into_iter()
            .find(|k| self.conns.contains_key(k))
    }

    /// How many connections `cid` takes part in.
    pub fn conns_of(&self, cid: u64) -> usize {
        self.conns.values().filter(|c| c.involves(cid)).count()
    }
}

/// The connection table is serialized as a list (its keys are in the values).
mod conn_table {
    use super::{ConnKey, Connection};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<ConnKey, Connection>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ConnKey, Connection>, D::Error> {
        let list = Vec::<Connection>::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|c| ((c.client, c.server), c))
            .collect())
    }
}

/// Byte buffers of the state as hex strings (a JSON array of numbers is two to four times
/// bigger). Reading refuses anything but an even number of hex digits.
pub(crate) mod hex_bytes {
    use std::collections::VecDeque;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    /// A byte buffer that can be written and read as hex.
    pub trait Buf: Sized {
        fn each(&self) -> impl Iterator<Item = u8> + '_;
        fn len(&self) -> usize;
        fn from_vec(v: Vec<u8>) -> Self;
    }

    impl Buf for Vec<u8> {
        fn each(&self) -> impl Iterator<Item = u8> + '_ {
            self.iter().copied()
        }
        fn len(&self) -> usize {
            Vec::len(self)
        }
        fn from_vec(v: Vec<u8>) -> Self {
            v
        }
    }

    impl Buf for VecDeque<u8> {
        fn each(&self) -> impl Iterator<Item = u8> + '_ {
            self.iter().copied()
        }
        fn len(&self) -> usize {
            VecDeque::len(self)
        }
        fn from_vec(v: Vec<u8>) -> Self {
            v.into()
        }
    }

    const DIGITS: &[u8; 16] = b"0123456789abcdef";

    pub fn serialize<B: Buf, S: Serializer>(b: &B, s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b.each() {
            out.push(char::from(DIGITS[usize::from(x >> 4)]));
            out.push(char::from(DIGITS[usize::from(x & 0xf)]));
        }
        s.serialize_str(&out)
    }

    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }

    pub fn deserialize<'de, B: Buf, D: Deserializer<'de>>(d: D) -> Result<B, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("hex bytes: odd number of digits"));
        }
        s.as_bytes()
            .chunks_exact(2)
            .map(|pair| match pair {
                [h, l] => nibble(*h).zip(nibble(*l)).map(|(h, l)| (h << 4) | l),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .map(B::from_vec)
            .ok_or_else(|| D::Error::custom("hex bytes: not a hex digit"))
    }
}

/// One attached partition in [`VsockStats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStats {
    pub cid: u64,
    pub name: String,
    /// The guest's driver has started the device.
    pub active: bool,
    pub uds: Option<std::path::PathBuf>,
    /// Bytes (headers + payload) waiting for the partition's RX queue.
    pub backlog_bytes: usize,
    pub backlog_packets: usize,
}

/// One connection in [`VsockStats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnStats {
    pub client: Endpoint,
    pub server: Endpoint,
    pub state: ConnState,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    /// For host connections: bytes from the guest held by the monitor for the host socket.
    pub host_buffered: Option<usize>,
}

/// What `status` shows about vsock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockStats {
    pub partitions: Vec<PortStats>,
    pub connections: usize,
    pub connection_list: Vec<ConnStats>,
    /// Sum of the partitions' backlogs.
    pub backlog_bytes: usize,
    /// Sum of the host connections' buffered bytes.
    pub host_buffered_bytes: usize,
    pub counters: VsockCounters,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::packet::Hdr;

    fn ep(cid: u64, port: u32) -> Endpoint {
        Endpoint { cid, port }
    }

    #[test]
    fn backlog_accounts_partial_delivery() {
        let mut b = Backlog::default();
        b.push(Pending::new(Hdr::default(), vec![0; 100]));
        b.push(Pending::new(Hdr::default(), vec![]));
        assert_eq!(b.bytes, 144 + 44);
        b.advance_front(60);
        assert_eq!(b.bytes, 84 + 44);
        assert_eq!(b.packets.len(), 2);
        b.advance_front(40);
        assert_eq!(b.bytes, 44);
        assert_eq!(b.packets.len(), 1);
        b.advance_front(0);
        assert_eq!(b.bytes, 0);
        assert!(b.packets.is_empty());
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = SwitchState::default();
        let mut link = HostLink::new(7, HostOrigin::Connect, 4096);
        link.to_host.extend(b"abc");
        let c = Connection::new(ep(2, 1 << 30), ep(3, 80), Some(link));
        s.conns.insert((c.client, c.server), c);
        s.backlogs.entry(3).or_default().push(Pending::new(
            Hdr::new(ep(4, 1), ep(3, 2), 5),
            b"xyz".to_vec(),
        ));
        s.counters.rst_sent = 2;
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""to_host":"616263""#), "{json}");
        assert!(json.contains(r#""data":"78797a""#), "{json}");
        let back: SwitchState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            back.find(ep(3, 80), ep(2, 1 << 30)),
            Some((ep(2, 1 << 30), ep(3, 80)))
        );
        assert_eq!(back.conns_of(3), 1);
        assert_eq!(back.conns_of(4), 0);
        for bad in ["61626", "6x", "[1,2]"] {
            let broken = json.replace("616263", bad);
            assert!(
                serde_json::from_str::<SwitchState>(&broken).is_err(),
                "{bad}"
            );
        }
        let upper = json.replace("78797a", "78797A");
        let back: SwitchState = serde_json::from_str(&upper).unwrap();
        assert_eq!(back, s);
    }
}
