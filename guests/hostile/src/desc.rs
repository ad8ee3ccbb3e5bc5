//! The `desc` phase: the vsock device's virtio-mmio registers driven by hand, with broken
//! descriptor chains on its transmit queue. A correct driver never does any of this, which
//! is why this phase does not use one: each case resets the device, sets the queues up
//! (or places them where no RAM is), writes one malformed chain, and notifies.

extern crate alloc;

use alloc::alloc::{alloc_zeroed, Layout};

use duplex_runtime::vsock::mmio_devices;
use duplex_runtime::{println, BootInfo};

/// virtio-mmio (version 2) register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG: u64 = 0x100;
}

const VIRTIO_MAGIC: u32 = 0x7472_6976;
const VSOCK_DEVICE_ID: u32 = 19;

/// The first vsock device on the command line.
pub fn find(boot: &BootInfo) -> Option<Window> {
    mmio_devices(boot.cmdline)
        .map(|d| Window(d.addr))
        .find(|w| w.read(reg::MAGIC) == VIRTIO_MAGIC && w.read(reg::DEVICE_ID) == VSOCK_DEVICE_ID)
}

/// The partition's CID, from the device's config space.
pub fn cid(w: &Window) -> u64 {
    u64::from(w.read(reg::CONFIG)) | (u64::from(w.read(reg::CONFIG + 4)) << 32)
}
/// The transmit queue's index.
pub const TX: u32 = 1;
/// The queue size used.
pub const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;
/// Far above any partition's RAM (and below the 4 GiB identity map's end is not needed:
/// only the device reads it).
const NO_RAM: u64 = 0x7_0000_0000;

/// A virtio-mmio register window.
pub struct Window(pub u64);

impl Window {
    /// Writes register `off`.
    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: the window is the vsock device's virtio-mmio registers, which the monitor
        // put on the command line for this partition, identity-mapped; writes to any offset
        // are emulated (unknown ones ignored).
        unsafe { core::ptr::write_volatile((self.0 + off) as *mut u32, v) }
    }

    /// Reads register `off`.
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: as in `write`: emulated MMIO, reads of any offset are answered.
        unsafe { core::ptr::read_volatile((self.0 + off) as *const u32) }
    }
}

/// A virtio-vsock packet header's fields that matter here.
pub struct Hdr {
    pub src: u64,
    pub dst: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub op: u16,
    pub flags: u32,
}

/// One split ring in RAM: descriptor table, avail ring, used ring, and data pages.
pub struct Ring {
    base: *mut u8,
}

/// Pages of a [`Ring`]: table, avail, used, then data.
const RING_PAGES: usize = 3 + DATA_PAGES;
/// Data pages of a [`Ring`].
pub const DATA_PAGES: usize = 2;

impl Ring {
    /// A zeroed ring.
    pub fn new() -> Option<Ring> {
        let layout = Layout::from_size_align(RING_PAGES * 4096, 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        (!base.is_null()).then_some(Ring { base })
    }
    /// The descriptor table.
    pub fn desc(&self) -> u64 {
        self.base as u64
    }
    /// The avail ring.
    pub fn avail(&self) -> u64 {
        self.base as u64 + 4096
    }
    /// The used ring.
    pub fn used(&self) -> u64 {
        self.base as u64 + 2 * 4096
    }
    /// The first data page.
    pub fn data(&self) -> u64 {
        self.base as u64 + 3 * 4096
    }
    fn clear(&self) {
        // SAFETY: `base` is our 4-page allocation, never freed.
        unsafe { core::ptr::write_bytes(self.base, 0, RING_PAGES * 4096) }
    }
    /// Writes descriptor `i` (modulo the queue size).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = (self.desc() + u64::from(i % QSIZE) * 16) as *mut u8;
        // SAFETY: descriptor `i % QSIZE` lies in the first page of our allocation.
        unsafe {
            core::ptr::write_volatile(p as *mut u64, addr);
            core::ptr::write_volatile(p.add(8) as *mut u32, len);
            core::ptr::write_volatile(p.add(12) as *mut u16, flags);
            core::ptr::write_volatile(p.add(14) as *mut u16, next);
        }
    }
    /// Publishes `head` and sets the avail index to `idx`.
    pub fn publish(&self, head: u16, idx: u16) {
        let p = self.avail() as *mut u16;
        // SAFETY: the avail ring (flags, idx, QSIZE entries) lies in the second page.
        unsafe {
            core::ptr::write_volatile(p.add(2 + usize::from(idx.wrapping_sub(1) % QSIZE)), head);
            core::ptr::write_volatile(p.add(1), idx);
        }
    }
    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's idx lies in the third page.
        unsafe { core::ptr::read_volatile((self.used() as *const u16).add(1)) }
    }
    /// A vsock header in the data page: RW from `src` port 7 to CID `dst` port 5000,
    /// claiming `len` bytes of payload.
    fn header(&self, src: u64, dst: u64, len: u32) {
        self.packet(
            0,
            &Hdr {
                src,
                dst,
                src_port: 7,
                dst_port: 5000,
                len,
                op: 5,
                flags: 0,
            },
        );
    }

    /// Writes header `h` at byte `at` of the data pages (which must leave 44 bytes).
    pub fn packet(&self, at: u64, h: &Hdr) {
        let at = at.min(DATA_PAGES as u64 * 4096 - 44);
        let p = (self.data() + at) as *mut u8;
        // SAFETY: `at` + 44 stays inside the data pages of our allocation (clamped above).
        unsafe {
            core::ptr::write_unaligned(p as *mut u64, h.src);
            core::ptr::write_unaligned(p.add(8) as *mut u64, h.dst);
            core::ptr::write_unaligned(p.add(16) as *mut u32, h.src_port);
            core::ptr::write_unaligned(p.add(20) as *mut u32, h.dst_port);
            core::ptr::write_unaligned(p.add(24) as *mut u32, h.len);
            core::ptr::write_unaligned(p.add(28) as *mut u16, 1); // stream
            core::ptr::write_unaligned(p.add(30) as *mut u16, h.op);
            core::ptr::write_unaligned(p.add(32) as *mut u32, h.flags);
            core::ptr::write_unaligned(p.add(36) as *mut u32, 1 << 20); // buf_alloc
            core::ptr::write_unaligned(p.add(40) as *mut u32, 0); // fwd_cnt
        }
    }
}

/// Resets the device and sets its transmit queue up at the given addresses (the receive
/// queue is left unset: nothing is ever delivered to this partition).
pub fn setup(w: &Window, ring: &Ring, desc: u64, avail: u64, used: u64) {
    w.write(reg::STATUS, 0);
    w.write(reg::STATUS, 1 | 2); // ACKNOWLEDGE | DRIVER
    w.write(reg::DRIVER_FEATURES_SEL, 1);
    w.write(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w.write(reg::DRIVER_FEATURES_SEL, 0);
    w.write(reg::DRIVER_FEATURES, 1); // VIRTIO_VSOCK_F_STREAM
    w.write(reg::STATUS, 1 | 2 | 8); // FEATURES_OK
    w.write(reg::QUEUE_SEL, TX);
    w.write(reg::QUEUE_NUM, u32::from(QSIZE));
    w.write(reg::QUEUE_DESC_LOW, desc as u32);
    w.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
    w.write(reg::QUEUE_DRIVER_LOW, avail as u32);
    w.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    w.write(reg::QUEUE_DEVICE_LOW, used as u32);
    w.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    w.write(reg::QUEUE_READY, 1);
    w.write(reg::STATUS, 1 | 2 | 8 | 4); // DRIVER_OK
    ring.clear();
}

/// Runs every case against the first vsock device on the command line.
pub fn run(boot: &BootInfo) {
    let Some(w) = find(boot) else {
        println!("hostile: desc skipped: no vsock device");
        return;
    };
    let Some(ring) = Ring::new() else {
        println!("hostile: desc skipped: no memory");
        return;
    };
    let cid = cid(&w);
    let peer = 4;
    let mut cases = 0u32;
    let mut case = |name: &str, f: &dyn Fn(&Ring) -> u16, rings: (u64, u64, u64)| {
        setup(&w, &ring, rings.0, rings.1, rings.2);
        let idx = f(&ring);
        w.write(reg::QUEUE_NOTIFY, TX);
        w.write(reg::QUEUE_NOTIFY, TX);
        cases += 1;
        println!(
            "hostile: desc case {name} avail={idx} used={} status={:#x}",
            ring.used_idx(),
            w.read(reg::STATUS)
        );
    };
    let own = (ring.desc(), ring.avail(), ring.used());
    let data = ring.data();
    case(
        "address-outside-ram",
        &|r| {
            r.set_desc(0, NO_RAM, 4096, 0, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "length-4GiB",
        &|r| {
            r.header(cid, peer, 0);
            r.set_desc(0, data, u32::MAX, 0, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "loop",
        &|r| {
            r.header(cid, peer, 16);
            r.set_desc(0, data, 44, F_NEXT, 1);
            r.set_desc(1, data, 16, F_NEXT, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "next-past-table",
        &|r| {
            r.header(cid, peer, 16);
            r.set_desc(0, data, 44, F_NEXT, 999);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "head-past-table",
        &|r| {
            r.publish(999, 1);
            1
        },
        own,
    );
    case(
        "avail-index-far-ahead",
        &|r| {
            r.header(cid, peer, 0);
            r.set_desc(0, data, 44, 0, 0);
            r.publish(0, 60_000);
            60_000
        },
        own,
    );
    case(
        "indirect-without-feature",
        &|r| {
            r.set_desc(0, NO_RAM, 16 * 1024, F_INDIRECT, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "short-header",
        &|r| {
            r.header(cid, peer, 65_536);
            r.set_desc(0, data, 20, 0, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "payload-claims-more-than-sent",
        &|r| {
            r.header(cid, peer, 65_536);
            r.set_desc(0, data, 44 + 8, 0, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "spoofed-source-cid",
        &|r| {
            r.header(peer, peer, 0);
            r.set_desc(0, data, 44, 0, 0);
            r.publish(0, 1);
            1
        },
        own,
    );
    case(
        "rings-outside-ram",
        &|_| 1,
        (NO_RAM, NO_RAM + 4096, NO_RAM + 8192),
    );
    // Registers written out of order and out of range.
    w.write(reg::QUEUE_SEL, 77);
    w.write(reg::QUEUE_NUM, 65_535);
    w.write(reg::QUEUE_READY, 1);
    w.write(reg::QUEUE_NOTIFY, 77);
    w.write(0xffc, 1);
    let _ = w.read(reg::CONFIG + 64);
    w.write(reg::STATUS, 0);
    println!("hostile: desc done cases={cases}");
}
