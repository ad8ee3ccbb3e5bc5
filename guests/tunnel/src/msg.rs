//! The messages of the tunnel protocol, with its limits and error codes. Field-by-field
//! documentation, with the order of a session, is in `docs/tunnel-protocol.md`.
//!
//! postcard writes an enum as its variant index then its fields in order: **never reorder
//! variants or fields**; add new ones at the end. Names are `snake_case` for JSON.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::auth::Ticket;

/// The protocol version a relay announces in `Hello` and `Dial`.
pub const PROTOCOL_VERSION: u16 = 1;
/// The mediation server's default port for relays' control sessions (TLS).
pub const DEFAULT_CONTROL_PORT: u16 = 7443;
/// A cloud server's default port for relays' dial-backs (TLS).
pub const DEFAULT_TUNNEL_PORT: u16 = 9443;
/// Largest frame body on a control session (16 KiB).
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Largest frame body on a tunnel (128 KiB).
pub const MAX_TUNNEL_FRAME: usize = 128 * 1024;
/// Largest `JobData.bytes` (64 KiB).
pub const MAX_DOCUMENT_CHUNK: usize = 64 * 1024;
/// Largest document a job may carry (256 MiB).
pub const MAX_DOCUMENT_LEN: u64 = 256 << 20;
/// Longest relay, device, job or user identifier, in bytes (1 or more, printable ASCII
/// without spaces: see [`valid_id`]).
pub const MAX_ID_LEN: usize = 64;
/// Most devices one relay serves.
pub const MAX_DEVICES_PER_RELAY: usize = 64;
/// Longest error message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 256;
/// Length of a login challenge.
pub const CHALLENGE_LEN: usize = 32;
/// Length of a ticket nonce.
pub const TICKET_NONCE_LEN: usize = 16;
/// Length of a relay's secret, of a ticket key and of an HMAC-SHA256 tag.
pub const KEY_LEN: usize = 32;

/// Error codes carried by `Refused`, `Error`, `TunnelFailed` and `DialRefused`.
pub mod error_code {
    /// A frame was not a valid message of the expected type, or came out of order.
    pub const MALFORMED: u16 = 400;
    /// Unknown relay or wrong login proof (the two are not told apart).
    pub const BAD_CREDENTIALS: u16 = 401;
    /// The relay announced a device the server does not list for it, or a job names a
    /// device the tunnel is not for.
    pub const DEVICE_NOT_SERVED: u16 = 403;
    /// No such tunnel (or not this relay's).
    pub const UNKNOWN_TUNNEL: u16 = 404;
    /// Nothing heard within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 408;
    /// A newer login of the same relay took the session over.
    pub const EVICTED: u16 = 409;
    /// The ticket expired.
    pub const TICKET_EXPIRED: u16 = 410;
    /// The ticket was used before, or is not one this server issued or asked for.
    pub const TICKET_REJECTED: u16 = 412;
    /// A frame's length prefix was over the limit of its connection.
    pub const FRAME_TOO_LARGE: u16 = 413;
    /// A job's parameters are invalid (the controller's 422).
    pub const INVALID_JOB: u16 = 422;
    /// The server speaks another protocol version.
    pub const UNSUPPORTED_VERSION: u16 = 426;
    /// Too many sessions, tunnels or jobs at once.
    pub const TOO_MANY: u16 = 429;
    /// The device (the controller partition) cannot take jobs now.
    pub const DEVICE_UNAVAILABLE: u16 = 503;
    /// The relay could not reach the cloud server named in a tunnel request.
    pub const DIAL_FAILED: u16 = 504;
    /// A sleep request was refused: the relay has tunnels requested, open or waiting for
    /// it (it stays awake and may ask again later).
    pub const SLEEP_DEFERRED: u16 = 423;
    /// A wake request names a relay or MAC the substitute cannot wake (not on its LAN
    /// segment, or its network is down).
    pub const WAKE_FAILED: u16 = 502;
}

/// Longest LAN segment name, in bytes (a [`valid_id`]).
pub const MAX_SEGMENT_LEN: usize = MAX_ID_LEN;
/// The UDP port a substitute sends a Wake-on-LAN magic packet to (the "discard" port,
/// as most wake-on-LAN tools do), broadcast on its LAN.
pub const WAKE_UDP_PORT: u16 = 9;

/// The Wake-on-LAN magic packet for `mac`: six `0xFF` bytes, then `mac` sixteen times
/// (102 bytes). A substitute sends it as a UDP payload to [`WAKE_UDP_PORT`].
pub fn magic_packet(mac: [u8; 6]) -> [u8; 102] {
    let mut p = [0xFF; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac);
    }
    p
}

/// Whether `id` is a valid relay, device, job or user identifier: 1 to [`MAX_ID_LEN`]
/// bytes of ASCII letters, digits, `-`, `_`, `.`, `:` or `@`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'))
}

/// An IPv4 address and TCP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: [u8; 4],
    pub port: u16,
}

/// Relay → mediation server, on the control session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayToMediator {
    /// Variant 0: First frame: who the relay is.
    Hello { version: u16, relay_id: String },
    /// Variant 1: Answer to `Challenge`: the proof ([`crate::login_proof`]) and the devices the
    /// relay serves (each must be listed for it at the server).
    Login {
        proof: [u8; KEY_LEN],
        devices: Vec<String>,
    },
    /// Variant 2: Heartbeat; answered with `Pong { seq }`.
    Ping { seq: u64 },
    /// Variant 3: The relay dialled the cloud server for this tunnel and it said `DialOk`.
    TunnelAccepted { tunnel_id: u64 },
    /// Variant 4: The relay could not open this tunnel.
    TunnelFailed {
        tunnel_id: u64,
        code: u16,
        message: String,
    },
    /// Variant 5: The tunnel is closed; `jobs` are the cloud job ids it carried.
    TunnelClosed { tunnel_id: u64, jobs: Vec<String> },
    /// Variant 6: Orderly end of the session (the server closes it).
    Bye,
    /// Variant 7: The LAN this relay is on: its segment name (a [`valid_id`], the same for
    /// relays that can reach each other's MAC with a broadcast) and its card's MAC. Sent
    /// once after each `Welcome`; only a relay that sent it can be a **substitute**.
    Lan { segment: String, mac: [u8; 6] },
    /// Variant 8: The relay wants to sleep (power saving): a **lease** with the devices it
    /// serves, its MAC and its LAN segment, so that the server can have it woken. Answered
    /// `SleepGranted` (the relay then closes the session and sleeps) or `SleepRefused`.
    Sleep {
        devices: Vec<String>,
        mac: [u8; 6],
        segment: String,
    },
    /// Variant 9: Answer to `WakeRelay`: the substitute sent the magic packet on its LAN
    /// (`sent`), or could not (`code` [`error_code::WAKE_FAILED`] with why in `message`).
    WakeSent {
        wake_id: u64,
        sent: bool,
        code: u16,
        message: String,
    },
}

/// Mediation server → relay, on the control session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediatorToRelay {
    /// Variant 0: Answer to `Hello`: a fresh random challenge.
    Challenge { nonce: [u8; CHALLENGE_LEN] },
    /// Variant 1: Login accepted; the heartbeat both ends keep from now on
    /// (`heartbeat_timeout_ms` > `heartbeat_ms`).
    Welcome {
        session_id: u64,
        heartbeat_ms: u32,
        heartbeat_timeout_ms: u32,
    },
    /// Variant 2: Login refused; the server closes the connection.
    Refused { code: u16, message: String },
    /// Variant 3: Answer to `Ping`.
    Pong { seq: u64 },
    /// Variant 4: A cloud server asks for a tunnel to `device_id`: dial `cloud` and present
    /// `ticket`.
    TunnelRequest {
        tunnel_id: u64,
        device_id: String,
        cloud: Endpoint,
        ticket: Ticket,
    },
    /// Variant 5: A newer session of this relay took over; the server closes this one.
    Evicted { message: String },
    /// Variant 6: The relay broke the protocol (code, why); the server closes the connection.
    Error { code: u16, message: String },
    /// Variant 7: Answer to `Sleep`: the lease is recorded; the relay closes the session
    /// and sleeps. Requests for its devices now go through a substitute.
    SleepGranted,
    /// Variant 8: Answer to `Sleep`: the relay must stay awake (`code`
    /// [`error_code::SLEEP_DEFERRED`]: tunnels are waiting for it; 400: a bad lease).
    SleepRefused { code: u16, message: String },
    /// Variant 9: The server asks this relay, as a **substitute**, to wake relay `relay_id`
    /// (asleep on the same LAN segment) for a tunnel request to `device_id`: send the
    /// magic packet for `mac` on the LAN and answer `WakeSent`. The request itself waits
    /// at the server and is offered to the woken relay when it logs in.
    WakeRelay {
        wake_id: u64,
        relay_id: String,
        mac: [u8; 6],
        device_id: String,
        tunnel_id: u64,
    },
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    Done,
    Failed,
}

/// Relay → cloud server, on a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayToCloud {
    /// Variant 0: First frame: the ticket from the tunnel request.
    Dial { version: u16, ticket: Ticket },
    /// Variant 1: The device took the job: `device_job` is the controller's job id; `duplicate`
    /// when the device had this job id already (it is not printed again).
    JobAccepted {
        job_id: String,
        device_job: u64,
        duplicate: bool,
    },
    /// Variant 2: The job finished (or could not be taken: `Failed` with `error`).
    JobResult {
        job_id: String,
        outcome: JobOutcome,
        checksums: Vec<u32>,
        document_crc32: u32,
        error: Option<String>,
    },
    /// Variant 3: Answer to `Close`: the relay closes the tunnel after this frame.
    Closed { jobs: u32 },
    /// Variant 4: The cloud server broke the protocol; the relay closes the tunnel.
    Error { code: u16, message: String },
    /// Variant 5: One message of the share sub-protocol from the device's controller
    /// (`duplex_docs::DeviceToCloud`, postcard), on a tunnel the cloud opened with
    /// `SyncOpen` (`docs/shared-data.md`, "Transport").
    Share {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// Cloud server → relay, on a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudToRelay {
    /// Variant 0: The ticket is good; jobs may follow.
    DialOk { tunnel_id: u64 },
    /// Variant 1: The ticket is refused; the server closes the connection.
    DialRefused { code: u16, message: String },
    /// Variant 2: A print job, identified by `job_id` (the idempotency key), followed by
    /// `document_len` bytes of document in `JobData` frames.
    Job {
        job_id: String,
        device_id: String,
        user: String,
        pages: u32,
        seed: u64,
        width: u16,
        height: u16,
        document_len: u64,
    },
    /// Variant 3: The next bytes of a job's document (at most [`MAX_DOCUMENT_CHUNK`]).
    JobData {
        job_id: String,
        /// Serialized as bytes (`serde_bytes`): the same postcard wire format as a
        /// `Vec<u8>` (varint length, raw bytes), decoded as one copy instead of byte by byte.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Variant 4: No more work: the relay answers `Closed` and closes the tunnel.
    Close,
    /// Variant 5: This tunnel carries `device_id`'s shared documents: the relay connects it
    /// to the controller's share service, which sends its requests as `Share` frames.
    SyncOpen { device_id: String },
    /// Variant 6: One answer of the share sub-protocol (`duplex_docs::CloudToDevice`,
    /// postcard), in the order of the device's requests.
    Share {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}
