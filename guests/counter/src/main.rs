//! The `counter` test firmware: a guest whose memory and registers say, at every instruction
//! boundary, exactly which instant they belong to, so a test can check that a snapshot set
//! holds memory and vCPU state of one instant (an exact cut).
//!
//! It allocates a zeroed, page-aligned region of `counter.pages=N` 4 KiB pages (default
//! 1024) on the heap (identity mapped: the address is the guest-physical address), prints
//!
//! ```text
//! counter: base=0x<hex gpa> pages=<N>
//! ```
//!
//! and then runs, in ring 3 with interrupts off (the runtime enters ring 3 with
//! `RFLAGS = 0x2`, and no exception is expected), an assembly loop that never exits to the
//! monitor (no MMIO, no I/O, no `WAIT_UNTIL`):
//!
//! ```text
//! r12 = base, r13 = N, r14 = k = 0     ; k: page writes completed so far
//! loop: mov rax, r14 ; xor edx, edx ; div r13      ; rax = k / N, rdx = k % N
//!       inc rax ; shl rdx, 12
//!       mov [r12 + rdx], rax                       ; page k % N := k / N + 1
//!       inc r14                                    ; the one instruction that advances
//!       jmp loop
//! ```
//!
//! The whole state is the one register `r14 = k`: with `c = k / N + 1` (the pass, from 1)
//! and `i = k % N` (the page being written), at every instruction boundary pages `[0, i)`
//! hold `c`, page `i` holds `c` or `c - 1`, and pages `(i, N)` hold `c - 1` (0 during the
//! first pass). A two-register loop (`r14 = c`, `r15 = i`, reset `i` then increment `c`)
//! would have a one-instruction window at every wrap where the invariant does not hold;
//! one counter has none. (`r12`, `r13` stay `base` and `N`; `rax`, `rdx` are scratch.)
//! The check lives in the monitor's tests (`tests/common/livecut.rs`).

#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc_zeroed, Layout};

use duplex_runtime::{println, BootInfo};

duplex_runtime::entry!(main);

/// Pages when the command line does not say `counter.pages=`.
const DEFAULT_PAGES: u64 = 1024;
/// The page size the loop strides by (`shl rdx, 12`).
const PAGE: u64 = 4096;

fn main(boot: &BootInfo) -> ! {
    let pages = match boot.arg("counter.pages") {
        None => DEFAULT_PAGES,
        Some(s) => match duplex_runtime::bootinfo::parse_u64(s) {
            Some(n) if n > 0 => n,
            _ => panic!("counter: bad counter.pages={s} (a number > 0)"),
        },
    };
    let layout = pages
        .checked_mul(PAGE)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .and_then(|bytes| Layout::from_size_align(bytes, PAGE as usize).ok());
    let Some(layout) = layout else {
        panic!("counter: counter.pages={pages} is too large");
    };
    // SAFETY: `layout` has a non-zero size (pages > 0). The region is never freed.
    let base = unsafe { alloc_zeroed(layout) };
    if base.is_null() {
        panic!(
            "counter: no room for {pages} pages on the heap ({} bytes free)",
            duplex_runtime::heap::free()
        );
    }
    // The runtime's page tables map virtual = physical, so the pointer is the GPA.
    println!("counter: base={:#x} pages={pages}", base as u64);
    // SAFETY: the loop writes 8 bytes at the start of pages 0 .. pages - 1 of the region
    // just allocated (zeroed, page-aligned, `pages * 4096` bytes, owned by nobody else) and
    // touches only rax, rdx and r14 besides. It never returns; nothing else runs after it.
    // `div r13` cannot fault: r13 = pages > 0 and rdx = 0, so the quotient fits.
    unsafe {
        core::arch::asm!(
            "2:",
            "mov rax, r14",
            "xor edx, edx",
            "div r13",
            "inc rax",
            "shl rdx, 12",
            "mov qword ptr [r12 + rdx], rax",
            "inc r14",
            "jmp 2b",
            in("r12") base as u64,
            in("r13") pages,
            in("r14") 0u64,
            options(noreturn, nostack),
        )
    }
}
