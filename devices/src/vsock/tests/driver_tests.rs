//! Interop with virtio-drivers 0.13, the driver the reference guests use: its `VirtIOSocket`
//! and `VsockConnectionManager` run on the host against the device and the switch, through a
//! `Transport` that forwards register accesses to [`VsockMmio`] (the modern virtio-mmio
//! sequences of virtio-drivers' own `MmioTransport`) and a `Hal` whose DMA memory is the
//! partition's guest memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use virtio_drivers::device::socket::{
    VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent, VsockEventType,
};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::virtio::test_driver::{MmioRegs, Window};
use vm_memory::GuestMemoryBackend;

use super::*;

/// Guest memory of a driver-run partition.
const ARENA_SIZE: usize = 16 << 20;

/// A partition's DMA memory: its guest memory, handed out from 1 MiB up, never reused.
struct Arena {
    mem: &'static GuestMemoryMmap,
    next: u64,
}

impl Arena {
    fn alloc(&mut self, len: usize, align: u64) -> u64 {
        let addr = self.next.next_multiple_of(align);
        self.next = addr + len as u64;
        assert!(self.next <= ARENA_SIZE as u64, "arena exhausted");
        addr
    }
}

static ARENAS: [OnceLock<Mutex<Arena>>; 2] = [OnceLock::new(), OnceLock::new()];

fn arena(n: usize) -> std::sync::MutexGuard<'static, Arena> {
    ARENAS[n]
        .get_or_init(|| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ARENA_SIZE)]).unwrap();
            Mutex::new(Arena {
                mem: Box::leak(Box::new(mem)),
                next: 0x10_0000,
            })
        })
        .lock()
        .unwrap()
}

/// The DMA layer of partition `N`.
struct TestHal<const N: usize>;

// SAFETY: `dma_alloc` returns page-aligned pointers into a leaked, never unmapped guest memory
// mapping; allocations never overlap and are never reused, and the mapping is fresh anonymous
// memory, so the pages are zeroed.
unsafe impl<const N: usize> Hal for TestHal<N> {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let mut a = arena(N);
        let gpa = a.alloc(pages * PAGE_SIZE, PAGE_SIZE as u64);
        let host = a.mem.get_host_address(GuestAddress(gpa)).unwrap();
        (gpa, NonNull::new(host).unwrap())
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("only the PCI transport maps MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        // Bounce buffer in guest memory: the device only sees guest memory.
        let mut a = arena(N);
        let gpa = a.alloc(buffer.len(), 16);
        // SAFETY: the caller guarantees `buffer` is valid and not accessed by anyone else
        // during this call.
        let bytes = unsafe { buffer.as_ref() };
        a.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, mut buffer: NonNull<[u8]>, dir: BufferDirection) {
        if dir == BufferDirection::DriverToDevice {
            return;
        }
        let a = arena(N);
        // SAFETY: as for `share`.
        let bytes = unsafe { buffer.as_mut() };
        a.mem.read_slice(bytes, GuestAddress(paddr)).unwrap();
    }
}

impl MmioRegs for VsockMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        VsockMmio::read(self, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        VsockMmio::write(self, offset, data);
    }
}

type Manager<const N: usize> = VsockConnectionManager<TestHal<N>, Window<VsockMmio>>;

fn start<const N: usize>(sw: &VsockSwitch, cid: u64, uds: Option<PathBuf>) -> Manager<N> {
    let mem = arena(N).mem.clone();
    let mmio = sw.attach(cid, &format!("d{cid}"), mem, irq(), uds).unwrap();
    let socket =
        VirtIOSocket::<TestHal<N>, Window<VsockMmio>>::new(Window(mmio)).expect("driver starts");
    VsockConnectionManager::new(socket)
}

/// Polls until an event the caller sees arrives.
fn event<const N: usize>(m: &mut Manager<N>) -> VsockEvent {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Some(e) = m.poll().expect("poll") {
            return e;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no vsock event");
}

#[test]
fn virtio_drivers_partitions_and_host_talk_through_the_switch() {
    let dir = temp_dir("drivers");
    let uds = dir.join("d4.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut m3 = start::<0>(&sw, 3, None);
    let mut m4 = start::<1>(&sw, 4, Some(uds.clone()));
    assert_eq!((m3.guest_cid(), m4.guest_cid()), (3, 4));

    // Partition to partition.
    m4.listen(80);
    let (to4, to3) = (
        VsockAddr { cid: 4, port: 80 },
        VsockAddr { cid: 3, port: 1000 },
    );
    m3.connect(to4, 1000).unwrap();
    assert_eq!(event(&mut m4).event_type, VsockEventType::ConnectionRequest);
    assert_eq!(event(&mut m3).event_type, VsockEventType::Connected);
    m3.send(to4, 1000, b"ping").unwrap();
    assert_eq!(
        event(&mut m4).event_type,
        VsockEventType::Received { length: 4 }
    );
    let mut buf = [0u8; 16];
    assert_eq!(m4.recv(to3, 80, &mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], b"ping");
    m4.send(to3, 80, b"pong").unwrap();
    assert_eq!(
        event(&mut m3).event_type,
        VsockEventType::Received { length: 4 }
    );
    assert_eq!(m3.recv(to4, 1000, &mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], b"pong");

    // Host to partition, more than the driver's 1 KiB connection buffer: the switch honours
    // its credit and continues when the guest reports what it consumed.
    m4.listen(81);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 81\n").unwrap();
    let req = event(&mut m4);
    assert_eq!(req.event_type, VsockEventType::ConnectionRequest);
    let hostaddr = req.source;
    let mut line = String::new();
    BufReader::new(&host).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", hostaddr.port));
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while got.len() < data.len() && Instant::now() < end {
        if let Some(VsockEventType::Received { .. }) = m4.poll().unwrap().map(|e| e.event_type) {
            let mut chunk = [0u8; 4096];
            let n = m4.recv(hostaddr, 81, &mut chunk).unwrap();
            got.extend_from_slice(&chunk[..n]);
            m4.update_credit(hostaddr, 81).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        got == data,
        "host to guest, byte-exact ({} of 3000)",
        got.len()
    );
    m4.send(hostaddr, 81, b"done").unwrap();
    let mut done = [0u8; 4];
    host.read_exact(&mut done).unwrap();
    assert_eq!(&done, b"done");

    // Partition to a host program listening on `<uds>_5000`.
    let listener = UnixListener::bind(dir.join("d4.vsock_5000")).unwrap();
    let to_host = VsockAddr { cid: 2, port: 5000 };
    m4.connect(to_host, 2000).unwrap();
    assert_eq!(event(&mut m4).event_type, VsockEventType::Connected);
    let (mut s, _) = listener.accept().unwrap();
    m4.send(to_host, 2000, &data[..2000]).unwrap();
    let mut back = vec![0u8; 2000];
    s.read_exact(&mut back).unwrap();
    assert!(back == data[..2000]);

    let st = sw.stats();
    assert_eq!(st.connections, 3);
    assert_eq!(st.counters.malformed_tx + st.counters.malformed_rx, 0);
    // The driver disables its queues when dropped: the device stops, peers are reset.
    drop(m4);
    assert_eq!(sw.stats().connections, 0);
    assert_eq!(read_to_end(&mut host), b"", "host connection closed");
    let _ = std::fs::remove_dir_all(&dir);
}

fn read_to_end(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}
