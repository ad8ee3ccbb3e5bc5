//! Tests of the disk device: a [`Disk`] is a [`BlkMmio`] over an in-memory [`MemDisk`] with
//! a hand-written driver that lays out its ring in guest memory and can offer any chain,
//! malformed ones included; `driver_tests` runs the real virtio-drivers `VirtIOBlk` against
//! the device over a [`DiskFile`]; `file_tests` the file backend on its own.

mod driver_tests;
mod file_tests;
mod hal;
mod malformed_tests;
mod persist_tests;
mod request_tests;

use crate::GuestMemoryMmap;
use std::collections::HashMap;
use std::path::PathBuf;
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

/// Guest memory of a disk's driver.
const MEM_SIZE: usize = 4 << 20;
/// The size the driver gives the queue.
const QSIZE: u16 = 64;
/// Where the descriptor table is; the available ring is 0x1000 above, the used ring 0x2000
/// above.
const QBASE: u64 = 0x1_0000;
/// Where data buffers start.
const BUF_START: u64 = 0x10_0000;
/// The ID the test disks answer.
pub(super) const ID: &str = "duplex-test-disk";
/// The test disks' size: 1 MiB (2048 sectors, 256 dirty blocks).
pub(super) const DISK_LEN: usize = 1 << 20;

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

/// A fresh directory for a test's files.
pub(super) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duplex-blk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `len` bytes of a pattern seeded by `seed`.
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A request header.
pub(super) fn hdr(type_: u32, sector: u64) -> [u8; REQ_HDR_LEN] {
    let mut h = [0u8; REQ_HDR_LEN];
    h[..4].copy_from_slice(&type_.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A chain: `(address, length, device-writable)` per descriptor.
pub(super) type Chain = Vec<(u64, u32, bool)>;

/// The driver's side: its memory and ring state, the disk's contents, the interrupt.
#[derive(Clone)]
pub(super) struct Driver {
    pub mem: GuestMemoryMmap,
    pub backend: MemDisk,
    pub wakes: Arc<AtomicUsize>,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
    /// Offered chains by head: their buffers.
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

/// A disk device (over an in-memory disk unless said otherwise) and its driver.
pub(super) struct Disk<B: BlkBackend = MemDisk> {
    pub mmio: Arc<BlkMmio<B>>,
    pub drv: Driver,
}

/// What a request got back: its status byte, the used length, the bytes the device wrote
/// before the status.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Done {
    pub status: u8,
    pub used: u32,
    pub data: Vec<u8>,
}

impl Disk {
    /// A device (not started) over a zeroed in-memory disk of [`DISK_LEN`] bytes.
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let backend = MemDisk::new(DISK_LEN);
        let (irq, wakes) = counted_irq();
        let mmio = Arc::new(BlkMmio::new(backend.clone(), ID, mem.clone(), irq).unwrap());
        Disk {
            mmio,
            drv: Driver {
                mem,
                backend,
                wakes,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                next_buf: BUF_START,
                chains: HashMap::new(),
            },
        }
    }

    /// A device whose driver has started it, negotiating everything offered.
    pub fn started() -> Self {
        let mut d = Disk::new();
        d.init(F_FLUSH | F_BLK_SIZE);
        d
    }

    /// The same driver in front of another device over `backend` (not started); the
    /// in-memory disk of the driver's side is then not the device's.
    pub fn with_backend<B: BlkBackend>(self, backend: B) -> Disk<B> {
        let (irq, wakes) = counted_irq();
        let mmio = BlkMmio::new(backend, ID, self.drv.mem.clone(), irq).unwrap();
        let mut drv = self.drv;
        drv.wakes = wakes;
        Disk {
            mmio: Arc::new(mmio),
            drv,
        }
    }
}

impl<B: BlkBackend> Disk<B> {
    pub fn reg_read(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(offset, &mut b);
        u32::from_le_bytes(b)
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

    /// Negotiates `VERSION_1 | features`, sets up the queue, sets `DRIVER_OK`.
    pub fn init(&mut self, features: u64) {
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.reg_write(reg::STATUS, 0);
        self.reg_write(reg::STATUS, s);
        let features = (1u64 << VIRTIO_F_VERSION_1) | features;
        for sel in 0..2 {
            self.reg_write(reg::DRIVER_FEATURES_SEL, sel);
            self.reg_write(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.reg_write(reg::STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        self.reg_write(reg::QUEUE_SEL, 0);
        self.reg_write(reg::QUEUE_NUM, u32::from(QSIZE));
        self.reg_write(reg::QUEUE_DESC_LOW, QBASE as u32);
        self.reg_write(reg::QUEUE_DRIVER_LOW, (QBASE + 0x1000) as u32);
        self.reg_write(reg::QUEUE_DEVICE_LOW, (QBASE + 0x2000) as u32);
        self.reg_write(reg::QUEUE_READY, 1);
        self.reg_write(
            reg::STATUS,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(self.reg_read(reg::STATUS) & 0x4f, 0xf, "device started");
    }

    /// A buffer of `len` bytes in guest memory, filled with 0xee (so that what the device
    /// did not write shows).
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.drv.next_buf;
        self.drv.next_buf = (addr + u64::from(len) + 15) & !15;
        assert!(self.drv.next_buf < MEM_SIZE as u64, "out of buffer memory");
        self.drv
            .mem
            .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// A buffer holding `bytes`.
    pub fn put(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.alloc(bytes.len() as u32);
        self.drv.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Offers `chain`, not notified; returns its head.
    pub fn push(&mut self, chain: &[(u64, u32, bool)]) -> u16 {
        let d = &mut self.drv;
        let idxs: Vec<u16> = chain
            .iter()
            .map(|_| {
                let i = d.next_desc;
                d.next_desc = (i + 1) % QSIZE;
                i
            })
            .collect();
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = idxs.get(i + 1).copied().unwrap_or(0);
            if i + 1 < idxs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = GuestAddress(QBASE + 16 * u64::from(idxs[i]));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            d.mem.write_slice(&raw, at).unwrap();
        }
        let avail = QBASE + 0x1000;
        let slot = u64::from(d.avail_idx % QSIZE);
        d.mem
            .write_obj(idxs[0], GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        d.avail_idx = d.avail_idx.wrapping_add(1);
        d.mem
            .write_obj(d.avail_idx, GuestAddress(avail + 2))
            .unwrap();
        d.chains
            .insert(idxs[0], chain.iter().map(|&(a, l, _)| (a, l)).collect());
        idxs[0]
    }

    pub fn notify(&self) {
        self.reg_write(reg::QUEUE_NOTIFY, u32::from(REQUEST_QUEUE));
    }

    /// New used entries: (buffers of the chain, used length).
    pub fn used(&mut self) -> Vec<(Vec<(u64, u32)>, u32)> {
        let d = &mut self.drv;
        let ring = QBASE + 0x2000;
        let idx: u16 = d.mem.read_obj(GuestAddress(ring + 2)).unwrap();
        let mut out = Vec::new();
        while d.used_seen != idx {
            let slot = u64::from(d.used_seen % QSIZE);
            let id: u32 = d.mem.read_obj(GuestAddress(ring + 4 + 8 * slot)).unwrap();
            let len: u32 = d.mem.read_obj(GuestAddress(ring + 8 + 8 * slot)).unwrap();
            d.used_seen = d.used_seen.wrapping_add(1);
            let bufs = d
                .chains
                .remove(&(id as u16))
                .expect("used head was offered");
            out.push((bufs, len));
        }
        out
    }

    /// Offers `chain` whose last writable byte is the status, notifies, and returns what
    /// came back: the status, the used length, and the writable bytes before the status.
    pub fn submit(&mut self, chain: &[(u64, u32, bool)]) -> Done {
        self.push(chain);
        self.notify();
        let used = self.used();
        assert_eq!(used.len(), 1, "one request, one used entry");
        let len = used[0].1;
        let mut writable = Vec::new();
        for &(a, l, w) in chain {
            if w {
                // A buffer outside guest memory (a malformed chain) reads as zeros.
                let mut b = vec![0u8; l as usize];
                let _ = self.drv.mem.read_slice(&mut b, GuestAddress(a));
                writable.extend(b);
            }
        }
        let status = writable.pop().expect("a status byte");
        Done {
            status,
            used: len,
            data: writable,
        }
    }

    /// The chain of a write of `data` at `sector`: header, the data in `pieces`
    /// descriptors, status (not offered).
    pub fn write_chain(&mut self, sector: u64, data: &[u8], pieces: usize) -> Chain {
        let mut chain = vec![(self.put(&hdr(req::OUT, sector)), REQ_HDR_LEN as u32, false)];
        let step = data.len().div_ceil(pieces.max(1)).max(1);
        for part in data.chunks(step) {
            chain.push((self.put(part), part.len() as u32, false));
        }
        chain.push((self.alloc(1), 1, true));
        chain
    }

    /// Writes `data` at `sector` ([`write_chain`](Self::write_chain)).
    pub fn write(&mut self, sector: u64, data: &[u8], pieces: usize) -> Done {
        let chain = self.write_chain(sector, data, pieces);
        self.submit(&chain)
    }

    /// Reads `len` bytes at `sector` into `pieces` descriptors.
    pub fn read(&mut self, sector: u64, len: usize, pieces: usize) -> Done {
        let mut chain = vec![(self.put(&hdr(req::IN, sector)), REQ_HDR_LEN as u32, false)];
        let step = len.div_ceil(pieces.max(1)).max(1);
        let mut left = len;
        while left > 0 {
            let n = left.min(step);
            chain.push((self.alloc(n as u32), n as u32, true));
            left -= n;
        }
        chain.push((self.alloc(1), 1, true));
        self.submit(&chain)
    }

    /// A request without data (`FLUSH`, or any type): header and status.
    pub fn bare(&mut self, type_: u32, sector: u64) -> Done {
        let h = self.put(&hdr(type_, sector));
        let s = self.alloc(1);
        self.submit(&[(h, REQ_HDR_LEN as u32, false), (s, 1, true)])
    }

    /// Interrupts raised so far.
    pub fn irqs(&self) -> usize {
        self.drv.wakes.load(Ordering::SeqCst)
    }
}
