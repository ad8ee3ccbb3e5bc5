//! What virtio-drivers needs to run on the host against a [`BlkMmio`]: a `Hal` whose DMA
//! memory is the partition's guest memory (one arena per test thread), and the register
//! window of `crate::virtio::test_driver` in front of the device (as `net`'s tests do).

use std::sync::Arc;

use super::super::{BlkBackend, BlkMmio};
use crate::virtio::test_driver::MmioRegs;
pub(super) use crate::virtio::test_driver::Window;
pub(super) use crate::virtio::test_hal::{guest_memory, TestHal};

/// virtio-drivers' view of a disk's window.
pub(super) type DiskWindow<B> = Window<Arc<BlkMmio<B>>>;

impl<B: BlkBackend> MmioRegs for Arc<BlkMmio<B>> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        BlkMmio::read(self, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        BlkMmio::write(self, offset, data);
    }
}
