//! A partition's disk over an in-memory disk ([`MemDisk`]), driven by a hostile driver
//! ([`crate::virtio`]): requests (header, data, status descriptors) are built from fuzzed
//! descriptor chains; the device step makes the disk fail (or work again).
//!
//! Invariants: besides the driver's, the disk and the device keep their size.

use duplex_devices::blk::{BlkMmio, MemDisk};
use duplex_devices::GuestMemoryMmap;

use crate::input::Input;
use crate::virtio::{self, guest_memory, interrupt, Device};

/// The disk's size: 16 sectors of 512 bytes.
pub const DISK_LEN: usize = 16 * 512;

/// A disk device and its disk.
pub struct Disk {
    dev: BlkMmio<MemDisk>,
    disk: MemDisk,
    mem: GuestMemoryMmap,
}

impl Disk {
    /// A new device over a zeroed disk.
    pub fn new() -> Self {
        let disk = MemDisk::new(DISK_LEN);
        let mem = guest_memory();
        let dev = BlkMmio::new(disk.clone(), "fuzz", mem.clone(), interrupt()).expect("a disk");
        Disk { dev, disk, mem }
    }
}

impl Default for Disk {
    fn default() -> Self {
        Self::new()
    }
}

impl Device for Disk {
    fn device_id(&self) -> u32 {
        duplex_devices::blk::DEVICE_ID
    }

    fn queues(&self) -> u16 {
        1
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        self.dev.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.dev.write(offset, data);
    }

    fn extra(&mut self, input: &mut Input<'_>) {
        self.disk.set_failing(input.u8() % 2 == 1);
    }

    fn check(&self) {
        assert_eq!(
            self.disk.contents().len(),
            DISK_LEN,
            "the disk changed size"
        );
        assert_eq!(
            self.dev.disk_len(),
            DISK_LEN as u64,
            "the device's disk size"
        );
    }
}

impl Disk {
    /// The disk's contents now.
    pub fn contents(&self) -> Vec<u8> {
        self.disk.contents()
    }
}

/// Runs one fuzz input against a fresh disk.
pub fn run(data: &[u8]) {
    let mut disk = Disk::new();
    virtio::run(&mut disk, data);
}
