//! The device's constants, the switch's limits (every bound `docs/vsock.md` states is one
//! of these) and [`VsockError`]. Depends on nothing else of the switch.

use std::path::PathBuf;
use std::time::Duration;

use crate::virtio::mmio::MmioError;

/// The virtio device ID of vsock.
pub const DEVICE_ID: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// `VIRTIO_VSOCK_F_STREAM`: stream sockets (the only type offered).
pub const F_STREAM: u64 = 1;
/// The smallest CID a partition may have (0–2 are reserved; 2 is the host).
pub const MIN_GUEST_CID: u64 = 3;
/// Hard cap of the bytes (headers + payload) waiting for one partition's RX queue, over
/// all connections to it.
pub const BACKLOG_CAP: usize = 16 << 20;
/// Hard cap of the bytes one connection may have waiting in its receiver's backlog. A
/// sender that honours the receiver's credit stays below its `buf_alloc`; guests here
/// advertise 128–256 KiB.
pub const CONN_BACKLOG_CAP: usize = 1 << 20;
/// Hard cap of the bytes one sending partition may have waiting in another's backlog,
/// over all its connections: one flooding partition cannot fill a receiver's backlog and so
/// make a third partition's connections overflow.
pub const SOURCE_BACKLOG_CAP: usize = 4 << 20;
/// How far packets the switch makes itself may exceed a backlog's cap.
pub const CONTROL_SLACK: usize = 64 * 1024;
/// The receive buffer the switch advertises, per host connection.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;
/// Host data is read only while the guest's backlog is below this.
pub const HOST_BACKLOG_LIMIT: usize = 64 * 1024;
/// Most bytes read from a host socket into one RW packet.
pub const HOST_CHUNK: usize = 16 * 1024;
/// How long a host program has to send its `CONNECT` line, and the guest to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the switch waits for the guest's RST after the host socket went away.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections one partition may take part in.
pub const MAX_CONNS_PER_CID: usize = 1024;
/// Most connections between two given partitions: one peer cannot take all of another's.
pub const MAX_CONNS_PER_PAIR: usize = MAX_CONNS_PER_CID / 2;
/// Most partition-to-partition connections one partition may have waiting for their
/// RESPONSE (a REQUEST flood is refused beyond it).
pub const MAX_CONNECTING_PER_CID: usize = 64;
/// The work budget of one pass over a TX queue (one `QueueNotify`, or one turn of the
/// device event loop for what a notify left): at most this many descriptor chains...
pub const TX_BUDGET_CHAINS: usize = 64;
/// ...and at most this many payload bytes (the chain that crosses it is the last).
pub const TX_BUDGET_BYTES: usize = 256 * 1024;
/// Most host sockets (accepted on its `uds`, or opened for its guest) one partition may
/// have; more get `ERR busy` (or an RST) and are closed.
pub const MAX_HOST_SOCKS_PER_CID: usize = 256;
/// Most host sockets of the whole switch.
pub const MAX_HOST_SOCKS: usize = 1024;
/// How long a listener is left alone after `accept` failed for lack of file descriptors.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest `CONNECT` line, newline included.
pub const MAX_CONNECT_LINE: usize = 64;
/// The mode of a `uds` listening socket when the config gives none.
pub const DEFAULT_UDS_MODE: u32 = 0o600;

/// Why a vsock operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or too large.
    #[error("vsock: CID {0} is not usable by a partition (3 ..= 4294967294)")]
    ReservedCid(u64),
    /// Another partition has the CID.
    #[error("vsock: CID {0} is already attached")]
    DuplicateCid(u64),
    /// The host socket could not be set up.
    #[error("vsock: uds {path}: {source}")]
    Uds {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The `uds` path exists and is not a socket (it is not removed).
    #[error("vsock: uds {0} exists and is not a socket")]
    UdsNotSocket(PathBuf),
    /// The `uds` path is a socket that another process listens on (it is not removed).
    #[error("vsock: uds {0} is in use by another process")]
    UdsInUse(PathBuf),
    /// The `uds` mode is not a permission mode (`0 ..= 0o777`).
    #[error("vsock: uds mode {0:#o} is not a permission mode (0 ..= 0o777)")]
    UdsMode(u32),
    /// The host bridge (its eventfd, timer) could not be set up.
    #[error("vsock: host bridge: {0}")]
    Bridge(std::io::Error),
    /// The device event loop could not be started or did not take the bridge.
    #[error("vsock: {0}")]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    /// The transport could not be created or restored.
    #[error("vsock: {0}")]
    Mmio(#[from] MmioError),
    /// A saved state (switch or device) is not valid; nothing was changed.
    #[error("vsock: invalid saved state: {0}")]
    InvalidState(String),
    /// The switch state can only be restored while no partition is attached.
    #[error("vsock: CID {0} is attached; detach every partition before restoring the switch")]
    Attached(u64),
}

/// Where host programs reach a partition: its `uds` path (none: no host bridge for it) and
/// the mode of the listening socket (none: [`DEFAULT_UDS_MODE`]). `Option<PathBuf>` and
/// `PathBuf` convert into it with the default mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdsConfig {
    pub path: Option<PathBuf>,
    pub mode: Option<u32>,
}

impl UdsConfig {
    /// The listening socket's mode.
    pub fn mode(&self) -> u32 {
        self.mode.unwrap_or(DEFAULT_UDS_MODE)
    }
}

impl From<Option<PathBuf>> for UdsConfig {
    fn from(path: Option<PathBuf>) -> Self {
        UdsConfig { path, mode: None }
    }
}

impl From<PathBuf> for UdsConfig {
    fn from(path: PathBuf) -> Self {
        UdsConfig {
            path: Some(path),
            mode: None,
        }
    }
}
