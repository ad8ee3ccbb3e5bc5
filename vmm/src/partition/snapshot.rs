//! A partition's part of a snapshot set: its saved state (KVM VM and vCPUs, devices) as
//! plain data, captured while the partition is paused and restored into a new run.

use crate::lock;

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use duplex_devices::blk::BlkMmioState;
use duplex_devices::console::ConsoleState;
use duplex_devices::net::NetMmioState;
use duplex_devices::persist::Persist;
use duplex_devices::sysctl::Sysctl;
use duplex_devices::vsock::VsockMmioState;

use super::shared::Shared;
use super::state::{self, VcpuState, VmState};
use super::vcpu::PartitionEvent;
use super::{build, Partition, PartitionError, Run, State};
use crate::config::PartitionConfig;
use duplex_devices::console::ConsoleHandle;
use duplex_devices::vsock::VsockSwitch;
use duplex_devices::GuestMemoryMmap;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Version of [`PartitionState`]; a state file of another version is refused.
pub const STATE_VERSION: u32 = 1;

/// The devices of a partition, saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub console: ConsoleState,
    pub sysctl: Sysctl,
    pub vsock: Option<VsockMmioState>,
    /// The network card (absent in sets of partitions without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetMmioState>,
    /// The disk's device (absent in sets of partitions without one); the disk's contents
    /// are in the set's disk image, not here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk: Option<BlkMmioState>,
}

/// Everything of a partition but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct PartitionState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The partition's name.
    pub name: String,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// What is known of the writes to a run's memory: whether KVM's dirty log is on, the set
/// since whose cut every write is tracked (the parent an incremental set may name), and the
/// pages harvested from the logs since then but not yet in a committed set. A snapshot
/// that fails leaves it as it was, so the next incremental set misses nothing.
#[derive(Debug, Default)]
pub struct DirtyLog {
    /// For a run restored lazily from a set: its memory file's mappings, guarded against the
    /// file being truncated (see [`duplex_snapshot::guard`]); a fault there crashes the run.
    guard: Option<duplex_snapshot::MemoryGuard>,
    since: Option<String>,
    /// Harvested since `since` (one bitmap per RAM region), or nothing harvested yet.
    pending: Option<Vec<Vec<u64>>>,
    /// The disk's 4 KiB blocks harvested since `since` (one bitmap), or nothing yet.
    disk_pending: Option<Vec<u64>>,
}

impl DirtyLog {
    /// A log for a new run (KVM's dirty log is on from the start).
    pub fn new() -> Self {
        DirtyLog::default()
    }

    /// The run was restored from set `set_id` with the dirty log on from the start.
    pub fn restored(&mut self, set_id: &str) {
        self.since = Some(set_id.to_owned());
        self.pending = None;
        self.disk_pending = None;
    }

    fn add(&mut self, fresh: &[Vec<u64>]) {
        match &mut self.pending {
            None => self.pending = Some(fresh.to_vec()),
            Some(p) => {
                for (pr, fr) in p.iter_mut().zip(fresh) {
                    for (a, b) in pr.iter_mut().zip(fr) {
                        *a |= b;
                    }
                }
            }
        }
    }
}

/// The union of two page bitmaps (one `Vec` per region).
pub fn union(a: &[Vec<u64>], b: &[Vec<u64>]) -> Vec<Vec<u64>> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p | q).collect())
        .collect()
}

impl Partition {
    /// Pages of each RAM region written since the last harvest (or since the run started):
    /// the guest's writes from KVM's dirty log, the monitor's own (virtio rings and
    /// buffers) from the memory's bitmap; one bit per 4 KiB page, one `Vec` per region.
    /// Both logs are cleared, and what they held joins the run's pending pages (see
    /// [`DirtyLog`]).
    pub fn harvest_dirty(&mut self) -> Result<Vec<Vec<u64>>, PartitionError> {
        let name = self.config.name.clone();
        let run = self
            .run
            .as_mut()
            .ok_or_else(|| PartitionError::InvalidState {
                name: name.clone(),
                state: State::Stopped,
                op: "report dirty pages",
            })?;
        let mut out = Vec::new();
        for (slot, region) in run.mem.iter().enumerate() {
            let mut bits = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let kvm_bits = run
                .vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| PartitionError::Kvm {
                    name: name.clone(),
                    what: "reading the dirty log",
                    source,
                })?;
            for (b, k) in bits.iter_mut().zip(kvm_bits) {
                *b |= k;
            }
            out.push(bits);
        }
        run.dirty.add(&out);
        Ok(out)
    }

    /// The disk's blocks written since the last harvest (the device's bitmap, cleared); they
    /// join the run's pending blocks. `None` without a disk.
    pub fn harvest_disk_dirty(&mut self) -> Option<Vec<u64>> {
        let run = self.run.as_mut()?;
        let fresh = run.devices.disk.as_ref()?.take_dirty_blocks();
        match &mut run.dirty.disk_pending {
            None => run.dirty.disk_pending = Some(fresh.clone()),
            Some(p) => {
                p.resize(p.len().max(fresh.len()), 0);
                for (a, b) in p.iter_mut().zip(&fresh) {
                    *a |= b;
                }
            }
        }
        Some(fresh)
    }

    /// Every disk block harvested since the set the run's writes are tracked from (all
    /// zero when nothing was harvested yet); empty without a disk.
    pub fn pending_disk_dirty(&self) -> Vec<u64> {
        let Some(run) = &self.run else {
            return Vec::new();
        };
        match (&run.dirty.disk_pending, &run.devices.disk) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => vec![0u64; (d.disk_len() / 4096).div_ceil(64) as usize],
            (None, None) => Vec::new(),
        }
    }

    /// The disk's backing file (a duplicate descriptor) and length, for a set to read.
    pub fn disk_file(&self) -> Result<Option<(std::fs::File, u64)>, PartitionError> {
        let Some(disk) = self.run.as_ref().and_then(|r| r.devices.disk.as_ref()) else {
            return Ok(None);
        };
        let err = |message: String| PartitionError::Disk {
            name: self.config.name.clone(),
            message,
        };
        let file = disk
            .backend_file()
            .map_err(|e| err(format!("duplicating the disk file: {e}")))?
            .ok_or_else(|| err("the disk has no file".into()))?;
        Ok(Some((file, disk.disk_len())))
    }

    /// Every page harvested since the set the run's writes are tracked from (all zero when
    /// nothing was harvested yet).
    pub fn pending_dirty(&self) -> Vec<Vec<u64>> {
        match &self.run {
            Some(Run {
                dirty: DirtyLog {
                    pending: Some(p), ..
                },
                ..
            }) => p.clone(),
            Some(run) => run
                .mem
                .iter()
                .map(|r| vec![0u64; (r.len() / 4096).div_ceil(64) as usize])
                .collect(),
            None => Vec::new(),
        }
    }

    /// A set with this partition was committed with its memory as at the last harvest:
    /// writes are tracked from it now.
    pub fn commit_dirty(&mut self, set_id: &str) {
        if let Some(run) = self.run.as_mut() {
            run.dirty.since = Some(set_id.to_owned());
            run.dirty.pending = None;
            run.dirty.disk_pending = None;
        }
    }

    /// The set since whose capture every write is tracked, if any.
    pub fn dirty_since(&self) -> Option<&str> {
        self.run.as_ref().and_then(|r| r.dirty.since.as_deref())
    }

    /// Checks that the file a lazily restored run's memory maps is still whole: if it was
    /// truncated (seen by `fstat`, or by a fault the guard absorbed), the run is crashed
    /// with reason "memory file truncated" and an error says so. Nothing for other runs.
    pub fn check_memory_file(&mut self) -> Result<(), PartitionError> {
        let Some(run) = &self.run else { return Ok(()) };
        let why = match duplex_snapshot::guard::truncated_file(&run.mem) {
            Some(why) => Some(why),
            None if run.dirty.guard.as_ref().is_some_and(|g| g.truncated()) => {
                Some("a page past its end was touched".to_owned())
            }
            None => None,
        };
        let Some(why) = why else { return Ok(()) };
        let reason = format!("{TRUNCATED}: {why}");
        crash(&run.shared, self.console(), reason.clone());
        super::kick_all(&run.threads);
        Err(PartitionError::Restore {
            name: self.config.name.clone(),
            message: reason,
        })
    }

    /// Captures the state of a paused partition (its memory is read separately).
    pub fn capture(&self) -> Result<PartitionState, PartitionError> {
        if self.state() != State::Paused {
            return Err(self.invalid("be snapshotted"));
        }
        self.run
            .as_ref()
            .ok_or_else(|| self.invalid("be snapshotted"))?
            .save()
    }
}

impl Run {
    /// After a restore: if the vCPU's TSC is not the one saved (some hosts keep their own
    /// for a new vCPU), adds the difference to the guest's time bias, in the system control
    /// page and in the guest's variable, so that the guest's time goes on from the cut
    /// (`docs/guest-abi.md`, "Time across a restore"). A guest that keeps no bias is left
    /// as it is.
    fn carry_time_over(&self, state: &PartitionState) -> Result<(), PartitionError> {
        let saved = state
            .vcpus
            .first()
            .and_then(|v| v.msrs.iter().find(|m| m.index == 0x10))
            .map(|m| m.data);
        let (Some(saved), Some(vcpu)) = (saved, self.vcpus.first()) else {
            return Ok(());
        };
        let Some(now) = super::vcpu::guest_tsc(&lock(vcpu)) else {
            return Ok(());
        };
        let mut sysctl = lock(&self.devices.sysctl);
        let Some(addr) = sysctl.time_bias_addr() else {
            return Ok(());
        };
        let bias = sysctl.add_time_bias(now.wrapping_sub(saved));
        use vm_memory::Bytes;
        self.mem
            .write_obj(bias, vm_memory::GuestAddress(addr))
            .map_err(|e| PartitionError::Restore {
                name: self.name.clone(),
                message: format!("writing the time bias at {addr:#x}: {e}"),
            })
    }
}

/// What restoring a [`Run`] needs besides its state.
pub struct RunArgs {
    pub config: PartitionConfig,
    pub console: ConsoleHandle,
    pub kvm: Arc<Kvm>,
    pub switch: Option<VsockSwitch>,
    pub ended: Sender<PartitionEvent>,
    /// The partition's restored guest memory.
    pub mem: GuestMemoryMmap,
    /// The run id it gets (see `run::next_boot_id`).
    pub boot: u64,
    /// The set it is restored from (writes are tracked from it).
    pub set_id: String,
    /// A VM made ahead, `mem` loaded into its reserved addresses (see [`super::shell`]).
    pub shell: Option<super::shell::VmShell>,
    /// The partition's TAP, when it has a network card.
    pub net: Option<Arc<super::net::PartitionNet>>,
    /// The disk restored from the set (see [`super::disk::RestoredDisk`]).
    pub disk: Option<std::path::PathBuf>,
}

/// A run of a partition as a snapshot sees it: VM, vCPUs and devices ([`PartitionState`];
/// memory is written and loaded by the snapshot crate). Each part is saved and restored
/// through its own [`Persist`]: [`state::Vm`], [`state::Vcpu`], the console, the system
/// control page and the vsock device.
impl Persist for Run {
    type State = PartitionState;
    type ConstructorArgs = RunArgs;
    type Error = PartitionError;

    /// The run's state; its vCPUs must be parked.
    fn save(&self) -> Result<PartitionState, PartitionError> {
        let name = self.name.clone();
        let kvm_state = |source| PartitionError::State {
            name: name.clone(),
            source,
        };
        let vm = state::Vm { fd: &self.vm }.save().map_err(kvm_state)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, v) in self.vcpus.iter().enumerate() {
            let fd = lock(v);
            let vcpu = state::Vcpu {
                fd: &fd,
                id: i as u8,
                msrs: self.msrs,
            };
            vcpus.push(vcpu.save().map_err(kvm_state)?);
        }
        let device = |what: &str, e: &dyn std::fmt::Display| PartitionError::Restore {
            name: name.clone(),
            message: format!("saving {what}: {e}"),
        };
        let devices = DevicesState {
            console: lock(&self.devices.console)
                .save()
                .map_err(|e| device("the console", &e))?,
            sysctl: lock(&self.devices.sysctl)
                .save()
                .map_err(|e| device("the system control page", &e))?,
            vsock: match &self.devices.vsock {
                Some(v) => Some(v.save().map_err(|e| device("the vsock device", &e))?),
                None => None,
            },
            net: match &self.devices.net {
                Some(n) => Some(n.save().map_err(|e| device("the network card", &e))?),
                None => None,
            },
            blk: match &self.devices.disk {
                Some(d) => Some(d.save().map_err(|e| device("the disk", &e))?),
                None => None,
            },
        };
        Ok(PartitionState {
            version: STATE_VERSION,
            name,
            vm,
            vcpus,
            devices,
        })
    }

    /// A new run from `state`, its vCPU threads started but parked, its vsock device
    /// prepared in the switch (put in when the restore commits), its network card not yet
    /// on the device event loop (put on when the run is installed).
    fn restore(args: RunArgs, state: &PartitionState) -> Result<Run, PartitionError> {
        let source = build::Source::Restore {
            mem: args.mem,
            state,
            shell: args.shell,
            disk: args.disk.as_deref(),
        };
        let built = build::build(
            &args.config,
            &args.console,
            &args.kvm,
            args.switch.as_ref(),
            args.net.as_deref(),
            source,
        )?;
        let mut run = super::run::spawn(&args.config.name, built, &args.ended, args.boot)?;
        run.dirty.restored(&args.set_id);
        run.dirty.guard = guard_memory(&run, &args.console, &args.ended)?;
        run.carry_time_over(state)?;
        Ok(run)
    }
}

/// The crash reason of a run whose memory file was truncated under it.
pub const TRUNCATED: &str = "memory file truncated";

/// Console lines kept with such a crash.
const CRASH_TAIL: usize = 20;

/// Ends `shared`'s run as crashed with `reason` (the first outcome wins).
fn crash(shared: &Shared, console: &ConsoleHandle, reason: String) {
    let console_tail = {
        let mut log = console.lock();
        log.flush_partial();
        log.tail(CRASH_TAIL)
    };
    shared.finish(super::shared::Outcome::Crashed(super::shared::CrashInfo {
        reason,
        rip: None,
        vector: None,
        console_tail,
    }));
}

/// Guards the file mappings of a restored run's memory (a lazy restore): a fault past the
/// end of a truncated memory file reads zeros instead of raising SIGBUS in the monitor, and
/// the run is crashed with reason [`TRUNCATED`] (its vCPUs brought out of the guest by the
/// partition's `Ended` handling). `None` for memory that maps no file (an eager restore).
fn guard_memory(
    run: &Run,
    console: &ConsoleHandle,
    ended: &Sender<PartitionEvent>,
) -> Result<Option<duplex_snapshot::MemoryGuard>, PartitionError> {
    let shared = Arc::downgrade(&run.shared);
    let console = console.clone();
    let ended = ended.clone();
    let id = super::vcpu::Ended {
        name: run.name.clone(),
        boot: run.boot,
    };
    let on_truncated = move || {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        log::error!(
            "partition {}: {TRUNCATED}: its set's memory file was cut short",
            id.name
        );
        crash(
            &shared,
            &console,
            format!("{TRUNCATED} (a page past its end was touched)"),
        );
        let _ = ended.send(PartitionEvent::Ended(super::vcpu::Ended {
            name: id.name.clone(),
            boot: id.boot,
        }));
    };
    let guard = duplex_snapshot::MemoryGuard::for_memory(&run.mem, Some(Box::new(on_truncated)))
        .map_err(|e| PartitionError::Restore {
            name: run.name.clone(),
            message: e.to_string(),
        })?;
    Ok((!guard.is_empty()).then_some(guard))
}
