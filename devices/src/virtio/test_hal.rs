//! A virtio-drivers `Hal` for the interop tests that run the reference guests' drivers on
//! the host against our devices: its DMA memory is a partition's guest memory (one arena
//! per test thread, handed out from 1 MiB up and never reused), and buffers are bounced
//! through it, since the device sees guest memory only.

use std::cell::RefCell;
use std::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// Guest memory of a driver-run partition.
const ARENA_SIZE: usize = 16 << 20;

/// A partition's DMA memory: its guest memory, handed out from 1 MiB up, never reused.
struct Arena {
    mem: GuestMemoryMmap,
    next: u64,
}

thread_local! {
    static ARENA: RefCell<Option<Arena>> = const { RefCell::new(None) };
}

fn with_arena<R>(f: impl FnOnce(&mut Arena) -> R) -> R {
    ARENA.with(|a| {
        let mut a = a.borrow_mut();
        let arena = a.get_or_insert_with(|| Arena {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ARENA_SIZE)]).unwrap(),
            next: 0x10_0000,
        });
        f(arena)
    })
}

/// This thread's guest memory (the device under test is built on it).
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    with_arena(|a| a.mem.clone())
}

fn alloc(len: usize, align: u64) -> u64 {
    with_arena(|a| {
        let addr = a.next.next_multiple_of(align);
        a.next = addr + len as u64;
        assert!(a.next <= ARENA_SIZE as u64, "arena exhausted");
        addr
    })
}

/// The DMA layer of the test thread's partition.
pub(crate) struct TestHal;

// SAFETY: `dma_alloc` returns page-aligned pointers into this thread's guest memory mapping,
// which lives as long as the thread (after the driver); allocations never overlap and are
// never reused, and the mapping is fresh anonymous memory, so the pages are zeroed.
unsafe impl Hal for TestHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let gpa = alloc(pages * PAGE_SIZE, PAGE_SIZE as u64);
        let host = with_arena(|a| a.mem.get_host_address(GuestAddress(gpa)).unwrap());
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
        let gpa = alloc(buffer.len(), 16);
        // SAFETY: the caller guarantees `buffer` is valid and not accessed by anyone else
        // during this call.
        let bytes = unsafe { buffer.as_ref() };
        with_arena(|a| a.mem.write_slice(bytes, GuestAddress(gpa)).unwrap());
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, mut buffer: NonNull<[u8]>, dir: BufferDirection) {
        if dir == BufferDirection::DriverToDevice {
            return;
        }
        // SAFETY: as for `share`.
        let bytes = unsafe { buffer.as_mut() };
        with_arena(|a| a.mem.read_slice(bytes, GuestAddress(paddr)).unwrap());
    }
}
