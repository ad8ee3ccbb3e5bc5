//! A partition's vsock device: [`VsockDevice`] (what its virtio-mmio transport drives; every
//! call goes to the switch under its lock) and [`VsockMmio`], the 4 KiB window the vCPU
//! threads read and write, with its saved form [`VsockMmioState`]. Depends on `shared` and
//! `switch`.

use crate::GuestMemoryMmap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::limits::{DEVICE_ID, F_STREAM, QUEUE_SIZE};
use super::shared::{OnLoop, Shared};
use super::switch::Inner;
use crate::virtio::mmio::{MmioState, MmioTransport, QueueSnapshot};
use crate::virtio::{ActivateError, Interrupt, VirtioDevice};

pub(crate) const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// The vsock device of one partition, as its transport sees it.
pub struct VsockDevice {
    cid: u64,
    attach_id: u64,
    shared: Arc<Shared>,
    /// Keeps the switch's bridge on its loop while the device lives.
    _on_loop: Arc<OnLoop>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("cid", &self.cid)
            .field("attach_id", &self.attach_id)
            .finish_non_exhaustive()
    }
}

impl VsockDevice {
    pub(crate) fn new(
        (cid, attach_id): (u64, u64),
        shared: Arc<Shared>,
        on_loop: Arc<OnLoop>,
    ) -> Self {
        VsockDevice {
            cid,
            attach_id,
            shared,
            _on_loop: on_loop,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner, u64, u64) -> R) -> R {
        let (cid, id) = (self.cid, self.attach_id);
        self.shared.with(|inner| f(inner, cid, id))
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_STREAM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        self.with(|inner, cid, id| inner.activate(cid, id, mem, queues, irq))
    }

    fn queue_notify(&mut self, index: u16) {
        self.with(|inner, cid, id| inner.notify(cid, id, index));
    }

    fn reset(&mut self) {
        self.with(|inner, cid, id| inner.reset_device(cid, id));
    }
}

/// A partition's vsock device, saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockMmioState {
    /// The partition's CID (the guest read it from the config space).
    pub cid: u64,
    /// The virtio-mmio registers and the queue setup the driver wrote.
    pub transport: MmioState,
    /// The device's live queues (next available and used indexes...), present exactly
    /// when the device is started (`transport.active`). Its backlog is in the switch state.
    pub device_queues: Option<Vec<QueueSnapshot>>,
}

/// A partition's vsock virtio-mmio window (0x1000 bytes).
#[derive(Debug)]
pub struct VsockMmio {
    cid: u64,
    transport: Mutex<MmioTransport<VsockDevice>>,
}

impl VsockMmio {
    pub(crate) fn new(cid: u64, transport: MmioTransport<VsockDevice>) -> Self {
        VsockMmio {
            cid,
            transport: Mutex::new(transport),
        }
    }

    fn transport(&self) -> MutexGuard<'_, MmioTransport<VsockDevice>> {
        self.transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A guest read at `offset` within the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport().read(offset, data);
    }

    /// A guest write at `offset` within the window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.transport().write(offset, data);
    }

    /// The partition's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Register accesses the transport ignored (misaligned, wrong size, unknown).
    pub fn bad_accesses(&self) -> u64 {
        self.transport().bad_accesses()
    }

    /// The attachment this window belongs to.
    pub(crate) fn attach_id(&self) -> u64 {
        self.transport().device().attach_id
    }

    /// The device's state; take it while the partition is paused and the switch frozen.
    pub(crate) fn save_state(&self) -> VsockMmioState {
        let t = self.transport();
        let device_queues = t
            .device()
            .with(|inner, cid, id| inner.queue_snapshots(cid, id));
        VsockMmioState {
            cid: self.cid,
            transport: t.save_state(),
            device_queues,
        }
    }
}
