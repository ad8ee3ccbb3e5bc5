//! Duplex devices: what a partition's guest reaches through MMIO and port I/O.
//!
//! - [`console`]: a 16550 UART (vm-superio) whose output goes to a sink (the monitor's
//!   stdout with a `[name]` prefix, or a file) and to a ring of recent lines that the
//!   control socket and crash reports read.
//! - [`sysctl`]: the system control page of the guest ABI (`docs/guest-abi.md`): power off,
//!   reboot, wait, fault and panic reports, TSC frequency.

pub mod console;
pub mod sysctl;
