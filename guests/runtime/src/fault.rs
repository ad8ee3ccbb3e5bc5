//! CPU exceptions (ring 0) and the ring-0 hook (called from ring 3).
//!
//! Every exception 0–31, from ring 3 or ring 0, ends in [`duplex_fault`]: it prints
//! `FAULT vector=V rip=0x... error=0x...`, commits a fault report to the system control
//! page and halts the vCPU for good. It runs in ring 0, i.e. emulated and slow here, which
//! does not matter for a path taken once.

use crate::boot::RING0_CALL_TRIPLE_FAULT;
use crate::sysctl;

/// Called by `duplex_fault_common` (boot.rs) on the ring-0 stack, or the IST1 stack for `#DF`.
#[no_mangle]
extern "C" fn duplex_fault(vector: u64, error: u64, rip: u64, _cs: u64) -> ! {
    crate::println!("FAULT vector={vector} rip={rip:#x} error={error:#x}");
    sysctl::report_fault(vector, error, rip);
    loop {
        // SAFETY: ring 0; with interrupts off `hlt` just stops this vCPU, which has nothing
        // left to do.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

extern "C" {
    /// `mov %rdi, %rax; ud2; ret` in boot.rs: the `#UD` enters ring 0, which recognises the
    /// address, serves the request in RAX and resumes after the `ud2`.
    fn duplex_ring0_trap(request: u64) -> u64;
}

/// Calls the ring-0 hook with `request`; returns the hook's answer.
///
/// Requests: [`RING0_CALL_TRIPLE_FAULT`] does not return. Any other request returns
/// `u64::MAX`.
pub fn ring0_call(request: u64) -> u64 {
    // SAFETY: `duplex_ring0_trap` follows the C ABI; the ring-0 side changes only RAX (the
    // return register) and resumes right after its `ud2`; it runs on the ring-0 stack.
    unsafe { duplex_ring0_trap(request) }
}

/// Forces a real triple fault through the ring-0 hook: ring 0 loads a zero-limit IDT and raises `#UD`; neither it
/// nor the `#GP` and `#DF` that follow can be delivered, so the CPU shuts down (a KVM
/// shutdown exit for the monitor).
pub fn triple_fault() -> ! {
    let ret = ring0_call(RING0_CALL_TRIPLE_FAULT);
    panic!("the triple-fault request returned {ret:#x}");
}
