//! What virtio-drivers needs to run on the host against a [`NetMmio`]: a `Hal` whose DMA
//! memory is the partition's guest memory (one arena per test thread), and a `Transport`
//! that forwards register accesses to the card (the modern virtio-mmio sequences of
//! virtio-drivers' own `MmioTransport`).

use std::sync::Arc;

use super::super::{NetBackend, NetMmio};
use crate::virtio::test_driver::MmioRegs;
pub(super) use crate::virtio::test_driver::Window;
pub(super) use crate::virtio::test_hal::{guest_memory, TestHal};

/// virtio-drivers' view of a card's window.
pub(super) type CardWindow<B> = Window<Arc<NetMmio<B>>>;

impl<B: NetBackend> MmioRegs for Arc<NetMmio<B>> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        NetMmio::read(self, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        NetMmio::write(self, offset, data);
    }
}
