//! Tests of the vsock switch with mock guests: each [`MockGuest`] drives its partition's
//! virtio-mmio window like a driver would (feature negotiation, queue setup through the
//! registers) and lays out its queues with virtio-queue's `MockSplitQueue`.
//!
//! `MockSplitQueue` 0.18 puts the used ring `len` bytes after the available ring's entries
//! instead of `2 * len`, so for 256-entry queues the two overlap; the mock guest keeps the
//! mock's descriptor table and available ring and places each used ring itself.

mod driver_tests;
mod hardening_tests;
mod host_tests;
mod persist_host_tests;
mod persist_tests;
mod switch_tests;

use crate::GuestMemoryMmap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{Endpoint, Hdr, HDR_SIZE};
use super::{VsockError, VsockMmio, VsockMmioState, VsockSwitch, QUEUE_SIZE};
use crate::persist::Persist;
use crate::virtio::mmio::reg;
use crate::virtio::Interrupt;

/// Guest memory of a mock guest.
const MEM_SIZE: usize = 32 << 20;
/// Where the mock guest's data buffers start.
const BUF_START: u64 = 0x10_0000;
/// Descriptor flag: device-writable.
pub(super) const WRITE: u16 = VRING_DESC_F_WRITE as u16;

pub(super) fn ep(cid: u64, port: u32) -> Endpoint {
    Endpoint { cid, port }
}

/// A header from `src` to `dst` with `op`, advertising a 64 KiB buffer.
pub(super) fn hdr(src: Endpoint, dst: Endpoint, op: u16) -> Hdr {
    let mut h = Hdr::new(src, dst, op);
    h.buf_alloc = 64 * 1024;
    h
}

/// Parses a header from guest memory bytes.
pub(super) fn parse_hdr(b: &[u8]) -> Hdr {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    Hdr {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// An interrupt nobody watches.
pub(super) fn irq() -> Interrupt {
    Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Arc::new(|| {}))
}

/// An interrupt whose wake-ups are counted and whose irqfd can be read.
fn counted_irq() -> (Interrupt, Arc<AtomicUsize>, EventFd) {
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = wakes.clone();
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Interrupt::new(
        irqfd.try_clone().unwrap(),
        Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }),
    );
    (irq, wakes, irqfd)
}

/// Polls `cond` until it holds or `timeout` passes.
pub(super) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// A fresh directory for a test's sockets.
pub(super) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duplex-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Guest buffers `(address, length)` of a descriptor chain.
type Bufs = Vec<(u64, u32)>;

/// A mock guest's memory and driver state at one moment: what a snapshot restores besides
/// its devices.
pub(super) struct GuestImage {
    mem: Vec<u8>,
    free: Vec<Vec<u16>>,
    chains: Vec<HashMap<u16, (Vec<u16>, Bufs)>>,
    used_seen: [u16; 3],
    next_buf: u64,
    empty_rx: usize,
}

/// A partition's guest driver, simulated.
pub(super) struct MockGuest {
    pub cid: u64,
    pub mem: &'static GuestMemoryMmap,
    pub mmio: VsockMmio,
    pub wakes: Arc<AtomicUsize>,
    pub irqfd: EventFd,
    qs: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    /// Where each queue's used ring is (see the module doc).
    used_addr: [GuestAddress; 3],
    free: Vec<Vec<u16>>,
    /// Offered chains by head: their descriptor indexes and buffers.
    chains: Vec<HashMap<u16, (Vec<u16>, Bufs)>>,
    used_seen: [u16; 3],
    next_buf: u64,
    /// Re-offer each RX buffer once its packet was read (as virtio-drivers does).
    pub recycle: bool,
    /// RX buffers the device returned empty.
    pub empty_rx: usize,
}

impl MockGuest {
    /// Attaches a partition with `cid` and starts its driver.
    pub fn new(switch: &VsockSwitch, cid: u64, uds: Option<PathBuf>) -> Self {
        let mut g = Self::attach(switch, cid, uds);
        g.init();
        g
    }

    /// Attaches a partition with `cid` without starting its driver.
    pub fn attach(switch: &VsockSwitch, cid: u64, uds: Option<PathBuf>) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let (irq, wakes, irqfd) = counted_irq();
        let mmio = switch
            .attach(cid, &format!("p{cid}"), mem.clone(), irq, uds)
            .expect("attach");
        let base = |i: u64| GuestAddress(0x1_0000 * (i + 1));
        let qs = (0..3u64)
            .map(|i| MockSplitQueue::create(mem, base(i), QUEUE_SIZE))
            .collect();
        let used_addr = [0, 1, 2].map(|i| GuestAddress(base(i).0 + 0x8000));
        MockGuest {
            cid,
            mem,
            mmio,
            wakes,
            irqfd,
            qs,
            used_addr,
            free: vec![(0..QUEUE_SIZE).rev().collect(); 3],
            chains: vec![HashMap::new(); 3],
            used_seen: [0; 3],
            next_buf: BUF_START,
            recycle: true,
            empty_rx: 0,
        }
    }

    /// Its memory and driver state now.
    pub fn image(&self) -> GuestImage {
        let mut mem = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut mem, GuestAddress(0)).unwrap();
        GuestImage {
            mem,
            free: self.free.clone(),
            chains: self.chains.clone(),
            used_seen: self.used_seen,
            next_buf: self.next_buf,
            empty_rx: self.empty_rx,
        }
    }

    /// Puts memory and driver state back as they were in `img`.
    pub fn load_image(&mut self, img: &GuestImage) {
        self.mem.write_slice(&img.mem, GuestAddress(0)).unwrap();
        self.free = img.free.clone();
        self.chains = img.chains.clone();
        self.used_seen = img.used_seen;
        self.next_buf = img.next_buf;
        self.empty_rx = img.empty_rx;
    }

    /// The device's saved state.
    pub fn save(&self) -> VsockMmioState {
        self.mmio.save().expect("save")
    }

    /// Restores the device from `state` on `switch` (the memory is this guest's, as it is);
    /// the guest's driver goes on with the restored device.
    pub fn restore_on(
        &mut self,
        switch: &VsockSwitch,
        state: &VsockMmioState,
        uds: Option<PathBuf>,
    ) -> Result<(), VsockError> {
        let (irq, wakes, irqfd) = counted_irq();
        // Prepared (the Persist restore) and put in at once.
        self.mmio = switch.attach_restored(
            self.cid,
            &format!("p{}", self.cid),
            self.mem.clone(),
            irq,
            uds,
            state,
        )?;
        self.wakes = wakes;
        self.irqfd = irqfd;
        Ok(())
    }

    pub fn reg_read(&self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.mmio.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    pub fn reg_write(&self, offset: u64, value: u32) {
        self.mmio.write(offset, &value.to_le_bytes());
    }

    /// Negotiates features and sets up the three queues through the registers.
    pub fn init(&mut self) {
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.reg_write(reg::STATUS, 0);
        self.reg_write(reg::STATUS, s);
        assert_eq!(self.reg_read(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.reg_read(reg::DEVICE_ID), 19);
        let mut cid = [0u8; 8];
        self.mmio.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), self.cid);
        self.reg_write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.reg_read(reg::DEVICE_FEATURES);
        self.reg_write(reg::DRIVER_FEATURES_SEL, 1);
        self.reg_write(reg::DRIVER_FEATURES, high);
        self.reg_write(reg::STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_ne!(self.reg_read(reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        for (i, q) in self.qs.iter().enumerate() {
            let a = |g: GuestAddress| g.0 as u32;
            self.reg_write(reg::QUEUE_SEL, i as u32);
            assert_eq!(self.reg_read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            self.reg_write(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            self.reg_write(reg::QUEUE_DESC_LOW, a(q.desc_table_addr()));
            self.reg_write(reg::QUEUE_DRIVER_LOW, a(q.avail_addr()));
            self.reg_write(reg::QUEUE_DEVICE_LOW, a(self.used_addr[i]));
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
        let addr = self.next_buf;
        self.next_buf = (addr + u64::from(len) + 15) & !15;
        assert!(
            self.next_buf < MEM_SIZE as u64,
            "mock guest out of buffer memory"
        );
        addr
    }

    /// Offers a descriptor chain `(addr, len, flags)` on queue `q` (not notified).
    pub fn push_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let idxs: Vec<u16> = descs
            .iter()
            .map(|_| self.free[q].pop().expect("free descriptor"))
            .collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idxs.get(i + 1) {
                Some(&n) => (flags | VRING_DESC_F_NEXT as u16, n),
                None => (flags, 0),
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.qs[q].desc_table().store(idxs[i], d).unwrap();
        }
        let avail = self.qs[q].avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(idxs[0]);
        avail.idx().store(idx.wrapping_add(1));
        let head = idxs[0];
        let bufs = descs.iter().map(|&(a, l, _)| (a, l)).collect();
        self.chains[q].insert(head, (idxs, bufs));
        head
    }

    /// New used entries of queue `q`: (head, used length, buffers); frees their descriptors.
    pub(super) fn pop_used(&mut self, q: usize) -> Vec<(u16, u32, Bufs)> {
        let ring = self.used_addr[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.0 + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let slot = u64::from(self.used_seen[q] % QUEUE_SIZE);
            let e: VirtqUsedElem = self
                .mem
                .read_obj(GuestAddress(ring.0 + 4 + 8 * slot))
                .unwrap();
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            let head = e.id() as u16;
            let (idxs, bufs) = self.chains[q].remove(&head).expect("used head was offered");
            self.free[q].extend(idxs);
            out.push((head, e.len(), bufs));
        }
        out
    }

    pub fn notify(&self, q: u16) {
        self.reg_write(reg::QUEUE_NOTIFY, u32::from(q));
    }

    /// The flags the device wrote in queue `q`'s used ring.
    pub fn used_flags(&self, q: usize) -> u16 {
        self.mem.read_obj(self.used_addr[q]).unwrap()
    }

    /// Offers `n` single-descriptor RX buffers of `size` bytes and notifies.
    pub fn add_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = self.alloc(size);
            self.push_chain(0, &[(addr, size, WRITE)]);
        }
        self.notify(0);
    }

    /// Sends a chain on TX; returns how many TX buffers the device returned.
    pub fn send_chain(&mut self, descs: &[(u64, u32, u16)]) -> usize {
        self.push_chain(1, descs);
        self.notify(1);
        self.pop_used(1).len()
    }

    /// Sends a packet (header and payload in two descriptors); true if the device took it.
    pub fn send(&mut self, mut h: Hdr, data: &[u8]) -> bool {
        h.len = data.len() as u32;
        let ha = self.alloc(HDR_SIZE as u32);
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(ha))
            .unwrap();
        let mut descs = vec![(ha, HDR_SIZE as u32, 0)];
        if !data.is_empty() {
            let da = self.alloc(data.len() as u32);
            self.mem.write_slice(data, GuestAddress(da)).unwrap();
            descs.push((da, data.len() as u32, 0));
        }
        self.send_chain(&descs) == 1
    }

    /// Sends the same header-only packet `count` times, up to 200 per notification.
    pub fn send_many(&mut self, h: Hdr, count: usize) {
        let ha = self.alloc(HDR_SIZE as u32);
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(ha))
            .unwrap();
        let mut left = count;
        while left > 0 {
            let n = left.min(200);
            for _ in 0..n {
                self.push_chain(1, &[(ha, HDR_SIZE as u32, 0)]);
            }
            self.notify(1);
            // Beyond one pass's budget the device event loop takes the rest.
            let mut used = 0;
            wait_until(Duration::from_secs(5), || {
                used += self.pop_used(1).len();
                used == n
            });
            assert_eq!(used, n);
            left -= n;
        }
    }

    /// The packets the device put in RX since the last call.
    pub fn recv(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.pop_used(0);
        for (_, len, bufs) in &used {
            if *len == 0 {
                self.empty_rx += 1;
                continue;
            }
            let (a0, l0) = bufs[0];
            let mut hb = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut hb, GuestAddress(a0)).unwrap();
            let h = parse_hdr(&hb);
            assert_eq!(*len as usize, HDR_SIZE + h.len as usize, "used length");
            let data_at = match bufs.get(1) {
                Some(&(a1, _)) => a1,
                None => {
                    assert!(l0 as usize >= HDR_SIZE + h.len as usize);
                    a0 + HDR_SIZE as u64
                }
            };
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(data_at))
                .unwrap();
            out.push((h, data));
        }
        if self.recycle && !used.is_empty() {
            for (_, _, bufs) in &used {
                let descs: Vec<_> = bufs.iter().map(|&(a, l)| (a, l, WRITE)).collect();
                self.push_chain(0, &descs);
            }
            if self.used_flags(0) & VRING_USED_F_NO_NOTIFY as u16 == 0 {
                self.notify(0);
            }
        }
        out
    }

    /// Waits until at least `n` packets arrived (from other threads); returns them all.
    pub fn recv_wait(&mut self, n: usize, timeout: Duration) -> Vec<(Hdr, Vec<u8>)> {
        let mut out = Vec::new();
        wait_until(timeout, || {
            out.extend(self.recv());
            out.len() >= n
        });
        out
    }
}
