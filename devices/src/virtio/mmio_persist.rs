//! Snapshots of the virtio-mmio transport: its registers ([`MmioState`]) and the queue setup
//! the driver wrote ([`QueueSnapshot`], virtio-queue's `QueueState` made serializable).
//!
//! A restored transport takes its registers back as they were; it does not activate its
//! device again (no guest-visible side effect is re-run). The device behind it is restored
//! by its owner, with its live queues (see `vsock::persist`). A state from disk is
//! validated: queue count and maximum sizes are the device's, sizes and ring alignments are
//! what virtio-queue accepts (`Queue::try_from`), the rings of a ready queue of a started
//! device are inside guest memory, and a started device has a consistent status.

use crate::GuestMemoryMmap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{MmioError, MmioTransport};
use crate::persist::Persist;
use crate::virtio::{Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING};

/// A virtio queue's state: virtio-queue's `QueueState`, serializable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The maximum size the device offers.
    pub max_size: u16,
    /// Where the device reads the available ring next.
    pub next_avail: u16,
    /// Where the device writes the used ring next.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// The state of `q`.
    pub fn of(q: &Queue) -> Self {
        q.state().into()
    }

    /// The queue this state describes, validated: the maximum size must be `max_size` (the
    /// device's), size and alignments must be valid, and with `mem`, a ready queue's rings
    /// must lie inside it.
    pub fn to_queue(
        &self,
        index: usize,
        max_size: u16,
        mem: Option<&GuestMemoryMmap>,
    ) -> Result<Queue, MmioError> {
        let bad = |reason: String| MmioError::BadQueueState { index, reason };
        if self.max_size != max_size {
            return Err(bad(format!(
                "maximum size {} is not the device's {max_size}",
                self.max_size
            )));
        }
        let q = Queue::try_from(QueueState::from(self)).map_err(|e| bad(e.to_string()))?;
        if let Some(mem) = mem {
            if q.ready() && !q.is_valid(mem) {
                return Err(bad("its rings are not inside guest memory".into()));
            }
        }
        Ok(q)
    }
}

/// The transport's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver wrote (accepted with `FEATURES_OK`).
    pub acked_features: u64,
    pub queue_sel: u32,
    /// `Status`.
    pub status: u32,
    pub config_generation: u32,
    /// The device was started (`DRIVER_OK` accepted) and owns its queues.
    pub active: bool,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// The queue setup the driver wrote, one per queue of the device.
    pub queues: Vec<QueueSnapshot>,
}

/// What a transport restore needs besides its state.
#[derive(Debug)]
pub struct MmioArgs<D> {
    /// The device, already restored (a started device with its live queues).
    pub device: D,
    /// The partition's (restored) guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt; its `InterruptStatus` is set from the state.
    pub irq: Arc<Interrupt>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The registers now.
    pub fn save_state(&self) -> MmioState {
        MmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            active: self.active,
            interrupt_status: self.irq.status(),
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// A transport with the saved registers in front of `args.device` (validated; see the
    /// module doc). The device is not activated again.
    pub fn restore_state(args: MmioArgs<D>, state: &MmioState) -> Result<Self, MmioError> {
        let MmioArgs { device, mem, irq } = args;
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let check_mem = state.active.then_some(&mem);
        let queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .enumerate()
            .map(|(i, (q, &max))| q.to_queue(i, max, check_mem))
            .collect::<Result<Vec<_>, _>>()?;
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(MmioError::Inconsistent("unknown InterruptStatus bits"));
        }
        let transport = MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            acked_features: state.acked_features,
            queue_sel: state.queue_sel,
            status: state.status,
            config_generation: state.config_generation,
            active: state.active,
            bad_accesses: 0,
        };
        let started = VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK;
        if state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !transport.features_acceptable() {
            return Err(MmioError::Inconsistent(
                "FEATURES_OK with features that were not offered",
            ));
        }
        if state.active
            && (state.status & started != started
                || state.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0)
        {
            return Err(MmioError::Inconsistent(
                "a started device without DRIVER_OK and FEATURES_OK",
            ));
        }
        transport.irq.restore_status(state.interrupt_status);
        Ok(transport)
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    type ConstructorArgs = MmioArgs<D>;
    type Error = MmioError;

    fn save(&self) -> Result<MmioState, MmioError> {
        Ok(self.save_state())
    }

    fn restore(args: MmioArgs<D>, state: &MmioState) -> Result<Self, MmioError> {
        Self::restore_state(args, state)
    }
}
