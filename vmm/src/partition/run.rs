//! One run of a partition (its VM, memory, vCPU threads and devices), how it ends, and the
//! prepare half of a restore: a run built beside the running one (`Builder`), not yet
//! installed (`PreparedRun`).

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use duplex_devices::console::ConsoleHandle;
use duplex_devices::persist::Persist;
use duplex_devices::vsock::VsockSwitch;
use duplex_devices::GuestMemoryMmap;

use super::net::{PartitionNet, RunNet};
use super::shared::{ExitCounts, Outcome, Shared};
use super::vcpu::{Devices, Ended, PartitionEvent, VcpuRunner};
use super::{build, kick_all, shell, snapshot, PartitionError, PARK_TIMEOUT};
use crate::config::PartitionConfig;

/// One run of a partition: the VM and its threads.
pub struct Run {
    pub(super) vm: VmFd,
    pub(super) mem: GuestMemoryMmap,
    pub(super) vcpus: Vec<Arc<Mutex<kvm_ioctls::VcpuFd>>>,
    pub(super) devices: Arc<Devices>,
    pub(super) threads: Vec<JoinHandle<()>>,
    pub(super) shared: Arc<Shared>,
    pub(super) started: Instant,
    pub(super) boot: u64,
    /// The partition's name (errors, logs).
    pub(super) name: String,
    /// The MSRs saving the vCPUs reads (`None`: KVM could not list them when built).
    pub(super) msrs: Option<&'static [u32]>,
    /// The switch this run's vsock device is attached to (detached when the run ends,
    /// unless a restore replaced it meanwhile).
    pub(super) vsock: Option<VsockSwitch>,
    /// The run's network card and its place on the device event loop (taken off when the
    /// run ends).
    pub(super) net: Option<RunNet>,
    /// Which writes to this run's memory are known (see [`snapshot::DirtyLog`]).
    pub(super) dirty: snapshot::DirtyLog,
    /// The address ranges the guest memory is mapped into, when the run was built from a
    /// [`shell::VmShell`]. Last, so it is dropped last: after the VM, the vCPUs and every
    /// device holding the memory.
    pub(super) _reservation: Option<shell::Reservation>,
}

impl Run {
    /// Ends the run: its vCPU threads leave and are joined; the VM goes when dropped.
    /// Its vsock device is detached only if it is still the switch's attachment.
    pub(super) fn end(&mut self) -> (ExitCounts, Option<Outcome>) {
        self.shared.finish(Outcome::Stopped);
        let deadline = Instant::now() + PARK_TIMEOUT;
        while self.shared.lock().live > 0 && Instant::now() < deadline {
            kick_all(&self.threads);
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        if let (Some(switch), Some(mmio)) = (&self.vsock, &self.devices.vsock) {
            switch.detach_device(mmio);
        }
        if let Some(net) = &mut self.net {
            net.unsubscribe();
        }
        let outcome = self.shared.lock().outcome.clone();
        (self.shared.exits.read(), outcome)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.end();
    }
}

/// A run built from a snapshot, its vCPU threads parked, not yet part of the device (a
/// dropped one ends): the
/// prepare half of a restore ([`Builder::prepare_restore`], [`Partition::install`]).
pub struct PreparedRun {
    pub(super) run: Run,
    /// Its disk, restored beside the partition's backing file until the install.
    pub(super) disk: Option<super::disk::RestoredDisk>,
}

impl PreparedRun {
    /// Its vsock device, prepared in the switch, for [`VsockSwitch::replace`].
    pub fn vsock_device(&self) -> Option<&duplex_devices::vsock::VsockMmio> {
        self.run.devices.vsock.as_ref()
    }
}

impl Run {
    /// Puts the run's network card on the device event loop (a cold boot's start, a
    /// restored run's install).
    pub(super) fn subscribe_net(&mut self) {
        if let Some(net) = &mut self.net {
            if let Err(e) = net.subscribe() {
                log::error!("partition {}: network card: {e}", self.name);
            }
        }
    }
}

/// Ends runs replaced by a restore on a thread of their own, off the critical path (the
/// VM teardown, unmapping its memory and joining its threads take milliseconds).
pub fn discard_in_background(runs: Vec<Run>) {
    if runs.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("teardown".into())
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
            drop(runs);
        });
    if let Err(e) = spawned {
        // The closure, and the runs with it, was dropped: they ended in place.
        log::warn!("teardown thread: {e}; the replaced runs were ended in place");
    }
}

/// What [`Partition::builder`] takes of a partition: enough to build a run from a set.
pub struct Builder {
    pub(super) config: PartitionConfig,
    pub(super) console: ConsoleHandle,
    pub(super) boot: u64,
    pub(super) net: Option<Arc<PartitionNet>>,
}

impl Builder {
    /// Builds a run of the partition from a snapshot (`mem` is its restored memory) with
    /// its vCPU threads started but parked, without touching the partition or its current
    /// run: [`Partition::install`] makes it the partition's run. Dropped or
    /// dropped, it leaves nothing behind (its threads end, its vsock device leaves the switch).
    pub fn prepare_restore(
        &self,
        with: &RestoreWith,
        mem: GuestMemoryMmap,
        state: &snapshot::PartitionState,
        shell: Option<shell::VmShell>,
        disk: Option<super::disk::RestoredDisk>,
    ) -> Result<PreparedRun, PartitionError> {
        let args = snapshot::RunArgs {
            shell,
            config: self.config.clone(),
            console: self.console.clone(),
            kvm: with.kvm.clone(),
            switch: with.switch.clone(),
            ended: with.ended.clone(),
            mem,
            boot: self.boot,
            set_id: with.set_id.clone(),
            net: self.net.clone(),
            disk: disk.as_ref().map(|d| d.path.clone()),
        };
        Ok(PreparedRun {
            run: Run::restore(args, state)?,
            disk,
        })
    }
}

/// What every partition's restore from one set shares.
pub struct RestoreWith {
    pub kvm: Arc<Kvm>,
    pub switch: Option<VsockSwitch>,
    pub ended: Sender<PartitionEvent>,
    /// The set restored from.
    pub set_id: String,
}

/// A new run id, unique in the process: a late message from a run (its `Ended`) can never
/// be taken for one of a later run, even of a run that was prepared and thrown away.
pub(super) fn next_boot_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A run of a built VM with its vCPU threads started, as run id `boot`.
pub(super) fn spawn(
    name: &str,
    built: build::Built,
    ended: &Sender<PartitionEvent>,
    boot: u64,
) -> Result<Run, PartitionError> {
    let name = name.to_owned();
    let build::Built {
        vm,
        mem,
        vcpus,
        devices,
        shared,
        vsock,
        net,
        msrs,
        reservation,
        tsc_khz,
    } = built;
    let mut threads = Vec::new();
    for (i, vcpu) in vcpus.iter().enumerate() {
        let runner = VcpuRunner {
            vcpu: vcpu.clone(),
            shared: shared.clone(),
            devices: devices.clone(),
            tsc_khz,
            ended: ended.clone(),
            id: Ended {
                name: name.clone(),
                boot,
            },
        };
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-vcpu{i}"))
            .spawn(move || {
                crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Vcpu);
                runner.run()
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(source) => {
                shared.finish(Outcome::Stopped);
                kick_all(&threads);
                if let (Some(switch), Some(mmio)) = (&vsock, &devices.vsock) {
                    switch.detach_device(mmio);
                }
                return Err(PartitionError::Thread { name, source });
            }
        }
    }
    Ok(Run {
        vm,
        mem,
        vcpus,
        devices,
        threads,
        shared,
        started: Instant::now(),
        boot,
        name,
        msrs,
        vsock,
        net,
        dirty: snapshot::DirtyLog::new(),
        _reservation: reservation,
    })
}
