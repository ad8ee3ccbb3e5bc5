//! Tests of the network card: a [`Card`] is a [`NetMmio`] over an in-memory [`pair`] with a
//! hand-written driver that lays out its rings in guest memory and can offer any chain,
//! malformed ones included; `driver_tests` runs the real virtio-drivers `VirtIONet` against
//! the card; `tap_tests` a real TAP in a network namespace of its own.

mod device_tests;
mod driver_tests;
mod hal;
mod persist_tests;
mod poller_tests;
mod tap_tests;

use crate::GuestMemoryMmap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::mmio::reg;

/// Guest memory of a card's driver.
const MEM_SIZE: usize = 4 << 20;
/// The size the driver gives both queues.
const QSIZE: u16 = 64;
/// Where each queue's descriptor table is; its available ring is 0x1000 above, its used
/// ring 0x2000 above.
const QBASE: [u64; 2] = [0x1_0000, 0x2_0000];
/// Where data buffers start.
const BUF_START: u64 = 0x10_0000;
pub(super) const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// An interrupt whose wake-ups are counted.
pub(super) fn counted_irq() -> (Interrupt, Arc<AtomicUsize>) {
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = wakes.clone();
    let irq = Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }),
    );
    (irq, wakes)
}

/// An Ethernet frame of `len` bytes: to the card, from a peer, EtherType 0x88b5, then a
/// pattern seeded by `seed`.
pub(super) fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f.truncate(len);
    f
}

/// The driver's side: its memory and ring state, the far end of the link, the interrupt.
#[derive(Clone)]
pub(super) struct Driver {
    pub mem: GuestMemoryMmap,
    pub backend: PairBackend,
    pub peer: PairPeer,
    pub wakes: Arc<AtomicUsize>,
    next_desc: [u16; 2],
    avail_idx: [u16; 2],
    used_seen: [u16; 2],
    next_buf: u64,
    /// Offered chains by head: their buffers.
    chains: [HashMap<u16, Vec<(u64, u32)>>; 2],
}

/// A network card and its driver.
pub(super) struct Card {
    pub mmio: Arc<NetMmio<PairBackend>>,
    pub drv: Driver,
}

impl Card {
    /// A card (not started) whose backend holds up to `capacity` sent frames.
    pub fn new(capacity: usize) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (backend, peer) = pair(capacity).unwrap();
        let (irq, wakes) = counted_irq();
        let mmio = Arc::new(NetMmio::new(backend.clone(), MAC, mem.clone(), irq).unwrap());
        Card {
            mmio,
            drv: Driver {
                mem,
                backend,
                peer,
                wakes,
                next_desc: [0; 2],
                avail_idx: [0; 2],
                used_seen: [0; 2],
                next_buf: BUF_START,
                chains: [HashMap::new(), HashMap::new()],
            },
        }
    }

    /// A card whose driver has started it.
    pub fn started(capacity: usize) -> Self {
        let mut c = Card::new(capacity);
        c.init();
        c
    }

    pub fn reg_read(&self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.mmio.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    pub fn reg_write(&self, offset: u64, value: u32) {
        self.mmio.write(offset, &value.to_le_bytes());
    }

    /// Features read from the device.
    pub fn device_features(&self) -> u64 {
        self.reg_write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.reg_read(reg::DEVICE_FEATURES);
        self.reg_write(reg::DEVICE_FEATURES_SEL, 1);
        u64::from(low) | (u64::from(self.reg_read(reg::DEVICE_FEATURES)) << 32)
    }

    /// Negotiates `VERSION_1 | MAC | STATUS`, sets up both queues, sets `DRIVER_OK`.
    pub fn init(&mut self) {
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.reg_write(reg::STATUS, 0);
        self.reg_write(reg::STATUS, s);
        let features = (1u64 << VIRTIO_F_VERSION_1) | F_MAC | F_STATUS;
        for sel in 0..2 {
            self.reg_write(reg::DRIVER_FEATURES_SEL, sel);
            self.reg_write(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.reg_write(reg::STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        for (q, base) in QBASE.iter().enumerate() {
            self.reg_write(reg::QUEUE_SEL, q as u32);
            self.reg_write(reg::QUEUE_NUM, u32::from(QSIZE));
            self.reg_write(reg::QUEUE_DESC_LOW, *base as u32);
            self.reg_write(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            self.reg_write(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            self.reg_write(reg::QUEUE_READY, 1);
        }
        self.reg_write(
            reg::STATUS,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(self.reg_read(reg::STATUS) & 0x4f, 0xf, "device started");
    }

    /// A buffer of `len` bytes in guest memory.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.drv.next_buf;
        self.drv.next_buf = (addr + u64::from(len) + 15) & !15;
        assert!(self.drv.next_buf < MEM_SIZE as u64, "out of buffer memory");
        addr
    }

    /// A buffer holding `bytes`.
    pub fn put(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.alloc(bytes.len() as u32);
        self.drv.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Offers a chain of `(address, length, device-writable)` on queue `q`, not notified.
    pub fn push(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> u16 {
        let d = &mut self.drv;
        let idxs: Vec<u16> = descs
            .iter()
            .map(|_| {
                let i = d.next_desc[q];
                d.next_desc[q] = (i + 1) % QSIZE;
                i
            })
            .collect();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = idxs.get(i + 1).copied().unwrap_or(0);
            if i + 1 < idxs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = GuestAddress(QBASE[q] + 16 * u64::from(idxs[i]));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            d.mem.write_slice(&raw, at).unwrap();
        }
        let avail = QBASE[q] + 0x1000;
        let slot = u64::from(d.avail_idx[q] % QSIZE);
        d.mem
            .write_obj(idxs[0], GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        d.avail_idx[q] = d.avail_idx[q].wrapping_add(1);
        d.mem
            .write_obj(d.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
        d.chains[q].insert(idxs[0], descs.iter().map(|&(a, l, _)| (a, l)).collect());
        idxs[0]
    }

    pub fn notify(&self, q: u16) {
        self.reg_write(reg::QUEUE_NOTIFY, u32::from(q));
    }

    /// New used entries of queue `q`: (buffers of the chain, used length).
    pub fn used(&mut self, q: usize) -> Vec<(Vec<(u64, u32)>, u32)> {
        let d = &mut self.drv;
        let ring = QBASE[q] + 0x2000;
        let idx: u16 = d.mem.read_obj(GuestAddress(ring + 2)).unwrap();
        let mut out = Vec::new();
        while d.used_seen[q] != idx {
            let slot = u64::from(d.used_seen[q] % QSIZE);
            let id: u32 = d.mem.read_obj(GuestAddress(ring + 4 + 8 * slot)).unwrap();
            let len: u32 = d.mem.read_obj(GuestAddress(ring + 8 + 8 * slot)).unwrap();
            d.used_seen[q] = d.used_seen[q].wrapping_add(1);
            let bufs = d.chains[q]
                .remove(&(id as u16))
                .expect("used head was offered");
            out.push((bufs, len));
        }
        out
    }

    /// Sends `frame` (header and frame in two descriptors); returns the used lengths.
    pub fn send(&mut self, frame: &[u8]) -> Vec<u32> {
        let h = self.put(&NetHdr::default().to_bytes());
        let f = self.put(frame);
        self.push(
            1,
            &[
                (h, NET_HDR_LEN as u32, false),
                (f, frame.len() as u32, false),
            ],
        );
        self.notify(1);
        self.used(1).into_iter().map(|(_, len)| len).collect()
    }

    /// Offers `n` RX buffers of `size` bytes each and notifies.
    pub fn add_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let a = self.alloc(size);
            self.push(0, &[(a, size, true)]);
        }
        self.notify(0);
    }

    /// Frames the device put in RX buffers since the last call (empty ones as `None`);
    /// checks each header.
    pub fn recv(&mut self) -> Vec<Option<Vec<u8>>> {
        let mut out = Vec::new();
        for (bufs, len) in self.used(0) {
            if len == 0 {
                out.push(None);
                continue;
            }
            let mut bytes = Vec::new();
            for (a, l) in bufs {
                let mut b = vec![0u8; l as usize];
                self.drv.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                bytes.extend(b);
            }
            bytes.truncate(len as usize);
            assert_eq!(bytes[..NET_HDR_LEN], NetHdr::RX.to_bytes(), "RX header");
            out.push(Some(bytes.split_off(NET_HDR_LEN)));
        }
        out
    }

    /// Interrupts raised so far.
    pub fn irqs(&self) -> usize {
        self.drv.wakes.load(Ordering::SeqCst)
    }
}
