//! virtio-vsock for partitions: one [`VsockSwitch`] per monitor connects the vsock devices of
//! all partitions by CID, and bridges host programs in through Unix sockets (Firecracker's
//! `CONNECT <port>` convention). The protocol is specified in `docs/vsock.md`.
//!
//! - Each partition gets a [`VsockMmio`]: the virtio-mmio window of its vsock device
//!   (device ID 19, config space = `guest_cid` u64 LE, queues rx = 0, tx = 1, event = 2).
//! - Guest TX is processed on the vCPU thread that wrote `QueueNotify`, within a work
//!   budget per pass; what is left is taken by the device event loop.
//! - All switch state sits behind one mutex; its plain-data part ([`SwitchState`]) is
//!   serializable for snapshots.
//!
//! The parts, each in its own file, in dependency order (a module uses only modules above
//! it; `mod.rs` only declares and re-exports):
//!
//! 1. `hex` (byte buffers as hex in saved states), `packet` (headers, packets), `tokens`
//!    (socket ids), `limits` (constants, limits, [`VsockError`], [`UdsConfig`]);
//! 2. `state`: the serializable state, `status` and counters;
//! 3. `table`: the connection table, a pure state machine (headers in, verdicts out);
//! 4. `backlog`: one destination's backlog, per flow and per source, round-robin;
//! 5. `router`: the partitions' queues in guest memory and their backlogs (TX passes
//!    within a budget, RX delivery);
//! 6. `uds`: Unix socket helpers (private bind, trust checks, `CONNECT` line);
//! 7. `listeners`, then `bridge`: the host bridge's listeners and sockets, which it owns;
//! 8. `hostlink` then `hostevents`: the switch as the host's vsock endpoint (credit, the
//!    `CONNECT` protocol, deadlines), over table, router and bridge;
//! 9. `validate`: checks of a saved state;
//! 10. `switch`: [`Inner`](switch::Inner), the switch proper, owning table, router and
//!     bridge;
//! 11. `shared` (the lock, panic recovery), `subscriber` (the bridge on the event loop),
//!     `device` ([`VsockMmio`]), `api` ([`VsockSwitch`]), `persist` (snapshots).

mod api;
mod backlog;
mod bridge;
mod device;
mod hex;
mod hostevents;
mod hostlink;
mod limits;
mod listeners;
pub mod packet;
mod persist;
mod router;
mod shared;
pub mod state;
mod subscriber;
mod switch;
mod table;
mod tokens;
mod uds;
mod validate;

#[cfg(test)]
mod tests;

pub use api::{SwitchFreeze, VsockSwitch};
pub use device::{VsockDevice, VsockMmio, VsockMmioState};
pub use limits::{
    UdsConfig, VsockError, ACCEPT_BACKOFF, BACKLOG_CAP, CONNECT_TIMEOUT, CONN_BACKLOG_CAP,
    CONTROL_SLACK, DEFAULT_UDS_MODE, DEVICE_ID, EVENT_QUEUE, F_STREAM, HOST_BACKLOG_LIMIT,
    HOST_BUF_ALLOC, HOST_CHUNK, LINGER_TIMEOUT, MAX_CONNECTING_PER_CID, MAX_CONNECT_LINE,
    MAX_CONNS_PER_CID, MAX_CONNS_PER_PAIR, MAX_HOST_SOCKS, MAX_HOST_SOCKS_PER_CID, MIN_GUEST_CID,
    QUEUE_SIZE, RX_QUEUE, SOURCE_BACKLOG_CAP, TX_BUDGET_BYTES, TX_BUDGET_CHAINS, TX_QUEUE,
};
pub use packet::{Endpoint, Hdr, HOST_CID};
pub use persist::VsockMmioArgs;
pub use state::{ConnState, ConnStats, PortStats, SwitchState, VsockCounters, VsockStats};
pub use uds::parse_connect;
