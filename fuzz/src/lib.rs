//! Duplex fuzz targets' shared code: each module checks one kind of untrusted input against
//! the invariants the monitor relies on, so that a target in `fuzz_targets/` is one call.
//!
//! - [`control`]: control-socket request lines.
//! - [`snapshot`]: snapshot manifests and whole set directories.
//! - [`state`]: a set's state files, parsed and restored into devices.
//! - [`virtio`]: a hostile virtio-mmio driver, run against [`vsock`] (two partitions on one
//!   switch), [`net`] (a card over an in-memory link) and [`blk`] (a disk in memory).
//! - [`connect`]: the host bridge's `CONNECT <port>` line.
//! - [`input`]: a cursor that turns fuzz bytes into values (never panics, runs dry as zeros).

pub mod blk;
pub mod connect;
pub mod control;
pub mod input;
pub mod net;
pub mod snapshot;
pub mod state;
pub mod virtio;
pub mod vsock;
