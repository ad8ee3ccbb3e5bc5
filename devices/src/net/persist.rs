//! Snapshots of a network card (`docs/net.md`, "Snapshots"): [`NetMmioState`] holds the
//! transport's registers, the device's live queues (as `VsockMmioState` does), the MAC and
//! the counters. Frames are not in it: TX is done before `QueueNotify` returns, so none is
//! in flight in the device at a cut, and frames waiting in the backend (the TAP's kernel
//! queue) are outside the device, as frames on a wire are outside a NIC: a restore in the
//! same process delivers them later (new arrivals, from the guest's point of view), a new
//! process opens its TAP afresh and they are lost (TCP retransmits).
//!
//! [`Suspendable`]: asleep, the card touches no guest memory (TX notified meanwhile waits,
//! RX is not done and the backend's fd is not to be polled) until woken.

use crate::GuestMemoryMmap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::device::Active;
use super::{format_mac, Net, NetBackend, NetError, NetMmio, NetStats, QUEUE_SIZE};
use crate::persist::{Persist, Suspendable};
use crate::virtio::mmio::{MmioArgs, MmioState, MmioTransport, QueueSnapshot};
use crate::virtio::Interrupt;

/// A network card, saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMmioState {
    /// The address the guest read from the config space.
    pub mac: [u8; 6],
    /// The virtio-mmio registers and the queue setup the driver wrote.
    pub transport: MmioState,
    /// The device's live queues (rx, tx), present exactly when the device is started.
    pub device_queues: Option<Vec<QueueSnapshot>>,
    /// The counters.
    pub stats: NetStats,
}

/// What a [`NetMmio`] restore needs besides its state.
pub struct NetMmioArgs<B> {
    /// The backend: the same TAP (a restore in the same process) or a new one.
    pub backend: B,
    /// The configured address; it must be the saved one (the guest knows it).
    pub mac: [u8; 6],
    /// The partition's restored guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub irq: Interrupt,
}

impl<B> std::fmt::Debug for NetMmioArgs<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetMmioArgs")
            .field("mac", &format_mac(&self.mac))
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend> Persist for NetMmio<B> {
    type State = NetMmioState;
    type ConstructorArgs = NetMmioArgs<B>;
    type Error = NetError;

    /// Take it while the partition is paused and the card asleep.
    fn save(&self) -> Result<NetMmioState, NetError> {
        let t = self.transport();
        let net = t.device();
        Ok(NetMmioState {
            mac: net.mac(),
            transport: t.save_state(),
            device_queues: net
                .active()
                .map(|a| vec![QueueSnapshot::of(&a.rx), QueueSnapshot::of(&a.tx)]),
            stats: net.stats(),
        })
    }

    /// The card as saved, validated (MAC, registers, queue sizes, rings inside `mem`); a
    /// started device comes back started with its queues where they were, without being
    /// activated again.
    fn restore(args: NetMmioArgs<B>, state: &NetMmioState) -> Result<Self, NetError> {
        let NetMmioArgs {
            backend,
            mac,
            mem,
            irq,
        } = args;
        if state.mac != mac {
            return Err(NetError::InvalidState(format!(
                "the card was saved with MAC {}, not {}",
                format_mac(&state.mac),
                format_mac(&mac)
            )));
        }
        let irq = Arc::new(irq);
        let active = match (state.transport.active, &state.device_queues) {
            (true, Some(saved)) if saved.len() == 2 => {
                let queues = saved
                    .iter()
                    .enumerate()
                    .map(|(i, q)| q.to_queue(i, QUEUE_SIZE, Some(&mem)))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut queues = queues.into_iter();
                let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
                    return Err(NetError::InvalidState("two queues expected".into()));
                };
                if !rx.ready() || !tx.ready() {
                    return Err(NetError::InvalidState(
                        "a started card's queue is not ready".into(),
                    ));
                }
                Some(Active {
                    mem: mem.clone(),
                    rx,
                    tx,
                    irq: irq.clone(),
                })
            }
            (false, None) => None,
            _ => {
                return Err(NetError::InvalidState(
                    "the card's queues do not match its started state".into(),
                ))
            }
        };
        let device = Net::restored(backend, mac, state.stats, active);
        let transport =
            MmioTransport::restore_state(MmioArgs { device, mem, irq }, &state.transport)?;
        NetMmio::from_transport(transport)
    }
}

impl<B: NetBackend> NetMmio<B> {
    fn sleep_card(&self) {
        self.transport().device_mut().sleep();
    }

    fn wake_card(&self) {
        self.with(|t| t.device_mut().wake());
    }
}

impl<B: NetBackend> Suspendable for NetMmio<B> {
    type Error = std::convert::Infallible;

    fn sleep(&mut self) -> Result<(), Self::Error> {
        self.sleep_card();
        Ok(())
    }

    fn wake(&mut self) {
        self.wake_card();
    }
}

/// A card shared between the vCPU threads and the event loop (as the monitor holds it) is
/// put to sleep the same way (its state is behind its lock).
impl<B: NetBackend> Suspendable for Arc<NetMmio<B>> {
    type Error = std::convert::Infallible;

    fn sleep(&mut self) -> Result<(), Self::Error> {
        self.sleep_card();
        Ok(())
    }

    fn wake(&mut self) {
        self.wake_card();
    }
}
