//! The Duplex system control page at `0xD000_1000` (see `docs/guest-abi.md`).
//!
//! Every access is one naturally aligned volatile load or store of the register's size,
//! and one VM exit, so callers should not poll these in tight loops.

use crate::time;

/// Guest-physical (= virtual, identity-mapped) address of the system control page.
pub const SYSCTL_BASE: usize = 0xD000_1000;

/// Expected value of the `MAGIC` register (`"DPLX"` little-endian).
pub const MAGIC_VALUE: u32 = 0x584C_5044;

/// Register offsets.
mod reg {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x04;
    pub const TSC_KHZ: usize = 0x08;
    pub const POWER_OFF: usize = 0x10;
    pub const REBOOT: usize = 0x14;
    pub const WAIT_UNTIL: usize = 0x18;
    pub const FAULT_VECTOR: usize = 0x20;
    pub const FAULT_ERROR: usize = 0x28;
    pub const FAULT_RIP: usize = 0x30;
    pub const FAULT_COMMIT: usize = 0x38;
    pub const PANIC: usize = 0x40;
    pub const SNAPSHOT_REQUEST: usize = 0x48;
    pub const TIME_BIAS_ADDR: usize = 0x50;
    pub const TIME_BIAS: usize = 0x58;
    pub const SLEEP: usize = 0x60;
    pub const WAKE_REASON: usize = 0x64;
}

/// Why a partition woke from [`sleep`] (the `WAKE_REASON` register).
pub mod wake_reason {
    /// It never slept.
    pub const NONE: u32 = 0;
    /// A Wake-on-LAN magic packet for its network card's MAC arrived.
    pub const MAGIC_PACKET: u32 = 1;
    /// The operator woke it (`duplex ctl wake NAME`).
    pub const OPERATOR: u32 = 2;
}

/// Values of the `SNAPSHOT_REQUEST` register.
pub mod snapshot_request {
    /// Take a coordinated snapshot of the device and write it to the save destination.
    pub const SNAPSHOT: u32 = 1;
    /// As [`SNAPSHOT`], then restart the device from the set just written.
    pub const SNAPSHOT_AND_REBOOT: u32 = 2;
}

fn read32(offset: usize) -> u32 {
    // SAFETY: the system control page is identity-mapped MMIO that the monitor emulates;
    // `offset` is one of the aligned register offsets in `reg`.
    unsafe { core::ptr::read_volatile((SYSCTL_BASE + offset) as *const u32) }
}

fn read64(offset: usize) -> u64 {
    // SAFETY: as in `read32`; 8-byte registers are 8-byte aligned.
    unsafe { core::ptr::read_volatile((SYSCTL_BASE + offset) as *const u64) }
}

fn write32(offset: usize, value: u32) {
    // SAFETY: as in `read32`; writes only reach the monitor, never guest memory.
    unsafe { core::ptr::write_volatile((SYSCTL_BASE + offset) as *mut u32, value) }
}

/// Tells the monitor where this partition keeps its time bias (see `time`).
pub fn register_time_bias(addr: u64) {
    write64(reg::TIME_BIAS_ADDR, addr);
}

/// The time bias the monitor keeps for this partition.
pub fn time_bias() -> u64 {
    read64(reg::TIME_BIAS)
}

fn write64(offset: usize, value: u64) {
    // SAFETY: as in `read64`; writes only reach the monitor, never guest memory.
    unsafe { core::ptr::write_volatile((SYSCTL_BASE + offset) as *mut u64, value) }
}

/// The `MAGIC` register; [`MAGIC_VALUE`] under a Duplex monitor.
pub fn magic() -> u32 {
    read32(reg::MAGIC)
}

/// The guest ABI version.
pub fn version() -> u32 {
    read32(reg::VERSION)
}

/// The vCPU's TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    read64(reg::TSC_KHZ)
}

/// Asks the monitor to sleep this vCPU until the TSC reaches `tsc` (it may wake early).
pub fn wait_until(tsc: u64) {
    write64(reg::WAIT_UNTIL, tsc);
}

/// Sleeps in the monitor for good: what a vCPU does once it has nothing left to run.
pub fn park() -> ! {
    loop {
        // About an hour per exit, far from any overflow in the monitor's arithmetic.
        let hour = time::tsc_khz().max(1).saturating_mul(3_600_000);
        wait_until(time::rdtsc().saturating_add(hour));
    }
}

/// Puts the partition to sleep (power saving): the monitor parks its vCPUs and runs no
/// guest instruction until something wakes it — a Wake-on-LAN magic packet for its network
/// card's MAC, or the operator. Returns once woken, with the reason ([`wake_reason`]).
/// Frames that reached the card while asleep are dropped (the magic packet is consumed), so
/// the caller should treat its network as new: no ARP entry or TCP connection survives.
pub fn sleep() -> u32 {
    write32(reg::SLEEP, 1);
    read32(reg::WAKE_REASON)
}

/// Powers the partition off with exit status `status` (0 = success).
pub fn power_off(status: u32) -> ! {
    write32(reg::POWER_OFF, status);
    park()
}

/// Asks the monitor to cold-boot the partition again from its image.
pub fn reboot() -> ! {
    write32(reg::REBOOT, 1);
    park()
}

/// Asks the monitor for a coordinated snapshot of the device (every partition, one cut),
/// written to its configured save destination; with `reboot`, the device then restarts from
/// that set. The write returns at once: the monitor runs the protocol while this partition
/// keeps running (the controller must go on answering its link, which is how the monitor
/// asks it to prepare), and at the cut every partition is paused. See
/// `docs/guest-abi.md`, "Coordinated snapshot".
pub fn request_snapshot(reboot: bool) {
    let value = if reboot {
        snapshot_request::SNAPSHOT_AND_REBOOT
    } else {
        snapshot_request::SNAPSHOT
    };
    write32(reg::SNAPSHOT_REQUEST, value);
}

/// Reports a CPU exception; the partition becomes `crashed`. Works from ring 0 and ring 3.
pub fn report_fault(vector: u64, error: u64, rip: u64) {
    write64(reg::FAULT_VECTOR, vector);
    write64(reg::FAULT_ERROR, error);
    write64(reg::FAULT_RIP, rip);
    write32(reg::FAULT_COMMIT, 1);
}

/// Reports a guest panic with `code` (the message is printed first by the caller).
pub fn report_panic(code: u32) {
    write32(reg::PANIC, code);
}
