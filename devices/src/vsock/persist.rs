//! Snapshots of vsock (`docs/vsock.md`, "Snapshots"): the [`Persist`] implementations of
//! the switch ([`SwitchState`]) and of a partition's device ([`VsockMmioState`], restored
//! with [`VsockMmioArgs`]), and the switch as [`Suspendable`] (asleep = frozen). The
//! snapshot calls themselves are [`VsockSwitch`]'s (`api.rs`). Depends on `api`, `device`.
//!
//! Order of a piecewise restore: every partition detached (`detach_quiet` in the same
//! process), `restore_state`, then `attach_restored` for each partition, with its guest
//! memory already restored. The monitor prepares every device first and commits with
//! `replace`.

use crate::GuestMemoryMmap;
use std::path::PathBuf;

use super::api::VsockSwitch;
use super::device::{VsockMmio, VsockMmioState};
use super::limits::{UdsConfig, VsockError};
use super::state::SwitchState;
use crate::persist::{Persist, Suspendable};
use crate::virtio::Interrupt;

/// What [`VsockMmio`]'s restore needs besides its state.
pub struct VsockMmioArgs {
    /// The switch, with its state already restored.
    pub switch: VsockSwitch,
    pub cid: u64,
    /// The partition's name (logs, `status`).
    pub name: String,
    /// The partition's restored guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt (irqfd on GSI 5 and wake-up).
    pub irq: Interrupt,
    /// Where host programs connect (see `docs/vsock.md`).
    pub uds: Option<PathBuf>,
    /// The mode of the `uds` socket file (none: 0o600).
    pub uds_mode: Option<u32>,
}

impl std::fmt::Debug for VsockMmioArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMmioArgs")
            .field("cid", &self.cid)
            .field("name", &self.name)
            .field("uds", &self.uds)
            .field("uds_mode", &self.uds_mode)
            .finish_non_exhaustive()
    }
}

impl Suspendable for VsockSwitch {
    type Error = std::convert::Infallible;

    /// Freezes the switch (see `SwitchFreeze`); freezes nest.
    fn sleep(&mut self) -> Result<(), Self::Error> {
        self.freeze_once();
        Ok(())
    }

    /// One freeze fewer; at the last, what waited is done.
    fn wake(&mut self) {
        self.thaw();
    }
}

/// The switch's table as plain data. The monitor's in-place restore does not build a new
/// switch ([`VsockSwitch::replace`] swaps table and partitions in one step under the lock);
/// `restore` builds one from a state, as a new process would.
impl Persist for VsockSwitch {
    type State = SwitchState;
    type ConstructorArgs = ();
    type Error = VsockError;

    /// Take it with the switch asleep (frozen) for an exact cut.
    fn save(&self) -> Result<SwitchState, VsockError> {
        Ok(self.save_state())
    }

    fn restore(_args: (), state: &SwitchState) -> Result<Self, VsockError> {
        let switch = VsockSwitch::new()?;
        switch.restore_state(state, false)?;
        Ok(switch)
    }
}

impl Persist for VsockMmio {
    type State = VsockMmioState;
    type ConstructorArgs = VsockMmioArgs;
    type Error = VsockError;

    /// The device's state; take it while the partition is paused and the switch frozen.
    fn save(&self) -> Result<VsockMmioState, VsockError> {
        Ok(self.save_state())
    }

    /// [`VsockSwitch::prepare_restored`] on `args.switch`: the device is built, validated
    /// and waits in the switch until [`VsockSwitch::replace`] puts it in (or
    /// [`VsockSwitch::detach_device`] drops it).
    fn restore(args: VsockMmioArgs, state: &VsockMmioState) -> Result<Self, VsockError> {
        let uds = UdsConfig {
            path: args.uds,
            mode: args.uds_mode,
        };
        args.switch
            .prepare_restored_with(args.cid, &args.name, args.mem, args.irq, uds, state)
    }
}
