//! Snapshots of vsock (`docs/vsock.md`, "Snapshots"): the switch's plain-data state
//! ([`VsockSwitch::save_state`] / [`VsockSwitch::restore_state`]), each partition's device
//! ([`VsockMmioState`]: transport registers and the device's live queues, restored with
//! [`VsockSwitch::attach_restored`] or [`Persist`]), the quiet teardown before a restore
//! ([`VsockSwitch::detach_quiet`]), and the freeze that keeps guest memory and the switch
//! still while the cut is taken ([`VsockSwitch::freeze`]).
//!
//! Order of a restore: every partition detached (`detach_quiet` in the same process),
//! `restore_state`, then `attach_restored` for each partition, with its guest memory
//! already restored.

use crate::GuestMemoryMmap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::restore::PreparedPort;
use super::{SwitchState, VsockDevice, VsockError, VsockMmio, VsockSwitch, QUEUE_SIZES};
use crate::persist::{Persist, Suspendable};
use crate::virtio::mmio::{MmioArgs, MmioState, MmioTransport, QueueSnapshot};
use crate::virtio::Interrupt;

/// A partition's vsock device, saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockMmioState {
    /// The partition's CID (the guest read it from the config space).
    pub cid: u64,
    /// The virtio-mmio registers and the queue setup the driver wrote.
    pub transport: MmioState,
    /// The device's live queues (next available and used indexes...), present exactly
    /// when the device is started (`transport.active`). Its backlog is in [`SwitchState`].
    pub device_queues: Option<Vec<QueueSnapshot>>,
}

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
}

impl std::fmt::Debug for VsockMmioArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMmioArgs")
            .field("cid", &self.cid)
            .field("name", &self.name)
            .field("uds", &self.uds)
            .finish_non_exhaustive()
    }
}

/// While it lives, the switch is frozen: nothing is written into any partition's guest
/// memory (RX deliveries wait in backlogs, `QueueNotify` waits), and the host bridge does
/// not touch its sockets (host bytes wait in the kernel). Dropping it thaws the switch: what
/// waited is done then. Freezes nest.
#[must_use = "the switch thaws when the guard is dropped"]
pub struct SwitchFreeze {
    switch: VsockSwitch,
}

impl std::fmt::Debug for SwitchFreeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchFreeze").finish_non_exhaustive()
    }
}

impl Drop for SwitchFreeze {
    fn drop(&mut self) {
        self.switch.wake();
    }
}

impl VsockSwitch {
    /// Freezes the switch until the guard is dropped (see [`SwitchFreeze`]). Take it after
    /// pausing every vCPU and keep it until every partition's devices and guest memory are
    /// saved (or restored): then the switch state, the devices' queues and guest memory are
    /// one consistent cut.
    pub fn freeze(&self) -> SwitchFreeze {
        let mut switch = self.clone();
        let Ok(()) = switch.sleep();
        SwitchFreeze { switch }
    }

    /// A copy of the switch's plain-data state, taken under the lock at once: the
    /// connection table (with host links' credit counters and buffered bytes), the backlogs
    /// with their packets, the counters and the next host port. Host bytes the bridge reads
    /// after this call are not in it (freeze the switch to keep the cut exact).
    pub fn save_state(&self) -> SwitchState {
        self.with(|inner| inner.state.clone())
    }

    /// Replaces the switch's state by a saved one, before partitions attach again (none may
    /// be attached: [`VsockError::Attached`]). The state is validated first; if it is
    /// refused nothing changes.
    ///
    /// Partition connections and backlogs come back as saved. Host connections:
    /// - `keep_host_sockets` (an in-process reboot, the same switch): a host connection whose
    ///   socket is still open and on which nothing happened since the cut keeps its socket
    ///   and its saved link state (credit counters, buffered bytes); the host program does
    ///   not reconnect;
    /// - otherwise (a new process), and for host connections whose socket is gone or moved
    ///   on since the cut: the connection is dropped and its guest side gets an RST on
    ///   resume (queued in its backlog).
    ///
    /// Host sockets that are not kept (opened after the cut, or still sending `CONNECT`)
    /// are closed.
    pub fn restore_state(
        &self,
        state: &SwitchState,
        keep_host_sockets: bool,
    ) -> Result<(), VsockError> {
        self.with(|inner| inner.restore_state(state, keep_host_sockets))
    }

    /// Detaches `cid` for a restore, without telling anybody: no RST to its peers (they
    /// are replaced too, and RSTs would land in the restored state). Its partition
    /// connections and backlog are dropped and its `uds` listener closed; its host sockets
    /// stay open for [`restore_state`](Self::restore_state) to keep or reset. Its
    /// [`VsockMmio`] goes dead.
    pub fn detach_quiet(&self, cid: u64) {
        self.with(|inner| inner.detach_quiet(cid));
    }

    /// Attaches a restored partition: its device comes back started (or not) as saved,
    /// with its queues live where they were; activation is not run again. `mem` is the
    /// partition's restored guest memory. The state is validated first (CID, registers,
    /// queue sizes, rings inside `mem`); if it is refused nothing changes.
    pub fn attach_restored(
        &self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        uds: Option<PathBuf>,
        state: &VsockMmioState,
    ) -> Result<VsockMmio, VsockError> {
        let mmio = self.prepare_restored(cid, name, mem, irq, uds, state)?;
        let attach_id = mmio.transport().device().attach_id;
        self.with(|inner| {
            let Some(port) = inner.pending.remove(&attach_id) else {
                return Err(VsockError::InvalidState(
                    "the device was not prepared".into(),
                ));
            };
            let cid = port.cid;
            inner.check_attachable(cid)?;
            inner.state.backlogs.entry(cid).or_default();
            inner.insert_port(port)?;
            // Packets queued at the cut (and RSTs of dropped host links) go in as RX
            // buffers allow; host connections may read again.
            inner.drain_rx(cid);
            inner.refresh_host_interest(cid);
            Ok::<(), VsockError>(())
        })?;
        Ok(mmio)
    }

    /// Builds a restored partition's device and its side of the switch without changing
    /// the live table: its side waits in the switch until [`replace`](Self::replace) puts
    /// it in. Until then the device is inert (its notifications match no attachment). The
    /// state is validated (CID, registers, queue sizes, rings inside `mem`).
    pub fn prepare_restored(
        &self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        uds: Option<PathBuf>,
        state: &VsockMmioState,
    ) -> Result<VsockMmio, VsockError> {
        if state.cid != cid {
            return Err(VsockError::InvalidState(format!(
                "the device was saved with CID {}, not {cid}",
                state.cid
            )));
        }
        let queues = match (state.transport.active, &state.device_queues) {
            (true, Some(saved)) if saved.len() == QUEUE_SIZES.len() => Some(
                saved
                    .iter()
                    .zip(QUEUE_SIZES)
                    .enumerate()
                    .map(|(i, (q, max))| q.to_queue(i, max, Some(&mem)))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            (false, None) => None,
            _ => {
                return Err(VsockError::InvalidState(
                    "the device's queues do not match its started state".into(),
                ))
            }
        };
        let irq = Arc::new(irq);
        let attach_id = self.with(|inner| inner.reserve_attach_id());
        let device = VsockDevice {
            cid,
            attach_id,
            switch: self.clone(),
        };
        let args = MmioArgs {
            device,
            mem: mem.clone(),
            irq: irq.clone(),
        };
        let transport = MmioTransport::restore_state(args, &state.transport)?;
        let port = PreparedPort {
            cid,
            attach_id,
            name: name.to_owned(),
            mem,
            irq,
            uds,
            queues,
        };
        self.with(|inner| inner.pending.insert(attach_id, port));
        Ok(VsockMmio {
            cid,
            transport: std::sync::Mutex::new(transport),
        })
    }

    /// Replaces every attached partition by `ports` and the table by `state`, in one step
    /// under the lock: the partitions attached now are removed quietly (as
    /// [`detach_quiet`](Self::detach_quiet)), host connections are kept or reset as
    /// [`restore_state`](Self::restore_state) says, and listeners already open on the same
    /// path for the same CID stay open. Everything that can fail (the state's validation,
    /// binding new listeners) happens first: on an error nothing has changed.
    pub fn replace(
        &self,
        state: &SwitchState,
        devices: &[&VsockMmio],
        keep_host_sockets: bool,
    ) -> Result<(), VsockError> {
        let ids: Vec<u64> = devices
            .iter()
            .map(|d| d.transport().device().attach_id)
            .collect();
        self.with(|inner| inner.replace(state, &ids, keep_host_sockets))
    }

    /// Detaches `cid` if it is still the attachment of `mmio` (see
    /// [`detach`](Self::detach)); a device replaced by a restore leaves its successor alone.
    pub fn detach_device(&self, mmio: &VsockMmio) {
        let attach_id = mmio.transport().device().attach_id;
        self.with(|inner| inner.detach_attachment(mmio.cid, attach_id));
    }
}

impl Suspendable for VsockSwitch {
    type Error = std::convert::Infallible;

    /// Freezes the switch (see [`SwitchFreeze`]); freezes nest.
    fn sleep(&mut self) -> Result<(), Self::Error> {
        self.with(|inner| inner.frozen += 1);
        Ok(())
    }

    /// One freeze fewer; at the last, what waited is done.
    fn wake(&mut self) {
        self.with(|inner| inner.thaw());
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
        let t = self.transport();
        let (cid, attach_id) = (t.device().cid, t.device().attach_id);
        let device_queues = t
            .device()
            .switch
            .with(|inner| inner.queue_snapshots(cid, attach_id));
        Ok(VsockMmioState {
            cid: self.cid,
            transport: t.save_state(),
            device_queues,
        })
    }

    /// [`VsockSwitch::prepare_restored`] on `args.switch`: the device is built, validated
    /// and waits in the switch until [`VsockSwitch::replace`] puts it in (or
    /// [`VsockSwitch::detach_device`] drops it).
    fn restore(args: VsockMmioArgs, state: &VsockMmioState) -> Result<Self, VsockError> {
        args.switch
            .prepare_restored(args.cid, &args.name, args.mem, args.irq, args.uds, state)
    }
}
