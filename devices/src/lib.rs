//! Duplex devices: what a partition's guest reaches through MMIO and port I/O.
//!
//! - [`console`]: a 16550 UART (vm-superio) whose output goes to a sink (the monitor's
//!   stdout with a `[name]` prefix, or a file) and to a ring of recent lines that the
//!   control socket and crash reports read.
//! - [`sysctl`]: the system control page of the guest ABI (`docs/guest-abi.md`): power off,
//!   reboot, wait, fault and panic reports, TSC frequency.
//! - [`persist`]: snapshot save and restore of devices ([`persist::Persist`]).
//! - [`virtio`]: the virtio-mmio transport (version 2) and the device interface behind it.
//! - [`vsock`]: virtio-vsock devices for partitions and the switch that connects them to each
//!   other by CID and to host programs through Unix sockets (`docs/vsock.md`).

pub mod console;
pub mod persist;
pub mod sysctl;
pub mod virtio;
pub mod vsock;
