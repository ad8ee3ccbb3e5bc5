//! Virtio devices as a guest sees them: the virtio-mmio transport ([`mmio`]) in front of a
//! device that implements [`VirtioDevice`], and the [`Interrupt`] a device raises when it
//! has put buffers in a used ring.
//!
//! The queues themselves are `virtio_queue::Queue` (rust-vmm); this module only decides who
//! owns them: the transport while the driver sets them up, the device once the driver has
//! set `DRIVER_OK`.

pub mod mmio;
#[cfg(test)]
pub(crate) mod test_driver;
#[cfg(test)]
pub(crate) mod test_hal;

use crate::GuestMemoryMmap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

use vmm_sys_util::eventfd::EventFd;

/// `InterruptStatus` bit: the device used a buffer in one of its queues.
pub const INT_USED_RING: u32 = 1;
/// `InterruptStatus` bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the `InterruptStatus` register of its transport, a KVM irqfd, and
/// a call that wakes the partition's vCPU if it sleeps in the guest ABI's `WAIT_UNTIL`.
pub struct Interrupt {
    /// Written (1) on every trigger; the monitor wires it to the device's GSI (KVM irqfd).
    pub irqfd: EventFd,
    /// Wakes the partition's vCPUs if they sleep in `WAIT_UNTIL` (the reference guests poll
    /// their used rings instead of taking interrupts).
    pub wake: Arc<dyn Fn() + Send + Sync>,
    status: AtomicU32,
}

impl Interrupt {
    /// An interrupt that signals `irqfd` and calls `wake`.
    pub fn new(irqfd: EventFd, wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        Interrupt {
            irqfd,
            wake,
            status: AtomicU32::new(0),
        }
    }

    /// Signals "used buffer": sets `InterruptStatus` bit 0, writes the irqfd, wakes the vCPU.
    pub fn trigger(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio interrupt: irqfd write failed: {e}");
        }
        (self.wake)();
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the given status bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the `InterruptStatus` register to `bits` (a restored transport).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears all status bits (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// Why a device could not start when the driver set `DRIVER_OK`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A ready queue's rings are not inside guest memory, or its setup is invalid.
    #[error(
        "queue {0} is not usable: its rings are not inside guest memory or its size is invalid"
    )]
    BadQueue(u16),
    /// The device refused to start.
    #[error("{0}")]
    Device(String),
}

/// A virtio device behind a transport.
/// Copies the device configuration space `config` from `offset` into `data`; bytes past
/// its end read as 0 (what `VirtioDevice::read_config` does for a fixed config space).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (powers of two); its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set `DRIVER_OK`: the device takes its queues (one per entry of
    /// [`queue_max_sizes`](Self::queue_max_sizes), possibly not ready) and starts.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver wrote `QueueNotify` with this queue index (only after activation).
    fn queue_notify(&mut self, index: u16);
    /// The driver reset the device (wrote 0 to `Status`, or disabled a queue of the running
    /// device): the device drops its queues and whatever it had in flight.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn trigger_sets_status_signals_irqfd_and_wakes() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let irq = Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            Arc::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(irq.status(), 0);
        irq.trigger();
        irq.trigger();
        assert_eq!(irq.status(), INT_USED_RING);
        assert_eq!(irq.irqfd.read().expect("irqfd was written"), 2);
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), 0);
    }
}
