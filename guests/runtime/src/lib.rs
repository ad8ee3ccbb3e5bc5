//! `duplex-runtime`: the runtime of the Duplex reference guests (see `docs/guest-abi.md`).
//!
//! A firmware is a `#![no_std] #![no_main]` binary that depends on this crate and says
//!
//! ```ignore
//! duplex_runtime::entry!(main);
//!
//! fn main(boot: &duplex_runtime::BootInfo) -> ! {
//!     duplex_runtime::println!("hello, cmdline={}", boot.cmdline);
//!     duplex_runtime::power_off(0)
//! }
//! ```
//!
//! It is linked at 1 MiB by `duplex.ld` and booted by the monitor through PVH.
//!
//! # Ring 0 and ring 3
//!
//! On the machines Duplex is developed on, ring-0 guest code is emulated (about 0.6 million
//! instructions a second) while ring-3 code runs natively, and ring 3 cannot use I/O
//! ports. So ring 0 does as little as possible:
//!
//! * [`boot`] (assembly only): the PVH note, the 32-bit entry, long mode with static
//!   identity page tables (0–4 GiB, 2 MiB pages, user-accessible), a static GDT (kernel
//!   code/data, user data/code, TSS), a static IDT and TSS, then `iretq` to ring 3. About
//!   30 instructions from the PVH entry to ring 3; no Rust runs in ring 0 on the normal path.
//! * Ring 3, native: `.bss` is zeroed, [`start`] checks the system control page, parses
//!   [`BootInfo`], sets up the heap and calls the firmware's `main`, which never returns.
//!   Ring-3 code talks to the monitor through MMIO only: the [`console`] UART at
//!   `0xD000_0000` and the [`sysctl`] page at `0xD000_1000` (sleep with
//!   [`time::sleep_until`], power off, reboot, panic).
//! * Ring 0 again only on a CPU exception: [`fault`] prints
//!   `FAULT vector=V rip=0x... error=0x...`, commits a fault report and halts.
//!
//! # The ring-0 hook
//!
//! Ring 3 enters ring 0 on purpose through a real exception, not a software interrupt:
//! on the development machines `int n` from ring 3 raises `#UD` at the `int` instead of
//! using the IDT gate, while exceptions are delivered normally. [`fault::ring0_call`]
//! calls `duplex_ring0_trap` (boot.rs), which puts the request in `RAX` and executes a
//! `ud2` at a fixed label, `duplex_ring0_trap_site`. The common exception stub compares
//! the faulting `RIP` with that label (two instructions on the fault path) and on a match
//! serves the request instead of reporting a fault, then resumes after the `ud2` with the
//! answer in `RAX`; a `ud2` anywhere else is an ordinary fault. The one request is
//! [`boot::RING0_CALL_TRIPLE_FAULT`]: ring 0 loads a zero-limit IDT and executes `ud2`;
//! `#UD`, then `#GP`, then `#DF` cannot be delivered, so the CPU triple-faults (KVM
//! reports a shutdown exit). [`triple_fault`] wraps it; the `faulty` test firmware uses
//! it. Unknown requests return `u64::MAX`.
//!
//! # Services
//!
//! [`print!`]/[`println!`] and [`Console`]; [`time`] (`rdtsc`, [`time::now_ns`],
//! [`time::Instant`], [`time::sleep_until`], [`time::sleep_ms`]); [`power_off`],
//! [`reboot`]; [`BootInfo::arg`] for `key=value` on the command line; a global allocator
//! (`alloc` works); a panic handler printing `PANIC: <message> at <file>:<line>` and
//! writing the `PANIC` register; [`heartbeat`], the placeholder firmware loop; [`vsock`],
//! virtio-vsock through the `virtio-drivers` crate (device discovery on the command line,
//! the crate's `Hal`, [`vsock::open_vsock`], [`vsock::wait_for_event`]).

#![no_std]

pub mod blk;
pub mod boot;
pub mod bootinfo;
pub mod console;
pub mod fault;
pub mod heap;
pub mod heartbeat;
pub mod net;
mod panic;
pub mod start;
pub mod sysctl;
pub mod time;
pub mod vsock;

pub use bootinfo::{BootInfo, MemMapEntry};
pub use console::Console;
pub use fault::triple_fault;
pub use sysctl::{power_off, reboot};

/// Declares the firmware's entry: `entry!(main)` with `fn main(boot: &BootInfo) -> !`.
///
/// `main` runs in ring 3 with the heap ready.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[doc(hidden)]
        #[no_mangle]
        pub fn __duplex_firmware_main(boot: &'static $crate::BootInfo) -> ! {
            let main: fn(&'static $crate::BootInfo) -> ! = $main;
            main(boot)
        }
    };
}
