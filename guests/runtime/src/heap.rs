//! The global allocator: `linked_list_allocator` over the free RAM after the image.
//!
//! The heap runs from `__duplex_image_end` (linker script, page-aligned) to the end of the
//! RAM region of the memory map that holds it, capped at 3 GiB (the MMIO hole). Only the
//! allocator's bookkeeping touches the memory up front, so large heaps cost nothing to set up.

use linked_list_allocator::LockedHeap;

use crate::bootinfo::MemMapEntry;

/// The heap never reaches into the MMIO hole.
const HEAP_LIMIT: u64 = 0xC000_0000;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

extern "C" {
    /// First byte after the image, stacks included (linker script).
    static __duplex_image_end: u8;
}

/// Where the image ends (the heap's start).
pub fn image_end() -> usize {
    // Only the symbol's address is taken; the byte itself is never read.
    core::ptr::addr_of!(__duplex_image_end) as usize
}

/// Sets up the heap from `map`; returns `(start, size)`, or `None` if no RAM region holds
/// the end of the image.
pub(crate) fn init(map: &[MemMapEntry]) -> Option<(usize, usize)> {
    let start = image_end() as u64;
    let end = map
        .iter()
        .find(|e| e.is_ram() && e.contains(start))?
        .end()
        .min(HEAP_LIMIT);
    let size = usize::try_from(end.checked_sub(start)?).ok()?;
    // SAFETY: `start .. start + size` is RAM (memory map), identity-mapped, after the image
    // and its stacks, below the MMIO hole, and used by nothing else. `init` runs once, before
    // the first allocation.
    unsafe { ALLOCATOR.lock().init(start as *mut u8, size) };
    Some((start as usize, size))
}

/// Bytes currently allocated.
pub fn used() -> usize {
    ALLOCATOR.lock().used()
}

/// Bytes still free.
pub fn free() -> usize {
    ALLOCATOR.lock().free()
}
