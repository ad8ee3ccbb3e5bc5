//! A virtio-drivers `Transport` over one of our devices' virtio-mmio windows (the modern
//! virtio-mmio sequences of virtio-drivers' own `MmioTransport`), for the interop tests
//! that run the reference guests' driver on the host against our devices.

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::virtio::mmio::reg;

/// A device's virtio-mmio register window, as the test driver reaches it.
pub(crate) trait MmioRegs {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// virtio-drivers' view of a device's window.
pub(crate) struct Window<R: MmioRegs>(pub R);

impl<R: MmioRegs> Window<R> {
    fn r(&self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.0.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(&self, offset: u64, value: u32) {
        self.0.write(offset, &value.to_le_bytes());
    }
}

impl<R: MmioRegs> Transport for Window<R> {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(self.r(reg::DEVICE_ID)).unwrap()
    }

    fn read_device_features(&mut self) -> u64 {
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.r(reg::DEVICE_FEATURES);
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        u64::from(low) | (u64::from(self.r(reg::DEVICE_FEATURES)) << 32)
    }

    fn write_driver_features(&mut self, features: u64) {
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.w(reg::QUEUE_SEL, queue.into());
        self.r(reg::QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.w(reg::QUEUE_NOTIFY, queue.into());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.r(reg::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.w(reg::STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        desc: PhysAddr,
        driver: PhysAddr,
        dev: PhysAddr,
    ) {
        self.w(reg::QUEUE_SEL, queue.into());
        self.w(reg::QUEUE_NUM, size);
        self.w(reg::QUEUE_DESC_LOW, desc as u32);
        self.w(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(reg::QUEUE_DRIVER_LOW, driver as u32);
        self.w(reg::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.w(reg::QUEUE_DEVICE_LOW, dev as u32);
        self.w(reg::QUEUE_DEVICE_HIGH, (dev >> 32) as u32);
        self.w(reg::QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.w(reg::QUEUE_SEL, queue.into());
        self.w(reg::QUEUE_READY, 0);
        assert_eq!(self.r(reg::QUEUE_READY), 0);
        for r in [
            reg::QUEUE_NUM,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
        ] {
            self.w(r, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.w(reg::QUEUE_SEL, queue.into());
        self.r(reg::QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let status = self.r(reg::INTERRUPT_STATUS);
        if status != 0 {
            self.w(reg::INTERRUPT_ACK, status);
        }
        InterruptStatus::from_bits_truncate(status)
    }

    fn read_config_generation(&self) -> u32 {
        self.r(reg::CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let mut buf = vec![0u8; size_of::<T>()];
        self.0.read(0x100 + offset as u64, &mut buf);
        T::read_from_bytes(&buf).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.0.write(0x100 + offset as u64, value.as_bytes());
        Ok(())
    }
}
