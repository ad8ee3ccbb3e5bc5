//! VM shells: a partition's KVM VM made ahead of need, so that a restore does not pay for
//! it. A shell is a VM with its TSS, irqchip and PIT, its vCPUs with CPUID set, and one
//! memory slot (dirty logging on) per RAM region over an address range reserved for the
//! guest's memory. Making one costs 5–12 ms here, most of it in
//! `KVM_SET_USER_MEMORY_REGION` (a fixed part, then about 7 µs per MiB of slot); a restore
//! that finds a shell ready maps the set's memory file over the reservation (`MAP_FIXED`:
//! the slot's addresses stay valid, KVM follows the new mapping) and restores the state
//! into the shell's VM and vCPUs. The monitor makes one shell per partition in the
//! background: at start when it restores a set, and after every restore for the next
//! reboot (see `docs/decisions.md`).

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::PartitionError;
use crate::config::PartitionConfig;
use crate::layout;

/// Address ranges reserved for a partition's guest memory (one per RAM region), unmapped
/// when dropped. Whatever is mapped into them (guest memory) goes with them: the run that
/// owns the reservation drops it last, after its VM, threads and devices.
#[derive(Debug)]
pub struct Reservation {
    /// `(guest address, host address, length)` per RAM region.
    ranges: Vec<(u64, usize, usize)>,
}

impl Reservation {
    /// Reserves (`PROT_NONE`, no memory behind it) one range per RAM region of `bytes` of
    /// guest RAM.
    fn new(bytes: u64) -> std::io::Result<Reservation> {
        let mut r = Reservation { ranges: Vec::new() };
        for (gpa, len) in layout::ram_ranges(bytes) {
            let len = usize::try_from(len).map_err(|_| std::io::Error::other("too large"))?;
            // SAFETY: a new private reservation at an address the kernel picks; it aliases
            // nothing.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            r.ranges.push((gpa, p as usize, len));
        }
        Ok(r)
    }

    /// The host address of each range, in RAM region order.
    pub fn addresses(&self) -> Vec<usize> {
        self.ranges.iter().map(|&(_, addr, _)| addr).collect()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for &(_, addr, len) in &self.ranges {
            // SAFETY: the range this value reserved; by the ownership rule above nothing
            // uses the memory mapped into it any more.
            unsafe {
                libc::munmap(addr as *mut libc::c_void, len);
            }
        }
    }
}

/// A VM made ahead of need (see the module docs).
#[derive(Debug)]
pub struct VmShell {
    /// The partition (and size) it was made for.
    pub name: String,
    pub memory_mib: u64,
    pub vcpu_count: u8,
    pub vm: VmFd,
    /// Created, with KVM's supported CPUID set.
    pub vcpus: Vec<VcpuFd>,
    pub reservation: Reservation,
}

impl VmShell {
    /// Makes a shell for `config`.
    pub fn new(kvm: &Kvm, config: &PartitionConfig) -> Result<VmShell, PartitionError> {
        let name = config.name.clone();
        let err = |what: &'static str| {
            let name = name.clone();
            move |source| PartitionError::Kvm { name, what, source }
        };
        let reservation =
            Reservation::new(config.memory_mib << 20).map_err(|e| PartitionError::Memory {
                name: name.clone(),
                mib: config.memory_mib,
                message: format!("reserving addresses: {e}"),
            })?;
        let vm = create_vm_base(kvm).map_err(err("creating the VM"))?;
        for (slot, &(gpa, addr, len)) in reservation.ranges.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: len as u64,
                userspace_addr: addr as u64,
            };
            // SAFETY: the range is reserved by `reservation`, which the shell (and then the
            // run built from it) keeps for as long as the VM exists; slots do not overlap.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(err("registering guest memory"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(err("reading supported CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(err("creating a vCPU"))?;
            vcpu.set_cpuid2(&cpuid).map_err(err("setting CPUID"))?;
            vcpus.push(vcpu);
        }
        Ok(VmShell {
            name,
            memory_mib: config.memory_mib,
            vcpu_count: config.vcpus,
            vm,
            vcpus,
            reservation,
        })
    }

    /// Whether the shell fits `config` (same partition, memory and vCPUs).
    pub fn fits(&self, config: &PartitionConfig) -> bool {
        self.name == config.name
            && self.memory_mib == config.memory_mib
            && self.vcpu_count == config.vcpus
    }
}

/// A VM with its TSS, irqchip and PIT, without memory.
pub fn create_vm_base(kvm: &Kvm) -> Result<VmFd, kvm_ioctls::Error> {
    let vm = kvm.create_vm()?;
    vm.set_tss_address(layout::KVM_TSS_ADDR)?;
    vm.create_irq_chip()?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)?;
    Ok(vm)
}
