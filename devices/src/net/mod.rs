//! virtio-net for partitions (`docs/net.md`): an Ethernet NIC (device ID 1) on the
//! virtio-mmio transport, whose other end is a [`NetBackend`] — a host TAP device ([`Tap`])
//! or, for tests, an in-memory [`pair`].
//!
//! - Queues: rx = 0, tx = 1 (no control queue, one queue pair). Features offered: `MAC` and
//!   `STATUS` (the transport adds `VERSION_1`): no offloads, no mergeable buffers, exactly
//!   what virtio-drivers 0.13 takes. Config space: `mac[6]`, `status` u16 (`LINK_UP`).
//! - Every buffer starts with the 12-byte `virtio_net_hdr_v1` ([`NetHdr`]).
//! - TX runs inline on the `QueueNotify` of the tx queue; RX runs when the owner calls
//!   [`NetMmio::process_rx`] because the backend's fd ([`NetMmio::backend_fd`]) is readable,
//!   and on the guest's `QueueNotify` of the rx queue. The owner polls that fd only while
//!   [`NetMmio::wants_rx_poll`] says so (while the guest has RX buffers): a frame with no
//!   buffer to go to stays in the backend (the TAP's kernel queue), and a level-triggered fd
//!   is not left to spin. The card writes an eventfd ([`NetMmio::rx_poll_fd`]) when that
//!   turns true on another thread; [`NetPoller`] is the card's subscriber on the device
//!   event loop ([`crate::event_loop`]) that does all this.
//! - Counters: [`NetStats`]. Snapshots: [`NetMmio`] implements
//!   [`Persist`](crate::persist::Persist) ([`NetMmioState`]) and
//!   [`Suspendable`](crate::persist::Suspendable).

mod backend;
mod chain;
mod device;
mod persist;
mod poller;
mod tap;
pub mod wire;
pub mod wol;

#[cfg(test)]
mod tests;

use crate::GuestMemoryMmap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::virtio::mmio::{MmioError, MmioTransport};
use crate::virtio::Interrupt;
use vmm_sys_util::eventfd::EventFd;

pub use backend::{pair, NetBackend, PairBackend, PairPeer};
pub use device::Net;
pub use persist::{NetMmioArgs, NetMmioState};
pub use poller::NetPoller;
pub use tap::{name_ok as tap_name_ok, Tap, TapError};

/// The virtio device ID of a network card.
pub const DEVICE_ID: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Frames [`NetMmio::process_rx`] moves per hold of the card's lock.
pub const RX_BATCH: usize = 8;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the config space holds the link status.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
pub const STATUS_LINK_UP: u16 = 1;
/// Length of the device configuration space (`mac`, `status`).
pub const CONFIG_LEN: usize = 8;
/// Length of `virtio_net_hdr_v1` (`num_buffers` included, as with `VERSION_1`).
pub const NET_HDR_LEN: usize = 12;
/// The longest frame (without the header) the device carries either way.
pub const MAX_FRAME_LEN: usize = 65535;
/// An Ethernet header (destination, source, EtherType): the shortest frame sent.
pub const ETH_HDR_LEN: usize = 14;

/// `virtio_net_hdr_v1` (virtio 1.2 §5.1.6), little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    /// The header the device puts before every received frame: no checksum or GSO
    /// information (none was negotiated), one buffer.
    pub const RX: NetHdr = NetHdr {
        flags: 0,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 1,
    };

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// A header read from its bytes.
    pub fn from_bytes(b: &[u8; NET_HDR_LEN]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

/// The device's counters (`status`). Frames are counted without their header, bytes are
/// the frames' bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames (and their bytes) delivered to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames (and their bytes) the guest sent that the backend took.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the backend that were dropped: longer than the guest's buffer, or
    /// shorter than a header.
    pub rx_dropped: u64,
    /// Frames from the guest the backend did not take (its queue full, the link down).
    pub tx_dropped: u64,
    /// Chains the guest offered that were returned unused (length 0): too short, of the
    /// wrong direction, outside guest memory, a frame with offload fields set.
    pub malformed_rx: u64,
    pub malformed_tx: u64,
    /// Backend reads or writes that failed other than with "would block".
    pub backend_errors: u64,
    /// Frames read and dropped while the partition slept (power saving): anything but a
    /// magic packet for this card ([`wol`]).
    #[serde(default)]
    pub asleep_dropped: u64,
    /// Magic packets for this card that woke the partition.
    #[serde(default)]
    pub wake_packets: u64,
}

/// Why a network device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address is multicast or all zeros.
    #[error("net: {0} is not a unicast MAC address")]
    BadMac(String),
    /// The transport could not be created or restored.
    #[error("net: {0}")]
    Mmio(#[from] MmioError),
    /// A saved state is not valid; nothing was built.
    #[error("net: invalid saved state: {0}")]
    InvalidState(String),
    /// The eventfd that tells the owner's loop to look again could not be made.
    #[error("net: eventfd: {0}")]
    EventFd(std::io::Error),
}

fn lock_hook(m: &Mutex<Option<WakeHook>>) -> MutexGuard<'_, Option<WakeHook>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `mac` may be a NIC's address: not multicast (nor broadcast), not all zeros.
pub fn mac_is_unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

/// What a sleeping partition's card calls when its magic packet arrives.
pub type WakeHook = Box<dyn FnOnce() + Send>;

/// A partition's network card: its virtio-mmio window (0x1000 bytes) in front of a
/// [`Net`] device. Register accesses come from vCPU threads, [`process_rx`](Self::process_rx)
/// from the owner's event loop; one lock serializes them, and interrupts are raised after
/// it is released.
pub struct NetMmio<B: NetBackend> {
    transport: Mutex<MmioTransport<Net<B>>>,
    /// Called (once, outside the card's lock) when a magic packet ends a watch.
    on_wake: Mutex<Option<WakeHook>>,
    /// Written when [`wants_rx_poll`](Self::wants_rx_poll) turns true (the guest added RX
    /// buffers, the card started or woke): the owner's loop watches it and looks again.
    rx_poll_changed: EventFd,
}

impl<B: NetBackend> std::fmt::Debug for NetMmio<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetMmio")
            .field("mac", &format_mac(&self.mac()))
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend> NetMmio<B> {
    /// A network card with address `mac` over `backend`, in guest memory `mem`, raising `irq`.
    pub fn new(
        backend: B,
        mac: [u8; 6],
        mem: GuestMemoryMmap,
        irq: Interrupt,
    ) -> Result<Self, NetError> {
        if !mac_is_unicast(&mac) {
            return Err(NetError::BadMac(format_mac(&mac)));
        }
        let transport = MmioTransport::new(Net::new(backend, mac), mem, Arc::new(irq))?;
        Self::from_transport(transport)
    }

    fn from_transport(transport: MmioTransport<Net<B>>) -> Result<Self, NetError> {
        Ok(NetMmio {
            transport: Mutex::new(transport),
            on_wake: Mutex::new(None),
            rx_poll_changed: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?,
        })
    }

    fn transport(&self) -> MutexGuard<'_, MmioTransport<Net<B>>> {
        self.transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the transport, then raises the interrupt the device asked for (outside
    /// the lock, so a partition's wake-up never runs under it).
    /// When [`wants_rx_poll`](Self::wants_rx_poll) turns true, writes the eventfd the
    /// owner's loop watches ([`rx_poll_fd`](Self::rx_poll_fd)).
    fn with<R>(&self, f: impl FnOnce(&mut MmioTransport<Net<B>>) -> R) -> R {
        let (result, irq, poll_now) = {
            let mut t = self.transport();
            let before = t.device().wants_rx_poll();
            let result = f(&mut t);
            let poll_now = !before && t.device().wants_rx_poll();
            (result, t.device_mut().take_irq(), poll_now)
        };
        if poll_now {
            if let Err(e) = self.rx_poll_changed.write(1) {
                log::warn!("net: telling the loop to poll: {e}");
            }
        }
        if let Some(irq) = irq {
            irq.trigger();
        }
        result
    }

    /// A guest read at `offset` within the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport().read(offset, data);
    }

    /// A guest write at `offset` within the window (a `QueueNotify` of tx sends at once; one
    /// of rx tells the loop, which moves the frames).
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.with(|t| t.write(offset, data));
    }

    /// Moves frames waiting in the backend into the guest's RX buffers, as far as buffers
    /// allow; frames with no buffer stay in the backend. Call it when the backend's fd is
    /// readable.
    ///
    /// Frames go in batches of [`RX_BATCH`], each under the card's lock on its own (and its
    /// interrupt raised after it): a vCPU sending a frame meanwhile (its notification takes
    /// the same lock) waits for one batch at most, not for the whole burst. At most
    /// 4 × [`QUEUE_SIZE`] frames per call, so a flooding backend yields to the loop.
    pub fn process_rx(&self) {
        for _ in 0..usize::from(QUEUE_SIZE) * 4 / RX_BATCH {
            if !self.with(|t| t.device_mut().process_rx_batch(RX_BATCH)) {
                break;
            }
        }
    }

    /// The partition sleeps: from now on the backend's frames are only searched for this
    /// card's magic packet and dropped ([`wol::drain`]); the first magic packet ends the
    /// watch and calls `on_wake` (on the owner's loop thread, outside the card's lock).
    /// Watching again replaces the hook.
    pub fn watch_for_magic(&self, on_wake: WakeHook) {
        *lock_hook(&self.on_wake) = Some(on_wake);
        self.with(|t| t.device_mut().set_watching(true));
    }

    /// Ends a watch without a magic packet (the partition was woken otherwise, or stops).
    pub fn stop_watch(&self) {
        lock_hook(&self.on_wake).take();
        self.with(|t| t.device_mut().set_watching(false));
    }

    /// Whether the card watches for its magic packet.
    pub fn watching(&self) -> bool {
        self.transport().device().watching()
    }

    /// Call when the backend's fd is readable: moves frames to the guest
    /// ([`process_rx`](Self::process_rx)) or, while the partition sleeps, reads a batch of
    /// at most [`wol::WATCH_BATCH`] frames looking for its magic packet. True when that
    /// batch was full: the owner should leave the backend alone for [`wol::WATCH_PAUSE`].
    pub fn poll_backend(&self) -> bool {
        if !self.watching() {
            self.process_rx();
            return false;
        }
        match self.with(|t| t.device_mut().watch_batch(wol::WATCH_BATCH)) {
            wol::Drained::Woke => {
                let hook = lock_hook(&self.on_wake).take();
                if let Some(hook) = hook {
                    hook();
                }
                false
            }
            wol::Drained::Budget => true,
            wol::Drained::Empty => false,
        }
    }

    /// Whether the owner should poll the backend's fd now: the device is started, awake,
    /// and the guest has RX buffers (or the partition sleeps and the card watches for its
    /// magic packet). Check again after every call into the device.
    pub fn wants_rx_poll(&self) -> bool {
        self.transport().device().wants_rx_poll()
    }

    /// The backend's fd, readable when a frame waits.
    pub fn backend_fd(&self) -> RawFd {
        self.transport().device().backend().raw_fd()
    }

    /// An eventfd (nonblocking) written whenever [`wants_rx_poll`](Self::wants_rx_poll) may
    /// have turned true on another thread; the owner's loop watches it, reads it
    /// ([`take_rx_poll_change`](Self::take_rx_poll_change)) and looks again.
    pub fn rx_poll_fd(&self) -> RawFd {
        self.rx_poll_changed.as_raw_fd()
    }

    /// Resets [`rx_poll_fd`](Self::rx_poll_fd); call it before looking at
    /// [`wants_rx_poll`](Self::wants_rx_poll), so that a change after the look is not lost.
    pub fn take_rx_poll_change(&self) {
        // Nothing to read is fine: it was already taken.
        let _ = self.rx_poll_changed.read();
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.transport().device().stats()
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.transport().device().mac()
    }

    /// Register accesses the transport ignored (misaligned, wrong size, unknown).
    pub fn bad_accesses(&self) -> u64 {
        self.transport().bad_accesses()
    }
}
