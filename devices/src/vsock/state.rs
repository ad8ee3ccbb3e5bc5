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
    #[serde(with = "super::hex")]
    pub to_host: VecDeque<u8>,
    /// Bytes the host wrote along with its `CONNECT` line, sent once connected.
    #[serde(with = "super::hex")]
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
    /// Appends a packet (building a state by hand: tests, tools).
    pub fn push(&mut self, p: Pending) {
        self.bytes += p.cost();
        self.packets.push_back(p);
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
    /// Packets of connections that are not in the table (anything but REQUEST): not
    /// forwarded, answered with an RST (an RST is dropped unanswered).
    #[serde(default)]
    pub rst_unknown: u64,
    /// REQUESTs refused because a connection cap was reached (answered with an RST).
    #[serde(default)]
    pub conn_limit: u64,
    /// TX passes that ran out of their work budget with chains left (the device event
    /// loop takes the rest).
    #[serde(default)]
    pub tx_deferred: u64,
    /// Times a `uds` listener was left alone for a while because `accept` had no file
    /// descriptor (`EMFILE`, `ENFILE`).
    #[serde(default)]
    pub accept_backoffs: u64,
    /// Host connections refused with `ERR busy` (or an RST for the guest's): too many host
    /// sockets.
    #[serde(default)]
    pub host_busy: u64,
    /// Guest connections to `<uds>_<port>` refused because the socket there is not to be
    /// trusted (another user's, or in a directory others may write to).
    #[serde(default)]
    pub untrusted_sockets: u64,
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
        // Sets written before issue 11 have no new counters: they read as 0.
        let mut old = json.clone();
        for field in [
            "rst_unknown",
            "conn_limit",
            "tx_deferred",
            "accept_backoffs",
            "host_busy",
            "untrusted_sockets",
        ] {
            let before = old.len();
            old = old.replace(&format!(r#","{field}":0"#), "");
            assert!(old.len() < before, "{field} is written");
        }
        assert_eq!(serde_json::from_str::<SwitchState>(&old).unwrap(), s);
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
