//! Snapshots of a disk device (`docs/blk.md`, "Snapshots"): [`BlkMmioState`] holds the
//! transport's registers, the device's live queue (as `NetMmioState` does), the ID, the
//! capacity and the counters. The disk's contents are not in it: the snapshot code copies
//! the disk (or its dirty blocks, [`BlkMmio::take_dirty_blocks`]) on its own. No request is
//! in flight in the device at a cut: each is served before its `QueueNotify` returns.
//!
//! [`Suspendable`]: asleep, the device touches neither guest memory nor the disk
//! (notifications wait) until woken, when it serves what waited.

use crate::GuestMemoryMmap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::device::Active;
use super::{Blk, BlkBackend, BlkError, BlkMmio, BlkStats, F_FLUSH, QUEUE_SIZE, SECTOR_SIZE};
use crate::persist::{Persist, Suspendable};
use crate::virtio::mmio::{MmioArgs, MmioState, MmioTransport, QueueSnapshot};
use crate::virtio::Interrupt;

/// A disk device, saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkMmioState {
    /// The ID string `GET_ID` answered.
    pub id: String,
    /// The disk's size in sectors, as the guest read it from the config space.
    pub capacity: u64,
    /// The virtio-mmio registers and the queue setup the driver wrote.
    pub transport: MmioState,
    /// The device's live request queue, present exactly when the device is started.
    pub device_queues: Option<Vec<QueueSnapshot>>,
    /// The counters.
    pub stats: BlkStats,
    /// The guest notified while the device slept (the restored device serves the queue
    /// at once). The monitor pauses the vCPUs before it puts the device to sleep, so this
    /// is false at its cuts.
    #[serde(default)]
    pub notify_waiting: bool,
}

/// What a [`BlkMmio`] restore needs besides its state.
pub struct BlkMmioArgs<B> {
    /// The disk, holding the contents saved with the state: its size must be the saved
    /// capacity.
    pub backend: B,
    /// The configured ID; it must be the saved one (the guest may know it).
    pub id: String,
    /// The partition's restored guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub irq: Interrupt,
}

impl<B> std::fmt::Debug for BlkMmioArgs<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkMmioArgs")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<B: BlkBackend> Persist for BlkMmio<B> {
    type State = BlkMmioState;
    type ConstructorArgs = BlkMmioArgs<B>;
    type Error = BlkError;

    /// Take it while the partition is paused and the device asleep.
    fn save(&self) -> Result<BlkMmioState, BlkError> {
        let t = self.transport();
        let blk = t.device();
        Ok(BlkMmioState {
            id: blk.id().to_owned(),
            capacity: blk.capacity(),
            transport: t.save_state(),
            device_queues: blk.active().map(|a| vec![QueueSnapshot::of(&a.queue)]),
            stats: blk.stats(),
            notify_waiting: blk.notify_waiting(),
        })
    }

    /// The device as saved, validated (capacity against the disk, ID, registers, queue
    /// size, rings inside `mem`); a started device comes back started with its queue where
    /// it was, without being activated again. Its dirty bitmap starts clean: the disk is
    /// the one saved with the state.
    fn restore(args: BlkMmioArgs<B>, state: &BlkMmioState) -> Result<Self, BlkError> {
        let BlkMmioArgs {
            backend,
            id,
            mem,
            irq,
        } = args;
        let disk = backend.disk_len() / SECTOR_SIZE;
        if state.capacity != disk {
            return Err(BlkError::CapacityMismatch {
                saved: state.capacity,
                disk,
            });
        }
        if state.id != id {
            return Err(BlkError::InvalidState(format!(
                "the device was saved with ID {:?}, not {id:?}",
                state.id
            )));
        }
        let irq = Arc::new(irq);
        let active = match (state.transport.active, &state.device_queues) {
            (true, Some(saved)) if saved.len() == 1 => {
                let queue = saved[0].to_queue(0, QUEUE_SIZE, Some(&mem))?;
                if !queue.ready() {
                    return Err(BlkError::InvalidState(
                        "a started device's queue is not ready".into(),
                    ));
                }
                Some(Active {
                    mem: mem.clone(),
                    queue,
                    irq: irq.clone(),
                    writeback: state.transport.acked_features & F_FLUSH != 0,
                })
            }
            (false, None) => None,
            _ => {
                return Err(BlkError::InvalidState(
                    "the device's queue does not match its started state".into(),
                ))
            }
        };
        let device = Blk::restored(backend, &id, state.stats, active)?;
        let transport =
            MmioTransport::restore_state(MmioArgs { device, mem, irq }, &state.transport)?;
        let blk = BlkMmio::from_transport(transport);
        if state.notify_waiting {
            blk.with(|t| t.device_mut().process_queue());
        }
        Ok(blk)
    }
}

impl<B: BlkBackend> BlkMmio<B> {
    fn sleep_device(&self) {
        self.transport().device_mut().sleep();
    }

    fn wake_device(&self) {
        self.with(|t| t.device_mut().wake());
    }
}

impl<B: BlkBackend> Suspendable for BlkMmio<B> {
    type Error = std::convert::Infallible;

    fn sleep(&mut self) -> Result<(), Self::Error> {
        self.sleep_device();
        Ok(())
    }

    fn wake(&mut self) {
        self.wake_device();
    }
}

/// A device shared between the vCPU threads and the monitor (as the monitor holds it) is
/// put to sleep the same way (its state is behind its lock).
impl<B: BlkBackend> Suspendable for Arc<BlkMmio<B>> {
    type Error = std::convert::Infallible;

    fn sleep(&mut self) -> Result<(), Self::Error> {
        self.sleep_device();
        Ok(())
    }

    fn wake(&mut self) {
        self.wake_device();
    }
}
