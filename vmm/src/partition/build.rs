//! Building one run of a partition: guest memory, the KVM VM (irqchip, PIT, memory slots,
//! interrupt lines), vCPUs with CPUID, and the devices, either for a cold boot (kernel
//! loaded, boot registers set) or from a snapshot (state restored).

use duplex_devices::GuestMemoryMmap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use duplex_devices::console::{Console, ConsoleArgs, ConsoleHandle};
use duplex_devices::net::{NetMmio, NetMmioArgs};
use duplex_devices::persist::Persist;
use duplex_devices::sysctl::Sysctl;
use duplex_devices::virtio::Interrupt;
use duplex_devices::vsock::{VsockMmio, VsockMmioArgs, VsockSwitch};

use super::net::{PartitionNet, RunNet};
use super::shared::Shared;
use super::shell::{create_vm_base, Reservation, VmShell};
use super::snapshot::PartitionState;
use super::state;
use super::vcpu::{self, Devices};
use super::PartitionError;
use crate::boot;
use crate::config::PartitionConfig;
use crate::layout;

/// Where a run starts from.
pub enum Source<'a> {
    /// A cold boot from the partition's kernel image.
    Cold,
    /// A snapshot: its restored memory and saved state; with a `shell`, `mem` was loaded
    /// into the shell's reserved addresses and the shell's VM and vCPUs are used.
    Restore {
        mem: GuestMemoryMmap,
        state: &'a PartitionState,
        shell: Option<VmShell>,
        /// The disk restored from the set, opened instead of the configured file.
        disk: Option<&'a Path>,
    },
}

/// A VM ready for its vCPU threads.
pub struct Built {
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub devices: Arc<Devices>,
    pub shared: Arc<Shared>,
    /// The vsock switch this run's device is (or, restored, will be, when the restore
    /// commits with [`VsockSwitch::replace`]) attached to.
    pub vsock: Option<VsockSwitch>,
    /// The run's network card (not yet on the device event loop).
    pub net: Option<RunNet>,
    /// The MSRs saving this run's vCPUs reads (`None`: KVM could not list them).
    pub msrs: Option<&'static [u32]>,
    /// The addresses the guest memory is mapped at, when built from a shell (dropped last).
    pub reservation: Option<Reservation>,
    pub tsc_khz: u64,
}

struct Ctx<'a> {
    name: &'a str,
    mib: u64,
}

impl Ctx<'_> {
    fn kvm(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PartitionError + '_ {
        move |source| PartitionError::Kvm {
            name: self.name.to_owned(),
            what,
            source,
        }
    }

    fn memory(&self, message: String) -> PartitionError {
        PartitionError::Memory {
            name: self.name.to_owned(),
            mib: self.mib,
            message,
        }
    }

    fn eventfd(&self, what: &'static str) -> Result<EventFd, PartitionError> {
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PartitionError::Kvm {
            name: self.name.to_owned(),
            what,
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })
    }
}

/// Fresh anonymous guest memory for `config`.
pub fn new_memory(config: &PartitionConfig) -> Result<GuestMemoryMmap, PartitionError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(config.memory_mib << 20)
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| PartitionError::Memory {
        name: config.name.clone(),
        mib: config.memory_mib,
        message: e.to_string(),
    })
}

/// The VM with its irqchip, PIT and memory slots.
fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap, cx: &Ctx) -> Result<VmFd, PartitionError> {
    let vm = create_vm_base(kvm).map_err(cx.kvm("creating the VM"))?;
    register_slots(&vm, mem).map_err(|e| match e {
        SlotError::Memory(m) => cx.memory(m),
        SlotError::Kvm(source) => PartitionError::Kvm {
            name: cx.name.to_owned(),
            what: "registering guest memory",
            source,
        },
    })?;
    Ok(vm)
}

/// Why memory slots could not be (re)registered.
pub enum SlotError {
    Memory(String),
    Kvm(kvm_ioctls::Error),
}

/// Registers every RAM region of `mem` as a KVM memory slot (slot i = region i), with
/// KVM's dirty-page log on.
fn register_slots(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), SlotError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| SlotError::Memory(e.to_string()))?;
        let slot_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the partition's run
        // keeps for as long as the VM exists, and the slots do not overlap.
        unsafe { vm.set_user_memory_region(slot_region) }.map_err(SlotError::Kvm)?;
    }
    Ok(())
}

/// Builds a run of the partition `config` from `source`.
pub fn build(
    config: &PartitionConfig,
    console_log: &ConsoleHandle,
    kvm: &Kvm,
    switch: Option<&VsockSwitch>,
    net: Option<&PartitionNet>,
    mut source: Source,
) -> Result<Built, PartitionError> {
    let cx = Ctx {
        name: &config.name,
        mib: config.memory_mib,
    };
    let name = config.name.clone();
    let mem = match &source {
        Source::Cold => new_memory(config)?,
        Source::Restore { mem, state, .. } => {
            if state.vcpus.len() != usize::from(config.vcpus) {
                return Err(PartitionError::Restore {
                    name,
                    message: format!(
                        "the state has {} vCPUs, the config {}",
                        state.vcpus.len(),
                        config.vcpus
                    ),
                });
            }
            mem.clone()
        }
    };
    let entry = match &source {
        Source::Cold => {
            let mut cmdline = config.cmdline.clone();
            let entries = [
                config.vsock.is_some().then(layout::vsock_cmdline_entry),
                config.net.is_some().then(layout::net_cmdline_entry),
                config.disk.is_some().then(layout::blk_cmdline_entry),
            ];
            for entry in entries.into_iter().flatten() {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&entry);
            }
            let ram = layout::ram_ranges(config.memory_mib << 20);
            Some(
                boot::load_kernel(&mem, &config.kernel, &cmdline, &ram).map_err(|source| {
                    PartitionError::Boot {
                        name: name.clone(),
                        source,
                    }
                })?,
            )
        }
        Source::Restore { .. } => None,
    };

    // Every run tracks its writes from the start (KVM's dirty log on every slot): a live
    // snapshot needs the log, and registering the slots again to switch it on later costs
    // 5-12 ms here. Guest RAM is not backed by huge pages (THP is `madvise` here and the
    // monitor does not ask), so the log costs the running guest nothing until a snapshot
    // harvests it (write faults then mark pages again).
    let shell = match &mut source {
        Source::Restore { shell, .. } => shell.take(),
        Source::Cold => None,
    };
    let (vm, mut ready_vcpus, reservation) = match shell {
        Some(shell) => {
            let at: Vec<usize> = mem
                .iter()
                .filter_map(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
                .map(|p| p as usize)
                .collect();
            if !shell.fits(config) || at != shell.reservation.addresses() {
                return Err(PartitionError::Restore {
                    name,
                    message: "the VM shell does not fit the partition or its memory".into(),
                });
            }
            (shell.vm, shell.vcpus, Some(shell.reservation))
        }
        None => (create_vm(kvm, &mem, &cx)?, Vec::new(), None),
    };
    ready_vcpus.reverse();
    let restore_err = |source| PartitionError::State {
        name: name.clone(),
        source,
    };
    if let Source::Restore { state, .. } = &source {
        state::Vm::restore(state::Vm { fd: &vm }, &state.vm).map_err(restore_err)?;
    }
    let console_irq = cx.eventfd("creating the console eventfd")?;
    vm.register_irqfd(&console_irq, layout::CONSOLE_GSI)
        .map_err(cx.kvm("wiring the console interrupt"))?;

    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(cx.kvm("reading supported CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = match ready_vcpus.pop() {
            Some(v) => v,
            None => {
                let vcpu = vm
                    .create_vcpu(u64::from(id))
                    .map_err(cx.kvm("creating a vCPU"))?;
                vcpu.set_cpuid2(&cpuid).map_err(cx.kvm("setting CPUID"))?;
                vcpu
            }
        };
        if let (0, Some(entry)) = (id, entry) {
            vcpu::set_boot_state(&vcpu, entry).map_err(cx.kvm("setting boot registers"))?;
        }
        if let Source::Restore { state, .. } = &source {
            if let Some(s) = state.vcpus.get(usize::from(id)) {
                let v = state::Vcpu {
                    fd: &vcpu,
                    id,
                    msrs: None,
                };
                state::Vcpu::restore(v, s).map_err(restore_err)?;
            }
        }
        vcpus.push(vcpu);
    }
    // What saving this run's vCPUs will need; without it a snapshot fails (a cold boot
    // does not).
    let msrs = match vcpus.first().map(|v| state::saveable_msrs(kvm, v)) {
        Some(Ok(list)) => Some(list),
        Some(Err(e)) => {
            log::warn!("partition {name}: {e}: snapshots of it will fail");
            None
        }
        None => None,
    };
    let tsc_khz = vcpus
        .first()
        .and_then(|v| v.get_tsc_khz().ok())
        .map_or(0, u64::from);

    let shared = Arc::new(match &source {
        Source::Cold => Shared::new(vcpus.len()),
        Source::Restore { .. } => Shared::new_paused(vcpus.len()),
    });
    // The console and control page first: nothing may fail once the vsock device is
    // attached (or prepared in the switch).
    let (console, sysctl) = match &source {
        Source::Cold => (
            Console::new(console_irq, console_log.clone()),
            Sysctl::new(tsc_khz),
        ),
        Source::Restore { state, .. } => (
            Console::restore(
                ConsoleArgs {
                    irq: console_irq,
                    handle: console_log.clone(),
                },
                &state.devices.console,
            )
            .map_err(|e| PartitionError::Restore {
                name: name.clone(),
                message: format!("console: {e}"),
            })?,
            match Sysctl::restore((), &state.devices.sysctl) {
                Ok(s) => s,
                Err(never) => match never {},
            },
        ),
    };
    // The card and the disk before the vsock device: nothing may fail once that is attached.
    let net = build_net(config, net, &vm, &mem, &shared, &source, &cx)?;
    let disk_file = match (&config.disk, &source) {
        (
            Some(d),
            Source::Restore {
                disk: Some(path), ..
            },
        ) => Some(super::disk::open_file(&name, d, path)?),
        (Some(d), _) => Some(super::disk::open_file(&name, d, &d.file)?),
        (None, _) => None,
    };
    let (saved_disk, restoring) = match &source {
        Source::Cold => (None, false),
        Source::Restore { state, .. } => (state.devices.blk.as_ref(), true),
    };
    let disk = super::disk::build(config, disk_file, saved_disk, restoring, &vm, &mem, &shared)?;
    let vsock = match (&config.vsock, switch) {
        (None, _) => None,
        (Some(_), None) => return Err(PartitionError::NoSwitch { name }),
        (Some(v), Some(switch)) => {
            let irqfd = cx.eventfd("creating the vsock eventfd")?;
            vm.register_irqfd(&irqfd, layout::VSOCK_GSI)
                .map_err(cx.kvm("wiring the vsock interrupt"))?;
            let waker = Arc::downgrade(&shared);
            let wake = Arc::new(move || {
                if let Some(s) = waker.upgrade() {
                    s.wake_guest();
                }
            });
            let irq = Interrupt::new(irqfd, wake);
            let vsock_err = |source| PartitionError::Vsock {
                name: name.clone(),
                source,
            };
            let mmio: VsockMmio = match &source {
                Source::Cold => {
                    let uds = duplex_devices::vsock::UdsConfig {
                        path: v.uds.clone(),
                        mode: v.uds_mode(),
                    };
                    switch
                        .attach_with(v.cid, &name, mem.clone(), irq, uds)
                        .map_err(vsock_err)?
                }
                // Prepared: it waits in the switch until the restore commits.
                Source::Restore { state, .. } => match &state.devices.vsock {
                    Some(saved) => {
                        let args = VsockMmioArgs {
                            switch: switch.clone(),
                            cid: v.cid,
                            name: name.clone(),
                            mem: mem.clone(),
                            irq,
                            uds: v.uds.clone(),
                            uds_mode: v.uds_mode(),
                        };
                        VsockMmio::restore(args, saved).map_err(vsock_err)?
                    }
                    None => {
                        return Err(PartitionError::Restore {
                            name,
                            message: "the config has a vsock device, the state none".into(),
                        })
                    }
                },
            };
            Some((mmio, switch.clone()))
        }
    };
    let (vsock_mmio, vsock_switch) = match vsock {
        Some((mmio, switch)) => (Some(mmio), Some(switch)),
        None => (None, None),
    };
    let devices = Arc::new(Devices {
        console: Mutex::new(console),
        // A partition restored from a set taken while it slept goes on sleeping.
        asleep: std::sync::atomic::AtomicBool::new(sysctl.asleep()),
        sysctl: Mutex::new(sysctl),
        console_log: console_log.clone(),
        vsock: vsock_mmio,
        net: net.as_ref().map(|n| n.card.clone()),
        disk,
        snapshot_latch: Default::default(),
    });
    Ok(Built {
        vm,
        mem,
        vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
        devices,
        shared,
        vsock: vsock_switch,
        net,
        msrs,
        reservation,
        tsc_khz,
    })
}

/// The run's network card, when the partition has one: its interrupt wired to
/// [`layout::NET_GSI`], its backend a duplicate of the partition's TAP; new for a cold boot,
/// restored (and validated) from the state otherwise.
fn build_net(
    config: &PartitionConfig,
    net: Option<&PartitionNet>,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    shared: &Arc<Shared>,
    source: &Source,
    cx: &Ctx,
) -> Result<Option<RunNet>, PartitionError> {
    let name = cx.name.to_owned();
    let restore_err = |message: String| PartitionError::Restore {
        name: name.clone(),
        message,
    };
    let saved = match source {
        Source::Cold => None,
        Source::Restore { state, .. } => state.devices.net.as_ref(),
    };
    let net = match (&config.net, net) {
        (None, _) => {
            if saved.is_some() {
                return Err(restore_err(
                    "the state has a network card, the config none".into(),
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(PartitionError::Net {
                name,
                message: "the partition's TAP is not open".into(),
            })
        }
        (Some(_), Some(net)) => net,
    };
    let irqfd = cx.eventfd("creating the network card's eventfd")?;
    vm.register_irqfd(&irqfd, layout::NET_GSI)
        .map_err(cx.kvm("wiring the network card's interrupt"))?;
    let waker = Arc::downgrade(shared);
    let wake = Arc::new(move || {
        if let Some(s) = waker.upgrade() {
            s.wake_guest();
        }
    });
    let irq = Interrupt::new(irqfd, wake);
    let backend = net.backend(&name)?;
    let card = match source {
        Source::Cold => {
            NetMmio::new(backend, net.mac(), mem.clone(), irq).map_err(|e| PartitionError::Net {
                name: name.clone(),
                message: e.to_string(),
            })?
        }
        Source::Restore { .. } => {
            let Some(saved) = saved else {
                return Err(restore_err(
                    "the config has a network card, the state none".into(),
                ));
            };
            let args = NetMmioArgs {
                backend,
                mac: net.mac(),
                mem: mem.clone(),
                irq,
            };
            NetMmio::restore(args, saved).map_err(|e| restore_err(e.to_string()))?
        }
    };
    Ok(Some(net.run_net(card)))
}
