//! A partition's part of a snapshot set: its saved state (KVM VM and vCPUs, devices) as
//! plain data, captured while the partition is paused and restored into a new run.

use crate::lock;

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use duplex_devices::console::ConsoleState;
use duplex_devices::persist::Persist;
use duplex_devices::sysctl::Sysctl;
use duplex_devices::vsock::VsockMmioState;

use super::state::{self, VcpuState, VmState};
use super::{Partition, PartitionError, State};

/// Version of [`PartitionState`]; a state file of another version is refused.
pub const STATE_VERSION: u32 = 1;

/// The devices of a partition, saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub console: ConsoleState,
    pub sysctl: Sysctl,
    pub vsock: Option<VsockMmioState>,
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

impl Partition {
    /// Pages of each RAM region written since the last call (or since the run started):
    /// the guest's writes from KVM's dirty log, the monitor's own (virtio rings and
    /// buffers) from the memory's bitmap; one bit per 4 KiB page, one `Vec` per region.
    /// Both logs are cleared, and KVM's log is switched on if it was off (the first call
    /// then reports no guest pages: use it for a full snapshot).
    pub fn take_dirty_pages(&mut self) -> Result<Vec<Vec<u64>>, PartitionError> {
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
            if run.dirty_logging {
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
            }
            out.push(bits);
        }
        if !run.dirty_logging {
            super::build::register_slots(&run.vm, &run.mem, true).map_err(|e| match e {
                super::build::SlotError::Memory(message) => PartitionError::Memory {
                    name: name.clone(),
                    mib: self.config.memory_mib,
                    message,
                },
                super::build::SlotError::Kvm(source) => PartitionError::Kvm {
                    name: name.clone(),
                    what: "turning the dirty log on",
                    source,
                },
            })?;
            run.dirty_logging = true;
        }
        Ok(out)
    }

    /// The set since whose capture every write is tracked, if any.
    pub fn dirty_since(&self) -> Option<&str> {
        self.run.as_ref().and_then(|r| r.dirty_since.as_deref())
    }

    /// Records that writes are tracked since set `id`.
    pub fn set_dirty_since(&mut self, id: Option<String>) {
        if let Some(r) = self.run.as_mut() {
            r.dirty_since = id;
        }
    }

    /// Captures the state of a paused partition (its memory is read separately).
    pub fn capture(&self, kvm: &Kvm) -> Result<PartitionState, PartitionError> {
        if self.state() != State::Paused {
            return Err(self.invalid("be snapshotted"));
        }
        let run = self
            .run
            .as_ref()
            .ok_or_else(|| self.invalid("be snapshotted"))?;
        let name = self.config.name.clone();
        let kvm_state = |source| PartitionError::State {
            name: name.clone(),
            source,
        };
        let vm = state::save_vm(&run.vm).map_err(kvm_state)?;
        let mut vcpus = Vec::with_capacity(run.vcpus.len());
        for (i, v) in run.vcpus.iter().enumerate() {
            vcpus.push(state::save_vcpu(kvm, i as u8, &lock(v)).map_err(kvm_state)?);
        }
        let devices = DevicesState {
            console: lock(&run.devices.console).save(),
            sysctl: lock(&run.devices.sysctl).clone(),
            vsock: run.devices.vsock.as_ref().map(|v| v.save()),
        };
        Ok(PartitionState {
            version: STATE_VERSION,
            name,
            vm,
            vcpus,
            devices,
        })
    }
}
