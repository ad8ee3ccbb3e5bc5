//! The Duplex monitor: runs the systems of one device as partitions of one machine,
//! each a KVM guest, driven over a JSON control socket.
//!
//! - [`config`]: the device config file (one documented struct).
//! - [`layout`]: the guest-physical memory map.
//! - [`boot`]: PVH and bzImage loading.
//! - [`partition`]: one guest system: VM, memory, vCPU threads, devices.
//! - [`monitor`]: all partitions of the device, and the control commands.
//! - [`api`]: the control socket protocol, server and client.
//! - [`rundir`]: the private runtime directory of the monitor's sockets.
//! - [`job`]: `duplex job`, a host client of the controller's job port.
//! - [`sandbox`]: the seccomp filters, one per kind of monitor thread.
//! - [`boxcli`]: `duplex box`, the host client of the controller's document service.

pub mod api;
pub mod boot;
pub mod boxcli;
pub mod config;
pub mod job;
pub mod layout;
pub mod monitor;
pub mod partition;
pub mod rundir;
pub mod sandbox;

/// Locks a mutex whose data stays usable after a panic elsewhere (plain state, counters,
/// handles): a poisoned lock is recovered rather than spreading the panic to the monitor.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
