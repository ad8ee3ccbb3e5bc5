//! What the relay logic asks its firmware to do.

use alloc::string::String;
use alloc::vec::Vec;

use duplex_link::HostRequest;
use duplex_tunnel::Endpoint;

/// A connection the logic asked for (a TCP connection with a TLS session on it). Ids are
/// never reused.
pub type ConnId = u64;

/// Whose key a connection's TLS session pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The mediation server (`mediator_pin=`).
    Mediator,
    /// A cloud server (`cloud_pin=`).
    Cloud,
}

/// One thing for the firmware to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to `endpoint` and a TLS session on it that pins `peer`'s key.
    /// Report [`crate::Relay::on_connected`] once the handshake is done, or
    /// [`crate::Relay::on_closed`] if it fails.
    Dial {
        conn: ConnId,
        endpoint: Endpoint,
        peer: Peer,
    },
    /// Send these bytes (whole frames) on the connection, in order.
    Send { conn: ConnId, bytes: Vec<u8> },
    /// Close the connection once what was sent on it has gone out. The logic has forgotten
    /// it: later events of this connection are ignored.
    Close { conn: ConnId },
    /// Connect to the controller's job port over vsock; report
    /// [`crate::Relay::on_controller_connected`] or [`crate::Relay::on_controller_closed`].
    ControllerConnect,
    /// Send one request to the controller (one reply comes back per request, in order).
    ControllerSend(HostRequest),
    /// Drop the controller connection (the logic has forgotten it).
    ControllerClose,
    /// A console line (the firmware prints `relay: <line>`).
    Log(String),
    /// The mediator granted the sleep lease and the session is closed: put the partition
    /// to sleep. The firmware lets the session's `Close` go out, drops its whole network
    /// state (sockets, interface, ARP cache), sleeps until woken, rebuilds the network
    /// from scratch and then calls [`crate::Relay::on_woken`]. Until then the logic does
    /// nothing ([`crate::Relay::is_sleeping`], no deadline).
    Sleep,
    /// As a substitute: send the Wake-on-LAN magic packet for `mac`
    /// (`duplex_tunnel::magic_packet`) as a UDP broadcast on the LAN (port
    /// `duplex_tunnel::WAKE_UDP_PORT`), then report with
    /// [`crate::Relay::on_magic_sent`] and this `wake_id`.
    SendMagic { wake_id: u64, mac: [u8; 6] },
}
