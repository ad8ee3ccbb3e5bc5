//! [`VsockSwitch`], the handle the monitor holds: attach and detach partitions, `status`,
//! and snapshots (the freeze, saving and restoring the switch, restored devices). Every
//! call takes the switch's lock once. Depends on `device`, `shared`, `subscriber`, `switch`.

use crate::GuestMemoryMmap;
use std::path::PathBuf;
use std::sync::Arc;

#[cfg(test)]
use std::time::Duration;

use super::bridge::Bridge;
use super::device::{VsockDevice, VsockMmio, VsockMmioState, QUEUE_SIZES};
use super::limits::{UdsConfig, VsockError};
use super::router::PreparedPort;
use super::shared::{OnLoop, Shared};
use super::state::{SwitchState, VsockStats};
use super::subscriber::BridgeSubscriber;
use super::switch::Inner;
use crate::event_loop::EventLoop;
use crate::virtio::mmio::{MmioArgs, MmioTransport};
use crate::virtio::Interrupt;

/// The vsock switch of a monitor: all partitions' vsock devices, by CID, and the host bridge.
#[derive(Clone)]
pub struct VsockSwitch {
    shared: Arc<Shared>,
    on_loop: Arc<OnLoop>,
}

impl std::fmt::Debug for VsockSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockSwitch").finish_non_exhaustive()
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
        self.switch.thaw();
    }
}

impl VsockSwitch {
    /// A switch with no partitions, whose host bridge runs on a device event loop of its
    /// own (tests, tools; the monitor shares one loop: [`VsockSwitch::on_loop`]).
    pub fn new() -> Result<Self, VsockError> {
        VsockSwitch::on_loop(&EventLoop::start("vsock-bridge")?)
    }

    /// A switch with no partitions, whose host bridge is a subscriber of `event_loop`.
    pub fn on_loop(event_loop: &EventLoop) -> Result<Self, VsockError> {
        let bridge = Bridge::new().map_err(VsockError::Bridge)?;
        let shared = Arc::new(Shared::new(Inner::new(bridge)));
        let subscriber = BridgeSubscriber::new(shared.clone()).map_err(VsockError::Bridge)?;
        let key = event_loop.add(Box::new(subscriber))?;
        Ok(VsockSwitch {
            shared,
            on_loop: Arc::new(OnLoop::new(event_loop.clone(), key)),
        })
    }

    /// Attaches a partition with `cid`: returns its virtio-mmio window. With `uds`, host
    /// programs can connect to the partition through that Unix socket, of mode 0o600 (see
    /// [`attach_with`](Self::attach_with) for another mode). A stale socket file there is
    /// replaced; a live one (another process listens) is an error, and so is anything that
    /// is not a socket.
    pub fn attach(
        &self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        uds: Option<PathBuf>,
    ) -> Result<VsockMmio, VsockError> {
        self.attach_with(cid, name, mem, irq, uds.into())
    }

    /// [`attach`](Self::attach) with the `uds` socket file's mode (`uds.mode`, default
    /// 0o600, `0 ..= 0o777`).
    pub fn attach_with(
        &self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        uds: UdsConfig,
    ) -> Result<VsockMmio, VsockError> {
        let irq = Arc::new(irq);
        let attach_id =
            self.with(|inner| inner.attach(cid, name, mem.clone(), irq.clone(), uds))?;
        let device = self.device(cid, attach_id);
        let transport = MmioTransport::new(device, mem, irq)?;
        Ok(VsockMmio::new(cid, transport))
    }

    fn device(&self, cid: u64, attach_id: u64) -> VsockDevice {
        VsockDevice::new((cid, attach_id), self.shared.clone(), self.on_loop.clone())
    }

    /// Detaches the partition with `cid` (crashed, stopped): its peers' connections are
    /// reset (partitions get an RST, host connections are closed), its `uds` listener is
    /// closed and its socket file removed. Its [`VsockMmio`] goes dead. After
    /// [`detach_quiet`](Self::detach_quiet), it also ends the host connections left.
    pub fn detach(&self, cid: u64) {
        self.with(|inner| inner.detach(cid));
    }

    /// Connections, backlogs and counters, for `status`.
    pub fn stats(&self) -> VsockStats {
        self.with(|inner| inner.stats())
    }

    #[cfg(test)]
    pub(crate) fn set_connect_timeout(&self, timeout: Duration) {
        self.with(|inner| inner.set_connect_timeout(timeout));
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        self.shared.with(f)
    }

    /// Freezes the switch until the guard is dropped (see [`SwitchFreeze`]). Take it after
    /// pausing every vCPU and keep it until every partition's devices and guest memory are
    /// saved (or restored): then the switch state, the devices' queues and guest memory are
    /// one consistent cut.
    pub fn freeze(&self) -> SwitchFreeze {
        self.freeze_once();
        SwitchFreeze {
            switch: self.clone(),
        }
    }

    /// One freeze more (without a guard: [`thaw`](Self::thaw) ends it).
    pub(crate) fn freeze_once(&self) {
        self.with(|inner| inner.freeze());
    }

    /// One freeze fewer; at the last, what waited is done.
    pub(crate) fn thaw(&self) {
        self.with(|inner| inner.thaw());
    }

    /// A copy of the switch's plain-data state, taken under the lock at once: the
    /// connection table (with host links' credit counters and buffered bytes), the backlogs
    /// with their packets, the counters and the next host port. Host bytes the bridge reads
    /// after this call are not in it (freeze the switch to keep the cut exact).
    pub fn save_state(&self) -> SwitchState {
        self.with(|inner| inner.save_state())
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
        let mmio = self.prepare_restored_with(cid, name, mem, irq, uds.into(), state)?;
        let attach_id = mmio.attach_id();
        self.with(|inner| inner.attach_prepared(attach_id))?;
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
        self.prepare_restored_with(cid, name, mem, irq, uds.into(), state)
    }

    /// [`prepare_restored`](Self::prepare_restored) with the `uds` socket file's mode.
    pub fn prepare_restored_with(
        &self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        uds: UdsConfig,
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
        let args = MmioArgs {
            device: self.device(cid, attach_id),
            mem: mem.clone(),
            irq: irq.clone(),
        };
        let transport = MmioTransport::restore_state(args, &state.transport)?;
        let port = PreparedPort::new((cid, attach_id), name, mem, irq, uds, queues);
        self.with(|inner| inner.add_pending(port));
        Ok(VsockMmio::new(cid, transport))
    }

    /// Replaces every attached partition by `devices` and the table by `state`, in one step
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
        let ids: Vec<u64> = devices.iter().map(|d| d.attach_id()).collect();
        self.with(|inner| inner.replace(state, &ids, keep_host_sockets))
    }

    /// Detaches `cid` if it is still the attachment of `mmio` (see
    /// [`detach`](Self::detach)); a device replaced by a restore leaves its successor alone.
    pub fn detach_device(&self, mmio: &VsockMmio) {
        let attach_id = mmio.attach_id();
        self.with(|inner| inner.detach_attachment(mmio.cid(), attach_id));
    }
}
