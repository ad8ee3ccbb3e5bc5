//! virtio-blk for partitions (`docs/blk.md`): a disk (device ID 2) on the virtio-mmio
//! transport, whose contents live in a [`BlkBackend`] — a host file ([`DiskFile`]) or, for
//! tests, an in-memory [`MemDisk`].
//!
//! - One request queue (size 256). Features offered: `FLUSH` and `BLK_SIZE` (the transport
//!   adds `VERSION_1`). Config space: `capacity` (u64, 512-byte sectors) and `blk_size`
//!   (512) at its offset 20.
//! - Requests (`IN`, `OUT`, `FLUSH`, `GET_ID`) run inline on the guest's `QueueNotify`, on
//!   its vCPU thread, as net TX does: a request is answered before the register write
//!   returns. A write is acknowledged once the backend took it (`pwrite` returned);
//!   durability is the guest's `FLUSH` (`fdatasync`).
//! - Dirty blocks: every write marks the 4 KiB blocks of the disk it touched
//!   ([`BlkMmio::take_dirty_blocks`], KVM's dirty-log word layout), so that a snapshot
//!   copies only those.
//! - Counters: [`BlkStats`]. Snapshots: [`BlkMmio`] implements
//!   [`Persist`](crate::persist::Persist) ([`BlkMmioState`]; the disk's contents are not in
//!   it) and [`Suspendable`](crate::persist::Suspendable).

mod backend;
mod chain;
mod device;
mod dirty;
mod persist;

#[cfg(test)]
mod tests;

use crate::GuestMemoryMmap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::virtio::mmio::{MmioError, MmioTransport};
use crate::virtio::Interrupt;

pub use backend::{BlkBackend, DiskError, DiskFile, MemDisk};
pub use device::Blk;
pub use dirty::DirtyBlocks;
pub use persist::{BlkMmioArgs, BlkMmioState};

/// The virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The request queue's index.
pub const REQUEST_QUEUE: u16 = 0;
/// A sector: the unit of `capacity` and of a request's `sector`.
pub const SECTOR_SIZE: u64 = 512;
/// The block size the config space announces (`blk_size`).
pub const BLK_SIZE: u32 = 512;
/// The granularity of dirty tracking: a write marks every 4 KiB block it touches.
pub const DIRTY_BLOCK_SIZE: u64 = 4096;
/// `VIRTIO_BLK_F_BLK_SIZE`: the config space holds `blk_size`.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: the device takes `FLUSH` requests (and caches writes until one).
pub const F_FLUSH: u64 = 1 << 9;
/// Length of the device configuration space (`capacity` up to `blk_size`).
pub const CONFIG_LEN: usize = 24;
/// Where `blk_size` is in the configuration space (virtio 1.2 §5.2.4).
pub const CONFIG_BLK_SIZE_OFFSET: usize = 20;
/// Length of the request header (`type`, `reserved`, `sector`).
pub const REQ_HDR_LEN: usize = 16;
/// Length of the device ID a `GET_ID` request returns.
pub const ID_LEN: usize = 20;

/// Request types (virtio 1.2 §5.2.6).
pub mod req {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Make the writes acknowledged so far durable.
    pub const FLUSH: u32 = 4;
    /// The device ID string (20 bytes).
    pub const GET_ID: u32 = 8;
}

/// Request status bytes (virtio 1.2 §5.2.6).
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// The device's counters (`status`). Requests are counted when they succeed; bytes are
/// data bytes moved between the guest and the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkStats {
    /// `IN` requests served, and their bytes.
    pub reads: u64,
    pub bytes_read: u64,
    /// `OUT` requests served, and their bytes.
    pub writes: u64,
    pub bytes_written: u64,
    /// `FLUSH` requests served.
    pub flushes: u64,
    /// Well-formed requests answered `IOERR`: sectors beyond the disk, a data length that
    /// is not a multiple of 512, or a backend that failed (also in `backend_errors`).
    pub io_errors: u64,
    /// Requests of a type the device does not know, answered `UNSUPP`.
    pub unsupported: u64,
    /// Chains of the wrong shape: answered `IOERR`, or returned with length 0 when no status
    /// byte could be written (see `docs/blk.md`, "Guest input").
    pub malformed: u64,
    /// Backend reads, writes or flushes that failed (each also an `io_errors`).
    #[serde(default)]
    pub backend_errors: u64,
}

/// Why a block device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The device ID string is longer than 20 bytes or not printable ASCII.
    #[error("blk: device ID {0:?} is not 1 to 20 printable ASCII characters")]
    BadId(String),
    /// The backend's length is 0 or not a multiple of 512.
    #[error("blk: a disk of {0} bytes (must be a non-zero multiple of 512)")]
    BadDiskLen(u64),
    /// The transport could not be created or restored.
    #[error("blk: {0}")]
    Mmio(#[from] MmioError),
    /// The saved capacity is not the disk's: the disk is not the one the state was saved with.
    #[error("blk: the device was saved with {saved} sectors, the disk has {disk}")]
    CapacityMismatch { saved: u64, disk: u64 },
    /// A saved state is not valid; nothing was built.
    #[error("blk: invalid saved state: {0}")]
    InvalidState(String),
}

/// Whether `id` may be a device ID: 1 to 20 printable ASCII characters.
pub fn id_ok(id: &str) -> bool {
    (1..=ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// A partition's disk: its virtio-mmio window (0x1000 bytes) in front of a [`Blk`] device.
/// Register accesses come from vCPU threads (requests run inline on `QueueNotify`), the
/// snapshot code's calls from the monitor; one lock serializes them, and interrupts are
/// raised after it is released.
pub struct BlkMmio<B: BlkBackend> {
    transport: Mutex<MmioTransport<Blk<B>>>,
}

impl<B: BlkBackend> std::fmt::Debug for BlkMmio<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkMmio")
            .field("id", &self.id())
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl<B: BlkBackend> BlkMmio<B> {
    /// A disk over `backend` whose `GET_ID` answers `id`, in guest memory `mem`, raising `irq`.
    pub fn new(
        backend: B,
        id: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
    ) -> Result<Self, BlkError> {
        let device = Blk::new(backend, id)?;
        let transport = MmioTransport::new(device, mem, Arc::new(irq))?;
        Ok(Self::from_transport(transport))
    }

    fn from_transport(transport: MmioTransport<Blk<B>>) -> Self {
        BlkMmio {
            transport: Mutex::new(transport),
        }
    }

    fn transport(&self) -> MutexGuard<'_, MmioTransport<Blk<B>>> {
        self.transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the transport, then raises the interrupt the device asked for (outside
    /// the lock, so a partition's wake-up never runs under it).
    fn with<R>(&self, f: impl FnOnce(&mut MmioTransport<Blk<B>>) -> R) -> R {
        let (result, irq) = {
            let mut t = self.transport();
            let result = f(&mut t);
            (result, t.device_mut().take_irq())
        };
        if let Some(irq) = irq {
            irq.trigger();
        }
        result
    }

    /// A guest read at `offset` within the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport().read(offset, data);
    }

    /// A guest write at `offset` within the window (a `QueueNotify` serves the requests
    /// waiting in the queue before it returns).
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.with(|t| t.write(offset, data));
    }

    /// The counters.
    pub fn stats(&self) -> BlkStats {
        self.transport().device().stats()
    }

    /// The disk's size in 512-byte sectors (the config space's `capacity`).
    pub fn capacity(&self) -> u64 {
        self.transport().device().capacity()
    }

    /// The disk's size in bytes.
    pub fn disk_len(&self) -> u64 {
        self.capacity() * SECTOR_SIZE
    }

    /// The ID string `GET_ID` answers.
    pub fn id(&self) -> String {
        self.transport().device().id().to_owned()
    }

    /// The 4 KiB blocks of the disk written since the last take (or clear), and clears
    /// them: block `i` is bit `i % 64` of word `i / 64` (KVM's dirty-log layout); there are
    /// `disk_len().div_ceil(4096).div_ceil(64)` words. Take it at the cut, with the device
    /// asleep, and copy those blocks from the disk ([`read_disk_at`](Self::read_disk_at) or
    /// [`backend_file`](Self::backend_file)) before it wakes.
    pub fn take_dirty_blocks(&self) -> Vec<u64> {
        self.transport().device_mut().dirty_mut().take()
    }

    /// Forgets the dirty blocks (after a full copy of the disk).
    pub fn clear_dirty_blocks(&self) {
        self.transport().device_mut().dirty_mut().clear();
    }

    /// Reads `buf.len()` bytes of the disk at byte `offset` through the backend (the
    /// snapshot code's copy of dirty blocks; the last block may be shorter than 4 KiB).
    pub fn read_disk_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.disk_len());
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "blk: read beyond the end of the disk",
            ));
        }
        self.transport()
            .device_mut()
            .backend_mut()
            .read_at(buf, offset)
    }

    /// A duplicate (`dup`) of the file behind the disk, if the backend has one: the snapshot
    /// code may read it with `pread` (`FileExt::read_exact_at`) while the device sleeps.
    pub fn backend_file(&self) -> io::Result<Option<File>> {
        self.transport()
            .device()
            .backend()
            .file()
            .map(File::try_clone)
            .transpose()
    }

    /// Register accesses the transport ignored (misaligned, wrong size, unknown).
    pub fn bad_accesses(&self) -> u64 {
        self.transport().bad_accesses()
    }
}
