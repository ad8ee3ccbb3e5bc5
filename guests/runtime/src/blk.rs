//! virtio-blk through the `virtio-drivers` crate: finds the partition's disk on the
//! command line and wraps it as [`Blk`] (512-byte sectors: `read`, `write`, `flush`).
//!
//! The monitor's disk is device ID 2 at one of the `virtio_mmio.device=` entries (the
//! controller's: `4K@0xd0004000:7`), offering `FLUSH` and `BLK_SIZE` (512). Like
//! [`crate::net`] it takes no interrupts: each request is put on the queue, notified (one
//! exit) and its completion polled in the used ring. A write is on the host's disk once a
//! later [`Blk::flush`] returned `Ok`.
//!
//! With the `store` feature, [`Blk`] is a `duplex_store::BlockDevice`, so the controller
//! opens its store with `duplex_store::Store::open(open_blk(boot)?)`.

pub use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};

use virtio_drivers::transport::{DeviceType, Transport};

use crate::vsock::{mmio_devices, probe, MmioTransport, RuntimeHal, VirtioError};
use crate::{println, BootInfo};

/// Largest request [`Blk`] sends at once (a longer read or write is split).
pub const MAX_REQUEST: usize = 128 * 1024;

/// Why a [`Blk`] request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The buffer is empty or not a whole number of sectors.
    BadLength(usize),
    /// The request reaches past the end of the disk.
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Sectors requested.
        count: u64,
    },
    /// The device or the driver failed the request.
    Device(VirtioError),
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::BadLength(n) => write!(f, "a {n}-byte buffer is not whole sectors"),
            BlkError::OutOfRange { sector, count } => {
                write!(f, "sectors {sector}..+{count} are past the end of the disk")
            }
            BlkError::Device(e) => write!(f, "virtio-blk: {e}"),
        }
    }
}

/// The partition's disk: virtio-drivers' [`VirtIOBlk`] with checked, polled requests.
pub struct Blk {
    dev: VirtIOBlk<RuntimeHal, MmioTransport<'static>>,
    sectors: u64,
}

/// Finds the disk (virtio device ID 2) on the command line and initialises it.
///
/// `None` when the command line names no block device, or it fails to initialise (the
/// reason is printed).
pub fn open_blk(boot: &BootInfo) -> Option<Blk> {
    for dev in mmio_devices(boot.cmdline) {
        // SAFETY: the monitor put this window on the command line for this partition, and
        // firmware calls `open_blk` once; a window that is not a block device is only
        // probed (its identification registers read) and dropped.
        let transport = match unsafe { probe(&dev) } {
            Ok(t) => t,
            Err(why) => {
                println!("blk: virtio-mmio device at {:#x}: {why}", dev.addr);
                continue;
            }
        };
        if transport.device_type() != DeviceType::Block {
            continue;
        }
        match VirtIOBlk::new(transport) {
            Ok(mut blk) => {
                blk.disable_interrupts();
                let sectors = blk.capacity();
                return Some(Blk { dev: blk, sectors });
            }
            Err(e) => {
                println!("blk: device at {:#x} failed to initialise: {e}", dev.addr);
                return None;
            }
        }
    }
    None
}

impl Blk {
    /// The disk's size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the device refuses writes.
    pub fn readonly(&self) -> bool {
        self.dev.readonly()
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::BadLength(len));
        }
        let count = (len / SECTOR_SIZE) as u64;
        match sector.checked_add(count) {
            Some(end) if end <= self.sectors => Ok(()),
            _ => Err(BlkError::OutOfRange { sector, count }),
        }
    }

    /// Reads sectors `sector..` into `buf` (a non-zero multiple of 512 bytes).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        for (i, part) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let at = sector + (i * MAX_REQUEST / SECTOR_SIZE) as u64;
            self.dev
                .read_blocks(at as usize, part)
                .map_err(BlkError::Device)?;
        }
        Ok(())
    }

    /// Writes `buf` (a non-zero multiple of 512 bytes) to sectors `sector..`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        for (i, part) in buf.chunks(MAX_REQUEST).enumerate() {
            let at = sector + (i * MAX_REQUEST / SECTOR_SIZE) as u64;
            self.dev
                .write_blocks(at as usize, part)
                .map_err(BlkError::Device)?;
        }
        Ok(())
    }

    /// Makes every completed write durable (virtio-blk `FLUSH`).
    pub fn flush(&mut self) -> Result<(), BlkError> {
        self.dev.flush().map_err(BlkError::Device)
    }
}

#[cfg(feature = "store")]
impl duplex_store::BlockDevice for Blk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), duplex_store::BlockError> {
        Blk::read(self, sector, buf).map_err(store_error)
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), duplex_store::BlockError> {
        Blk::write(self, sector, buf).map_err(store_error)
    }

    fn flush(&mut self) -> Result<(), duplex_store::BlockError> {
        Blk::flush(self).map_err(store_error)
    }
}

#[cfg(feature = "store")]
fn store_error(e: BlkError) -> duplex_store::BlockError {
    match e {
        BlkError::BadLength(n) => duplex_store::BlockError::BadLength(n),
        BlkError::OutOfRange { sector, count } => {
            duplex_store::BlockError::OutOfRange { sector, count }
        }
        BlkError::Device(VirtioError::IoError) => {
            duplex_store::BlockError::Io("the device reported an I/O error")
        }
        BlkError::Device(VirtioError::Unsupported) => {
            duplex_store::BlockError::Io("the device does not support the request")
        }
        BlkError::Device(VirtioError::NotReady) => {
            duplex_store::BlockError::Io("the device is not ready")
        }
        BlkError::Device(_) => duplex_store::BlockError::Io("virtio request failed"),
    }
}
