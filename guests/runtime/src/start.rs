//! The first Rust code to run, in ring 3: checks the monitor, parses the boot information,
//! sets up the heap and calls the firmware's `main` (defined by [`crate::entry!`]).

extern crate alloc;

use alloc::boxed::Box;

use crate::bootinfo::{self, BootInfo};
use crate::{heap, println, sysctl, time};

extern "Rust" {
    /// The firmware's entry, defined by `duplex_runtime::entry!`.
    fn __duplex_firmware_main(boot: &'static BootInfo) -> !;
}

/// Called by `duplex_ring3_entry` (boot.rs) in ring 3 with `.bss` zeroed.
#[no_mangle]
extern "C" fn duplex_ring3_start(start_info: u64) -> ! {
    let magic = sysctl::magic();
    if magic != sysctl::MAGIC_VALUE {
        panic!("no Duplex system control page (MAGIC reads {magic:#x})");
    }
    let tsc_khz = sysctl::tsc_khz();
    if !time::init(tsc_khz) {
        println!("warning: TSC_KHZ is 0, assuming {} kHz", time::tsc_khz());
    }
    // SAFETY: `start_info` is the EBX the monitor passed to the PVH entry, carried
    // unchanged through boot.rs; the heap starts after the image, so nothing overwrites
    // the start info, command line or memory map.
    let (cmdline, memory_map) = match unsafe { bootinfo::parse(start_info) } {
        Ok(parsed) => parsed,
        Err(e) => panic!("{e}"),
    };
    let Some(heap) = heap::init(memory_map) else {
        panic!(
            "no RAM region holds the end of the image ({:#x})",
            heap::image_end()
        );
    };
    let boot: &'static BootInfo = Box::leak(Box::new(BootInfo {
        cmdline,
        memory_map,
        tsc_khz: time::tsc_khz(),
        heap,
    }));
    // SAFETY: every firmware defines `__duplex_firmware_main` through `entry!`, with this
    // exact signature.
    unsafe { __duplex_firmware_main(boot) }
}
