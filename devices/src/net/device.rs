//! The virtio-net device behind the transport ([`Net`]): TX on the guest's notification,
//! RX when the owner calls [`Net::process_rx`], counters, and the state a snapshot takes.
//!
//! Guest input is never trusted: a chain that cannot carry a frame (too short for the
//! header, device-writable where the device reads or the reverse, outside guest memory, a
//! TX header asking for offloads that were not negotiated) is returned with length 0 and
//! counted; nothing the guest writes makes the device panic.

use crate::GuestMemoryMmap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::chain::{gather, scatter_room, write_frame};
use super::{
    NetBackend, NetHdr, NetStats, CONFIG_LEN, DEVICE_ID, F_MAC, F_STATUS, MAX_FRAME_LEN,
    NET_HDR_LEN, QUEUE_SIZE, RX_QUEUE, STATUS_LINK_UP, TX_QUEUE,
};
use crate::virtio::{ActivateError, Interrupt, VirtioDevice};

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// A header and the longest frame.
const BUF_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

/// The started device's resources.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub irq: Arc<Interrupt>,
}

/// A virtio-net device over backend `B`.
#[derive(Debug)]
pub struct Net<B> {
    mac: [u8; 6],
    backend: B,
    active: Option<Active>,
    stats: NetStats,
    /// The guest has RX buffers (as far as the device last looked, or since it notified).
    rx_avail: bool,
    /// A used ring was written: the owner raises the interrupt ([`take_irq`](Self::take_irq)).
    irq_pending: bool,
    /// Asleep (nested count): nothing touches guest memory; notifications wait.
    asleep: u32,
    /// The guest notified TX while asleep.
    tx_waiting: bool,
    /// The partition sleeps (power saving): frames are read from the backend only to look
    /// for its magic packet ([`super::wol::drain`]), never delivered to the guest.
    watching: bool,
    /// Scratch buffers for one frame each way.
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl<B: NetBackend> Net<B> {
    /// A device with address `mac` over `backend`, not started.
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        Net {
            mac,
            backend,
            active: None,
            stats: NetStats::default(),
            rx_avail: false,
            irq_pending: false,
            asleep: 0,
            tx_waiting: false,
            watching: false,
            rx_buf: vec![0; BUF_LEN],
            tx_buf: vec![0; BUF_LEN],
        }
    }

    /// A restored device: started with `active` (its live queues) or not, counters as saved.
    pub(super) fn restored(
        backend: B,
        mac: [u8; 6],
        stats: NetStats,
        active: Option<Active>,
    ) -> Self {
        let mut net = Net::new(backend, mac);
        net.stats = stats;
        net.active = active;
        net.rx_avail = net.rx_has_buffers();
        net
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub(super) fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    /// Whether the backend's fd should be polled: started, awake, RX buffers available;
    /// or, while the partition sleeps, awake (not held for a snapshot) whatever the guest's
    /// buffers.
    pub fn wants_rx_poll(&self) -> bool {
        if self.watching {
            return self.asleep == 0;
        }
        self.active.is_some() && self.rx_avail && self.asleep == 0
    }

    /// Whether the card watches for a magic packet (the partition sleeps).
    pub fn watching(&self) -> bool {
        self.watching
    }

    /// Starts or stops watching for a magic packet. Stopping looks at the guest's RX
    /// buffers again: frames go to the guest from then on.
    pub fn set_watching(&mut self, on: bool) {
        if self.watching && !on {
            self.rx_avail = self.rx_has_buffers();
        }
        self.watching = on;
    }

    /// While watching: reads and drops up to `budget` frames until one is a magic packet for
    /// this card, which ends the watch ([`super::wol::drain`]). Nothing is read while the
    /// card is held asleep for a snapshot, or when it does not watch.
    pub fn watch_batch(&mut self, budget: usize) -> super::wol::Drained {
        use super::wol::{drain, Drained};
        if !self.watching || self.asleep > 0 {
            return Drained::Empty;
        }
        let result = drain(
            &mut self.backend,
            &mut self.rx_buf,
            self.mac,
            budget,
            &mut self.stats,
        );
        if result == Drained::Woke {
            self.set_watching(false);
        }
        result
    }

    /// The interrupt to raise, if a used ring was written since the last call. The owner
    /// raises it after releasing its lock.
    pub fn take_irq(&mut self) -> Option<Arc<Interrupt>> {
        if !std::mem::take(&mut self.irq_pending) {
            return None;
        }
        self.active.as_ref().map(|a| a.irq.clone())
    }

    /// Stops touching guest memory until the matching [`wake`](Self::wake) (nested).
    pub fn sleep(&mut self) {
        self.asleep += 1;
    }

    /// One sleep fewer; at the last, what waited is done (TX notified meanwhile, frames
    /// that arrived in the backend).
    pub fn wake(&mut self) {
        self.asleep = self.asleep.saturating_sub(1);
        if self.asleep > 0 {
            return;
        }
        if std::mem::take(&mut self.tx_waiting) {
            self.process_tx();
        }
        self.rx_avail = self.rx_has_buffers();
        self.process_rx();
    }

    fn rx_has_buffers(&self) -> bool {
        self.active.as_ref().is_some_and(|a| {
            a.rx.avail_idx(&a.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != a.rx.next_avail())
        })
    }

    /// The guest added RX buffers (its notification of the rx queue, which it sends only
    /// while the device ran dry). The frames are not moved here, on the vCPU thread, but by
    /// the owner's loop ([`NetMmio::process_rx`](super::NetMmio::process_rx) on its own
    /// thread, which the card tells: [`wants_rx_poll`](Self::wants_rx_poll) turns true):
    /// the notification is a short exit, and the device asks for no more until it runs dry
    /// again, so a guest that gives buffers back one at a time (virtio-drivers) costs one
    /// exit per dry spell, not one per buffer.
    fn rx_refilled(&mut self) {
        self.rx_avail = true;
        if self.asleep > 0 {
            return;
        }
        if let Some(Active { mem, rx, .. }) = &mut self.active {
            if rx.disable_notification(&*mem).is_err() {
                self.stats.malformed_rx += 1;
            }
        }
    }

    /// Sends every frame the guest put in the TX queue.
    pub fn process_tx(&mut self) {
        if self.asleep > 0 {
            self.tx_waiting = true;
            return;
        }
        let Net {
            active: Some(Active { mem, tx, .. }),
            backend,
            stats,
            tx_buf,
            irq_pending,
            ..
        } = self
        else {
            return;
        };
        // Bounded: another vCPU of the guest may keep adding chains.
        for _ in 0..usize::from(tx.size()) * 2 {
            let chain = match tx.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::debug!("net: TX queue: {e}");
                    stats.malformed_tx += 1;
                    None
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            match gather(mem, chain, tx_buf) {
                Ok(len) => {
                    let frame = tx_buf.get(NET_HDR_LEN..len).unwrap_or_default();
                    // Nothing was negotiated that the header could carry: the backend gets
                    // an empty one.
                    match backend.send(&NetHdr::default().to_bytes(), frame) {
                        Ok(()) => {
                            stats.tx_frames += 1;
                            stats.tx_bytes += frame.len() as u64;
                        }
                        Err(e) => {
                            if e.kind() != io::ErrorKind::WouldBlock {
                                log::debug!("net: backend send: {e}");
                                stats.backend_errors += 1;
                            }
                            stats.tx_dropped += 1;
                        }
                    }
                }
                Err(e) => {
                    log::debug!("net: malformed TX chain: {e}");
                    stats.malformed_tx += 1;
                }
            }
            match tx.add_used(&*mem, head, 0) {
                Ok(()) => *irq_pending = true,
                Err(_) => stats.malformed_tx += 1,
            }
        }
    }

    /// Moves frames from the backend into the guest's RX buffers, as far as there are
    /// buffers; a frame is read from the backend only once a buffer waits for it.
    pub fn process_rx(&mut self) {
        let budget = self
            .active
            .as_ref()
            .map_or(0, |a| usize::from(a.rx.size()) * 4);
        self.process_rx_batch(budget);
    }

    /// [`process_rx`](Self::process_rx) for at most `budget` RX chains; true if it stopped
    /// at the budget (buffers and frames may remain), false if it ran out of either.
    pub fn process_rx_batch(&mut self, budget: usize) -> bool {
        if self.asleep > 0 || self.watching {
            return false;
        }
        let Net {
            active: Some(Active { mem, rx, .. }),
            backend,
            stats,
            rx_buf,
            rx_avail,
            irq_pending,
            ..
        } = self
        else {
            return false;
        };
        // Bounded: a flooding backend yields to the owner's loop (its fd stays readable).
        for _ in 0..budget {
            let chain = match rx.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::debug!("net: RX queue: {e}");
                    stats.malformed_rx += 1;
                    *rx_avail = false;
                    return false;
                }
            };
            let Some(chain) = chain else {
                // Out of buffers: ask the guest to say when it adds some; look once more in
                // case it did meanwhile.
                match rx.enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => *rx_avail = false,
                    Err(_) => {
                        stats.malformed_rx += 1;
                        *rx_avail = false;
                    }
                }
                return false;
            };
            let head = chain.head_index();
            let room = match scatter_room(mem, chain) {
                Ok(room) => room,
                Err(e) => {
                    log::debug!("net: malformed RX chain: {e}");
                    stats.malformed_rx += 1;
                    match rx.add_used(&*mem, head, 0) {
                        Ok(()) => *irq_pending = true,
                        Err(_) => stats.malformed_rx += 1,
                    }
                    continue;
                }
            };
            let len = match backend.recv(rx_buf) {
                Ok(len) => len,
                Err(e) => {
                    // The buffer goes back to the ring for the next frame.
                    rx.go_to_previous_position();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        // Buffers wait and the backend is polled: no need for the guest's
                        // notifications.
                        let _ = rx.disable_notification(&*mem);
                    } else {
                        log::debug!("net: backend recv: {e}");
                        stats.backend_errors += 1;
                    }
                    return false;
                }
            };
            let total: usize = room.iter().map(|r| r.1).sum();
            if len < NET_HDR_LEN || len > total {
                stats.rx_dropped += 1;
                rx.go_to_previous_position();
                continue;
            }
            let frame = rx_buf.get(NET_HDR_LEN..len).unwrap_or_default();
            let used = match write_frame(mem, &room, frame) {
                Ok(()) => {
                    stats.rx_frames += 1;
                    stats.rx_bytes += frame.len() as u64;
                    len as u32
                }
                Err(e) => {
                    log::debug!("net: malformed RX chain: {e}");
                    stats.malformed_rx += 1;
                    stats.rx_dropped += 1;
                    0
                }
            };
            match rx.add_used(&*mem, head, used) {
                Ok(()) => *irq_pending = true,
                Err(_) => stats.malformed_rx += 1,
            }
        }
        true
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        config[6..].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::Device("net: two queues expected".into()));
        };
        for (q, index) in [(&rx, RX_QUEUE), (&tx, TX_QUEUE)] {
            if !q.ready() {
                return Err(ActivateError::BadQueue(index));
            }
        }
        self.active = Some(Active { mem, rx, tx, irq });
        self.rx_avail = self.rx_has_buffers();
        self.irq_pending = false;
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        match index {
            RX_QUEUE => self.rx_refilled(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_avail = false;
        self.irq_pending = false;
        self.tx_waiting = false;
    }
}
