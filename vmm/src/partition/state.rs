//! Capture and restore of the KVM state of one partition: every vCPU (registers, special
//! registers, xsave, XCRs, MSRs incl. the TSC, LAPIC, pending events, MP state, debug
//! registers) and the VM (PIC, IOAPIC, PIT, kvm-clock). The state is plain data
//! (kvm-bindings' serde), saved in a set's state file.
//!
//! Restore order follows what KVM needs (as Firecracker and Cloud Hypervisor do): the VM's
//! irqchip, PIT and clock first; per vCPU: MP state, regs, sregs, xsave, XCRs, debug
//! registers, LAPIC, MSRs, and vCPU events last.

use std::sync::OnceLock;

use duplex_devices::persist::Persist;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// A KVM state ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct StateError {
    /// Which state, get or set (e.g. `KVM_GET_LAPIC`).
    pub op: &'static str,
    /// The error KVM returned.
    pub source: kvm_ioctls::Error,
}

fn err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { op, source }
}

/// The state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index in the partition.
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debug_regs: kvm_debugregs,
    /// TSC frequency in kHz when saved (restore refuses another frequency it cannot set).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The VM-wide state of a partition.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// The MSRs KVM can save on this host: its index list, less those that cannot be read
/// (probed once per process). A list that cannot be had, or that lacks the TSC, is an
/// error: a set without them would restore a guest whose clock jumps.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<&'static [u32], StateError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let index_list = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(err("KVM_GET_MSR_INDEX_LIST"))?;
    let readable = |index: u32| {
        Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()
        .is_some_and(|mut m| vcpu.get_msrs(&mut m) == Ok(1))
    };
    let list = check_msr_list(index_list.into_iter().filter(|&i| readable(i)).collect())?;
    Ok(LIST.get_or_init(|| list))
}

/// The MSR list must hold the TSC (so it is not empty either).
fn check_msr_list(list: Vec<u32>) -> Result<Vec<u32>, StateError> {
    if list.contains(&IA32_TSC) {
        Ok(list)
    } else {
        Err(StateError {
            op: if list.is_empty() {
                "KVM_GET_MSR_INDEX_LIST (no MSR can be saved)"
            } else {
                "KVM_GET_MSR_INDEX_LIST (the TSC cannot be saved)"
            },
            source: kvm_ioctls::Error::new(libc::ENOENT),
        })
    }
}

const IA32_TSC: u32 = 0x10;

/// A vCPU as [`Persist`] sees it: its fd, its index, and the MSRs this host can save
/// (`None`: the list could not be had when the VM was built, so saving fails).
pub struct Vcpu<'a> {
    pub fd: &'a VcpuFd,
    pub id: u8,
    pub msrs: Option<&'static [u32]>,
}

impl Persist for Vcpu<'_> {
    type State = VcpuState;
    /// The new vCPU (created, with the partition's CPUID set) to restore into.
    type ConstructorArgs = Self;
    type Error = StateError;

    /// Saves the vCPU. It must be out of KVM_RUN, with any pending port or MMIO exit
    /// completed (see [`complete_pending_io`]).
    fn save(&self) -> Result<VcpuState, StateError> {
        let msrs = self.msrs.ok_or(StateError {
            op: "KVM_GET_MSR_INDEX_LIST (no MSR list: cannot save the vCPU)",
            source: kvm_ioctls::Error::new(libc::ENOENT),
        })?;
        save_vcpu(msrs, self.id, self.fd)
    }

    fn restore(args: Self, state: &VcpuState) -> Result<Self, StateError> {
        restore_vcpu(args.fd, state)?;
        Ok(args)
    }
}

/// A VM as [`Persist`] sees it (its irqchip, PIT and clock).
pub struct Vm<'a> {
    pub fd: &'a VmFd,
}

impl Persist for Vm<'_> {
    type State = VmState;
    /// The new VM (with its irqchip and PIT created) to restore into.
    type ConstructorArgs = Self;
    type Error = StateError;

    /// Saves the VM-wide state (all vCPUs paused).
    fn save(&self) -> Result<VmState, StateError> {
        save_vm(self.fd)
    }

    /// Restores the VM-wide state (before the vCPUs).
    fn restore(args: Self, state: &VmState) -> Result<Self, StateError> {
        restore_vm(args.fd, state)?;
        Ok(args)
    }
}

/// Saves one vCPU with the MSRs `indices`.
fn save_vcpu(indices: &[u32], id: u8, vcpu: &VcpuFd) -> Result<VcpuState, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
        op: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
    Ok(VcpuState {
        id,
        regs: vcpu.get_regs().map_err(err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
        msrs: msrs.as_slice()[..n.min(msrs.as_slice().len())].to_vec(),
        lapic: vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
        events: vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
        debug_regs: vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        tsc_khz: vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?,
    })
}

/// Restores one vCPU (created with the partition's CPUID already set).
fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    if vcpu.get_tsc_khz().ok() != Some(s.tsc_khz) {
        vcpu.set_tsc_khz(s.tsc_khz)
            .map_err(err("KVM_SET_TSC_KHZ"))?;
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(err("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole kvm_xsave (4 KiB). The kernel reads more than that only
    // when the process asked for dynamic xfeatures (ARCH_REQ_XCOMP_GUEST_PERM, e.g. AMX),
    // which this monitor never does.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| StateError {
        op: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        let index = s.msrs.get(n).map_or(0, |m| m.index);
        return Err(StateError {
            op: if index == 0 {
                "KVM_SET_MSRS"
            } else {
                "KVM_SET_MSRS (an MSR was refused)"
            },
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))
}

/// Completes a port or MMIO exit the vCPU is stopped at (KVM finishes the instruction on
/// the next KVM_RUN): one KVM_RUN with `immediate_exit` set, which returns at once.
pub fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; the instruction is complete either way.
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

fn irqchip(vm: &VmFd, chip_id: u32, op: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(err(op))?;
    Ok(chip)
}

fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
    })
}

fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    vm.set_irqchip(&s.pic_master)
        .map_err(err("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&s.pic_slave)
        .map_err(err("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&s.ioapic)
        .map_err(err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    vm.set_pit2(&s.pit).map_err(err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with an irqchip, a PIT and one vCPU with KVM's CPUID.
    fn vm_and_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().expect("create VM");
        vm.create_irq_chip().expect("irqchip");
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .expect("pit");
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("cpuid");
        vcpu.set_cpuid2(&cpuid).expect("set cpuid");
        (vm, vcpu)
    }

    #[test]
    fn an_msr_list_without_the_tsc_is_an_error() {
        let e = check_msr_list(Vec::new()).expect_err("empty");
        assert!(e.to_string().contains("no MSR can be saved"), "{e}");
        let e = check_msr_list(vec![0x174, 0x175]).expect_err("no TSC");
        assert!(e.to_string().contains("the TSC cannot be saved"), "{e}");
        assert_eq!(
            check_msr_list(vec![0x10, 0x174]).expect("with TSC"),
            vec![0x10, 0x174]
        );
    }

    #[test]
    fn kvm_vcpu_and_vm_state_round_trip_through_json() {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "SKIPPED-BY-ENVIRONMENT: /dev/kvm is missing (scripts/test skips kvm_ tests)"
        );
        let kvm = Kvm::new().expect("kvm");
        let (vm, vcpu) = vm_and_vcpu(&kvm);
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rax = 0x1234_5678;
        regs.rip = 0x10_0042;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).expect("set regs");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs).expect("set sregs");
        let saved =
            save_vcpu(saveable_msrs(&kvm, &vcpu).expect("msrs"), 0, &vcpu).expect("save vcpu");
        let saved_vm = save_vm(&vm).expect("save vm");
        assert!(
            saved.msrs.iter().any(|m| m.index == 0x10),
            "the TSC MSR is saved"
        );

        let vcpu_json = serde_json::to_string(&saved).expect("to json");
        let vm_json = serde_json::to_string(&saved_vm).expect("to json");
        let back: VcpuState = serde_json::from_str(&vcpu_json).expect("from json");
        let back_vm: VmState = serde_json::from_str(&vm_json).expect("from json");

        let (vm2, vcpu2) = vm_and_vcpu(&kvm);
        restore_vm(&vm2, &back_vm).expect("restore vm");
        restore_vcpu(&vcpu2, &back).expect("restore vcpu");
        let again =
            save_vcpu(saveable_msrs(&kvm, &vcpu2).expect("msrs"), 0, &vcpu2).expect("save again");
        assert_eq!(again.regs.rax, 0x1234_5678);
        assert_eq!(again.regs.rip, 0x10_0042);
        assert_eq!(again.sregs.cr0 & 1, 1);
        assert_eq!(again.mp_state.mp_state, saved.mp_state.mp_state);
        assert_eq!(again.lapic.regs[..0x40], saved.lapic.regs[..0x40]);
        assert_eq!(again.xcrs.xcrs[0].value, saved.xcrs.xcrs[0].value);
        // The TSC goes on from the saved value (it does not restart at 0).
        let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.index == 0x10).map(|m| m.data);
        assert!(
            tsc(&again) >= tsc(&saved),
            "{:?} < {:?}",
            tsc(&again),
            tsc(&saved)
        );
        let vm_again = save_vm(&vm2).expect("save vm again");
        assert_eq!(
            vm_again.pit.channels[0].count,
            saved_vm.pit.channels[0].count
        );
    }
}
