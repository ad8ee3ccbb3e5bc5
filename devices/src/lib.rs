//! Duplex devices: what a partition's guest reaches through MMIO and port I/O.
//!
//! - [`blk`]: virtio-blk for partitions, backed by a regular host file, with the written
//!   blocks tracked for snapshots (`docs/blk.md`).
//! - [`console`]: a 16550 UART (vm-superio) whose output goes to a sink (the monitor's
//!   stdout with a `[name]` prefix, or a file) and to a ring of recent lines that the
//!   control socket and crash reports read.
//! - [`sysctl`]: the system control page of the guest ABI (`docs/guest-abi.md`): power off,
//!   reboot, wait, power-saving sleep, fault and panic reports, TSC frequency.
//! - [`health`]: supervised service threads (restarted or marked dead on a panic) and the
//!   process's fd and thread counts, for `status`.
//! - [`umask`]: Unix sockets bound with their mode from the start (a private umask on a
//!   thread of its own; the process's umask never changes).
//! - [`event_loop`]: the device event loop (rust-vmm `event-manager` on a thread of its own)
//!   that devices wait on for their host-side fds: TAP devices, the vsock host bridge.
//! - [`net`]: virtio-net for partitions, backed by a host TAP device (`docs/net.md`).
//! - [`persist`]: snapshot save and restore of devices ([`persist::Persist`]).
//! - [`virtio`]: the virtio-mmio transport (version 2) and the device interface behind it.
//! - [`vsock`]: virtio-vsock devices for partitions and the switch that connects them to each
//!   other by CID and to host programs through Unix sockets (`docs/vsock.md`).

pub mod blk;
pub mod console;
pub mod event_loop;
pub mod health;
pub mod net;
pub mod persist;
pub mod sysctl;
pub mod umask;
pub mod virtio;
pub mod vsock;

/// Guest memory as every device and the monitor see it: vm-memory's mmap backend with a
/// dirty bitmap, so that writes the monitor's own devices make into guest memory (virtio
/// rings and buffers) are tracked for incremental snapshots, next to KVM's dirty log of the
/// guest's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
