//! A partition's part of a snapshot set: its saved state (KVM VM and vCPUs, devices) as
//! plain data, captured while the partition is paused and restored into a new run.

use std::sync::Mutex;

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Partition {
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
