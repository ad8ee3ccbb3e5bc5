//! One vCPU: its boot register state and the thread that runs it, dispatching VM exits
//! to the partition's devices and turning guest endings into an [`Outcome`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use duplex_devices::console::{Console, ConsoleHandle};
use duplex_devices::sysctl::{Sysctl, SysctlAction};
use duplex_devices::vsock::VsockMmio;

use super::shared::{CrashInfo, Outcome, Shared};
use crate::boot::BootEntry;
use crate::layout;
use crate::lock;

/// The devices of one partition, as its vCPU threads reach them.
#[derive(Debug)]
pub struct Devices {
    /// The console UART (ports 0x3f8.. and MMIO 0xd000_0000..).
    pub console: Mutex<Console>,
    /// The system control page.
    pub sysctl: Mutex<Sysctl>,
    /// The console's lines (for crash reports).
    pub console_log: ConsoleHandle,
    /// The vsock device's virtio-mmio window, when the partition has one.
    pub vsock: Option<VsockMmio>,
    /// The network card's virtio-mmio window, when the partition has one (shared with the
    /// device event loop, which moves received frames into it).
    pub net: Option<Arc<super::net::Card>>,
    /// The disk's virtio-mmio window, when the partition has one (requests run on the
    /// notifying vCPU thread).
    pub disk: Option<Arc<super::disk::Disk>>,
    /// The partition sleeps (guest ABI `SLEEP`): a copy of the control page's record that
    /// the vCPU loop reads at every exit without taking the page's lock (set by the `SLEEP`
    /// write, cleared by [`super::sleep::wake`] under that lock).
    pub asleep: std::sync::atomic::AtomicBool,
    /// Holds the partition's one queued snapshot request (guest ABI `SNAPSHOT_REQUEST`).
    pub snapshot_latch: Arc<SnapshotLatch>,
}

/// Identifies one run of a partition (so a late message about an old run is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The partition.
    pub name: String,
    /// Which boot of it.
    pub boot: u64,
}

/// What a partition's vCPU threads tell the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionEvent {
    /// The run ended (its outcome is in the partition's shared state).
    Ended(Ended),
    /// The guest asked for a coordinated snapshot (guest ABI `SNAPSHOT_REQUEST`).
    SnapshotRequest {
        /// The run that asked.
        run: Ended,
        /// Reboot from the snapshot once it is saved.
        reboot: bool,
        /// The partition's latch, to release once the request is handled.
        latch: LatchRef,
    },
}

/// At most one queued snapshot request per partition: a guest that writes
/// `SNAPSHOT_REQUEST` in a loop queues one event, and the writes made while it waits are
/// only counted (the monitor's memory does not grow with them).
#[derive(Debug, Default)]
pub struct SnapshotLatch {
    queued: AtomicBool,
    coalesced: AtomicU64,
}

impl SnapshotLatch {
    /// Whether this request is to be queued (true), or one is queued already (false; it
    /// is counted as coalesced).
    pub fn try_queue(&self) -> bool {
        let first = self
            .queued
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !first {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Frees the latch once the queued request is handled; returns the requests
    /// coalesced into it since the last release.
    pub fn release(&self) -> u64 {
        self.queued.store(false, Ordering::Release);
        self.coalesced.swap(0, Ordering::Relaxed)
    }
}

/// A partition's [`SnapshotLatch`] in an event (equal when it is the same latch).
#[derive(Debug, Clone)]
pub struct LatchRef(pub Arc<SnapshotLatch>);

impl PartialEq for LatchRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LatchRef {}

const IA32_TSC: u32 = 0x10;
/// Longest single guest sleep; the guest re-checks and waits again.
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// How many console lines a crash report carries.
pub const CRASH_TAIL: usize = 20;

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU in the 32-bit protected-mode state both PVH and the Linux 32-bit
/// boot protocol start in (flat segments, paging off), at the kernel's entry.
pub fn set_boot_state(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs = flat_segment(0x10, 0xb);
    let data = flat_segment(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0xffff,
        selector: 0x20,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)?;

    let mut regs = kvm_bindings::kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux { entry, boot_params } => {
            regs.rip = entry;
            regs.rsi = boot_params;
        }
    }
    vcpu.set_regs(&regs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
}

/// The guest's current TSC.
pub(crate) fn guest_tsc(vcpu: &VcpuFd) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice().first().map(|e| e.data),
        _ => None,
    }
}

/// Everything one vCPU thread owns.
pub struct VcpuRunner {
    /// The vCPU (locked while it runs; the monitor uses it while the vCPU is parked).
    pub vcpu: Arc<Mutex<VcpuFd>>,
    /// The partition's run control.
    pub shared: Arc<Shared>,
    /// The partition's devices.
    pub devices: Arc<Devices>,
    /// The TSC frequency in kHz (for guest sleeps).
    pub tsc_khz: u64,
    /// Where to say that the run ended.
    pub ended: Sender<PartitionEvent>,
    /// Identifies the run in [`Ended`].
    pub id: Ended,
}

/// What one exit asks for beyond the device access.
enum Next {
    Continue,
    Sleep(u64),
    End(Outcome),
    SnapshotRequest(bool),
    Crash {
        reason: String,
        vector: Option<u64>,
        rip: Option<u64>,
    },
}

impl VcpuRunner {
    /// Runs the vCPU until the partition is stopped or ends.
    pub fn run(mut self) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        if result.is_err() {
            self.crash("monitor error: the vCPU thread panicked".into(), None, None);
        }
        self.shared.thread_left();
        // The monitor may be gone during shutdown; nothing to tell then.
        let _ = self.ended.send(PartitionEvent::Ended(self.id.clone()));
    }

    fn run_loop(&mut self) {
        let vcpu = self.vcpu.clone();
        let park = || super::state::complete_pending_io(&mut lock(&vcpu));
        while self.shared.wait_runnable_then(park) {
            if super::sleep::asleep(&self.devices) {
                super::sleep::park(&self.devices, &self.shared);
                continue;
            }
            let next = self.run_once();
            crate::monitor::faults::at_vcpu_exit();
            match next {
                Next::Continue => {}
                Next::Sleep(deadline) => self.sleep_until(deadline),
                Next::End(outcome) => self.shared.finish(outcome),
                Next::Crash {
                    reason,
                    vector,
                    rip,
                } => self.crash(reason, vector, rip),
                Next::SnapshotRequest(reboot) => {
                    // The monitor runs the protocol on its own thread; the guest goes on.
                    // One request at a time is queued; the others are only counted.
                    let latch = &self.devices.snapshot_latch;
                    if latch.try_queue() {
                        let _ = self.ended.send(PartitionEvent::SnapshotRequest {
                            run: self.id.clone(),
                            reboot,
                            latch: LatchRef(latch.clone()),
                        });
                    }
                }
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let exits = &self.shared.exits;
        let mut vcpu = lock(&self.vcpu);
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                exits.count(&exits.io);
                if let Some(off) = console_port(port) {
                    lock(&self.devices.console).write(off, data);
                }
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                exits.count(&exits.io);
                match console_port(port) {
                    Some(off) => lock(&self.devices.console).read(off, data),
                    None => data.fill(0xff),
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                exits.count(&exits.mmio);
                mmio_read(&self.devices, addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                exits.count(&exits.mmio);
                mmio_write(&self.devices, addr, data)
            }
            Ok(VcpuExit::Hlt) => {
                exits.count(&exits.hlt);
                // Only without an in-kernel irqchip; nothing can wake the guest then
                // but the monitor, so wait for it.
                self.shared.guest_sleep(MAX_SLEEP);
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                exits.count(&exits.shutdown);
                Next::Crash {
                    reason: "triple fault (KVM shutdown exit)".into(),
                    vector: None,
                    rip: None,
                }
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exits.count(&exits.other);
                match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                        Next::End(Outcome::PowerOff { status: 0 })
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::End(Outcome::Reboot),
                    other => Next::Crash {
                        reason: format!("KVM system event {other}"),
                        vector: None,
                        rip: None,
                    },
                }
            }
            Ok(VcpuExit::InternalError) => {
                exits.count(&exits.other);
                Next::Crash {
                    reason: "KVM internal error (emulation failure)".into(),
                    vector: None,
                    rip: None,
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                exits.count(&exits.other);
                Next::Crash {
                    reason: format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}"),
                    vector: None,
                    rip: None,
                }
            }
            Ok(VcpuExit::Intr) => {
                exits.count(&exits.intr);
                Next::Continue
            }
            Ok(other) => {
                exits.count(&exits.other);
                Next::Crash {
                    reason: format!("unhandled VM exit {other:?}"),
                    vector: None,
                    rip: None,
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                exits.count(&exits.intr);
                Next::Continue
            }
            Err(e) => Next::Crash {
                reason: format!("KVM_RUN failed: {e}"),
                vector: None,
                rip: None,
            },
        }
    }

    fn sleep_until(&self, deadline: u64) {
        // The guest's deadline is in its time (TSC less its bias, when it keeps one).
        let deadline = {
            let sysctl = lock(&self.devices.sysctl);
            match sysctl.time_bias_addr() {
                Some(_) => deadline.wrapping_add(sysctl.time_bias()),
                None => deadline,
            }
        };
        let Some(now) = guest_tsc(&lock(&self.vcpu)) else {
            return;
        };
        if deadline <= now || self.tsc_khz == 0 {
            return;
        }
        let ns = u128::from(deadline - now) * 1_000_000 / u128::from(self.tsc_khz);
        let d = Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).min(MAX_SLEEP);
        self.shared.guest_sleep(d);
    }

    fn crash(&self, reason: String, vector: Option<u64>, rip: Option<u64>) {
        let rip = rip.or_else(|| lock(&self.vcpu).get_regs().ok().map(|r| r.rip));
        let console_tail = {
            let mut log = self.devices.console_log.lock();
            log.flush_partial();
            log.tail(CRASH_TAIL)
        };
        self.shared.finish(Outcome::Crashed(CrashInfo {
            reason,
            rip,
            vector,
            console_tail,
        }));
    }
}

fn console_port(port: u16) -> Option<u64> {
    port.checked_sub(layout::CONSOLE_PIO)
        .filter(|o| *o < 8)
        .map(u64::from)
}

fn virtio_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(layout::VIRTIO_MMIO_START)
        .filter(|o| *o < layout::VIRTIO_MMIO_SIZE)
}

fn disk_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(layout::BLK_MMIO)
        .filter(|o| *o < layout::VIRTIO_MMIO_SIZE)
}

fn net_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(layout::NET_MMIO)
        .filter(|o| *o < layout::VIRTIO_MMIO_SIZE)
}

fn mmio_read(devices: &Devices, addr: u64, data: &mut [u8]) {
    if let Some(off) = addr.checked_sub(layout::CONSOLE_MMIO).filter(|o| *o < 8) {
        lock(&devices.console).read(off, data);
    } else if let Some(off) = sysctl_offset(addr) {
        lock(&devices.sysctl).read(off, data);
    } else if let (Some(off), Some(vsock)) = (virtio_offset(addr), &devices.vsock) {
        vsock.read(off, data);
    } else if let (Some(off), Some(net)) = (net_offset(addr), &devices.net) {
        net.read(off, data);
    } else if let (Some(off), Some(disk)) = (disk_offset(addr), &devices.disk) {
        disk.read(off, data);
    } else {
        data.fill(0xff);
    }
}

fn sysctl_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(layout::SYSCTL_MMIO)
        .filter(|o| *o < 0x1000)
}

fn mmio_write(devices: &Devices, addr: u64, data: &[u8]) -> Next {
    if let Some(off) = addr.checked_sub(layout::CONSOLE_MMIO).filter(|o| *o < 8) {
        lock(&devices.console).write(off, data);
        return Next::Continue;
    }
    if let (Some(off), Some(vsock)) = (virtio_offset(addr), &devices.vsock) {
        vsock.write(off, data);
        return Next::Continue;
    }
    if let (Some(off), Some(net)) = (net_offset(addr), &devices.net) {
        net.write(off, data);
        return Next::Continue;
    }
    if let (Some(off), Some(disk)) = (disk_offset(addr), &devices.disk) {
        disk.write(off, data);
        return Next::Continue;
    }
    let Some(off) = sysctl_offset(addr) else {
        return Next::Continue;
    };
    let action = {
        let mut sysctl = lock(&devices.sysctl);
        let action = sysctl.write(off, data);
        if action == SysctlAction::Sleep {
            devices
                .asleep
                .store(true, std::sync::atomic::Ordering::Release);
        }
        action
    };
    match action {
        SysctlAction::None => Next::Continue,
        SysctlAction::PowerOff(status) => Next::End(Outcome::PowerOff { status }),
        SysctlAction::Reboot => Next::End(Outcome::Reboot),
        SysctlAction::WaitUntil(deadline) => Next::Sleep(deadline),
        SysctlAction::Fault(report) => Next::Crash {
            reason: report.reason(),
            vector: Some(report.vector),
            rip: Some(report.rip),
        },
        SysctlAction::SnapshotRequest { reboot } => Next::SnapshotRequest(reboot),
        // The loop parks the vCPU before its next entry into the guest.
        SysctlAction::Sleep => Next::Continue,
        SysctlAction::Panic(code) => Next::Crash {
            reason: format!("guest panic (code {code})"),
            vector: None,
            rip: None,
        },
    }
}

#[cfg(test)]
mod latch_tests {
    use super::*;

    #[test]
    fn a_flood_of_requests_queues_one_and_counts_the_rest() {
        let latch = SnapshotLatch::default();
        assert!(latch.try_queue());
        for _ in 0..10_000 {
            assert!(!latch.try_queue());
        }
        assert_eq!(latch.release(), 10_000);
        assert!(latch.try_queue(), "released: the next request queues");
        assert_eq!(latch.release(), 0);
    }
}
