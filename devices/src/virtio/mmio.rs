//! The virtio-mmio transport, version 2 ("modern"), as in the virtio 1.2 specification
//! §4.2.2: a 4 KiB register window (registers below 0x100, the device configuration space
//! from 0x100) in front of a [`VirtioDevice`].
//!
//! The transport keeps the queue setup the driver writes (size, ring addresses, ready) in
//! `virtio_queue::Queue` objects; when the driver sets `DRIVER_OK` with `FEATURES_OK`, it
//! hands copies of them to the device ([`VirtioDevice::activate`]) and from then on forwards
//! `QueueNotify` writes. Writing 0 to `Status` resets both.
//!
//! Registers are 32 bits wide and must be accessed with naturally aligned 4-byte accesses;
//! anything else reads as 0, is ignored and counted ([`MmioTransport::bad_accesses`]).
//!
//! Snapshots of the registers and queue setup: [`MmioState`] (in `mmio_persist.rs`).

use crate::GuestMemoryMmap;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};

use super::{ActivateError, Interrupt, VirtioDevice};

/// `MagicValue`: "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version implemented (2 = modern).
pub const VERSION: u32 = 2;
/// `VendorID`: "DPLX" little-endian (the same value as the control page's magic).
pub const VENDOR_ID: u32 = 0x584C_5044;
/// Size of the register window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// Where the device configuration space starts in the window.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

#[path = "mmio_persist.rs"]
mod persist;

pub use persist::{MmioArgs, MmioState, QueueSnapshot};

/// Why a transport could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device asked for a queue size virtio-queue refuses (0, not a power of two, too big).
    #[error("queue {index}: invalid maximum size {size}")]
    QueueSize { index: usize, size: u16 },
    /// A saved state has another number of queues than the device.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    /// A saved queue state is not usable.
    #[error("saved queue {index}: {reason}")]
    BadQueueState { index: usize, reason: String },
    /// A saved state contradicts itself.
    #[error("saved transport state: {0}")]
    Inconsistent(&'static str),
}

/// A virtio-mmio register window in front of device `D`.
#[derive(Debug)]
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    bad_accesses: u64,
}

/// Low or high half of a 64-bit value.
fn half(value: u64, sel: u32) -> u32 {
    match sel {
        0 => value as u32,
        1 => (value >> 32) as u32,
        _ => 0,
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` in the guest memory `mem`, raising `irq`.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Arc<Interrupt>) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            bad_accesses: 0,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver has started the device (`DRIVER_OK` accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Accesses that were misaligned, of the wrong size, or outside any register.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    /// The feature bits offered to the driver: the device's and `VIRTIO_F_VERSION_1`.
    pub fn offered_features(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn register_ok(&mut self, offset: u64, len: usize) -> bool {
        let ok = len == 4 && offset.is_multiple_of(4);
        if !ok {
            self.bad_accesses += 1;
        }
        ok
    }

    /// A guest read at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            if offset >= WINDOW_SIZE {
                self.bad_accesses += 1;
                return;
            }
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if !self.register_ok(offset, data.len()) {
            return;
        }
        let value: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => half(self.offered_features(), self.device_features_sel),
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            // Write-only registers and reserved space read as 0.
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if offset >= WINDOW_SIZE {
                self.bad_accesses += 1;
                return;
            }
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if !self.register_ok(offset, data.len()) {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_setup(offset, value),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => {
                if self.active {
                    // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
                    self.device.queue_notify(value as u16);
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => self.bad_accesses += 1,
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated before FEATURES_OK; later writes are ignored.
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    fn write_queue_setup(&mut self, offset: u64, value: u32) {
        if self.active {
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        // virtio-queue validates sizes and alignments and keeps the old value if invalid.
        match offset {
            reg::QUEUE_NUM => q.set_size(value as u16),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let active = self.active;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let ready = value == 1;
        let was_ready = q.ready();
        q.set_ready(ready);
        // Disabling a queue of the running device (drivers do it before freeing the rings)
        // stops the device: it must not touch that memory any more.
        if active && was_ready && !ready {
            self.device.reset();
            self.active = false;
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut status = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let newly = status & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            } else if let Err(e) = self.activate() {
                log::warn!("virtio-mmio: device did not start: {e}");
                status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = status | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    /// Only offered features may be acked, and a modern device requires VERSION_1.
    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.offered_features() == 0
            && self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let index = i as u16;
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::BadQueue(index));
            }
            queues.push(Queue::try_from(q.state()).map_err(|_| ActivateError::BadQueue(index))?);
        }
        self.device.activate(
            self.mem.clone(),
            queues,
            self.irq.clone(),
            self.acked_features,
        )?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.irq.clear();
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
