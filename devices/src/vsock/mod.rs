//! virtio-vsock for partitions: one [`VsockSwitch`] per monitor connects the vsock devices of
//! all partitions by CID, and bridges host programs in through Unix sockets (Firecracker's
//! `CONNECT <port>` convention). The protocol is specified in `docs/vsock.md`.
//!
//! - Each partition gets a [`VsockMmio`]: the virtio-mmio window of its vsock device
//!   (device ID 19, config space = `guest_cid` u64 LE, queues rx = 0, tx = 1, event = 2).
//! - Guest TX is processed inline on the vCPU thread that wrote `QueueNotify`: the switch
//!   parses the packets (virtio-vsock), routes them by destination CID into the receiver's RX
//!   queue, or into its backlog when the RX queue has no buffers.
//! - The host bridge, a subscriber on the device event loop ([`crate::event_loop`]), accepts
//!   host connections on each partition's `uds`, and is the vsock endpoint (CID 2) for them,
//!   with credit-based flow control.
//! - All switch state sits behind one mutex; its plain-data part ([`SwitchState`]) is
//!   serializable for snapshots.
//! - Snapshots (`persist`, `restore`): [`VsockSwitch::save_state`] /
//!   [`VsockSwitch::restore_state`] for the switch, [`VsockMmio`] implements
//!   [`Persist`](crate::persist::Persist) ([`VsockMmioState`]), and
//!   [`VsockSwitch::freeze`] stops all delivery while a consistent cut is taken.

mod bridge;
mod host;
mod hostlink;
pub mod packet;
mod persist;
mod restore;
pub mod state;
mod switch;
mod uds;

#[cfg(test)]
mod tests;

use crate::GuestMemoryMmap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::Queue;

use crate::event_loop::{EventLoop, SubscriptionKey};
use crate::virtio::mmio::{MmioError, MmioTransport};
use crate::virtio::{ActivateError, Interrupt, VirtioDevice};

pub use packet::{Endpoint, Hdr, HOST_CID};
pub use persist::{SwitchFreeze, VsockMmioArgs, VsockMmioState};
pub use state::{ConnState, ConnStats, PortStats, SwitchState, VsockCounters, VsockStats};

/// The virtio device ID of vsock.
pub const DEVICE_ID: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// `VIRTIO_VSOCK_F_STREAM`: stream sockets (the only type offered).
pub const F_STREAM: u64 = 1;
/// The smallest CID a partition may have (0–2 are reserved; 2 is the host).
pub const MIN_GUEST_CID: u64 = 3;
/// Hard cap of the bytes (headers + payload) waiting for one partition's RX queue, over
/// all connections to it.
pub const BACKLOG_CAP: usize = 16 << 20;
/// Hard cap of the bytes one connection may have waiting in its receiver's backlog. A
/// sender that honours the receiver's credit stays below its `buf_alloc`; guests here
/// advertise 128–256 KiB.
pub const CONN_BACKLOG_CAP: usize = 1 << 20;
/// The receive buffer the switch advertises, per host connection.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;
/// Host data is read only while the guest's backlog is below this.
pub const HOST_BACKLOG_LIMIT: usize = 64 * 1024;
/// Most bytes read from a host socket into one RW packet.
pub const HOST_CHUNK: usize = 16 * 1024;
/// How long a host program has to send its `CONNECT` line, and the guest to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the switch waits for the guest's RST after the host socket went away.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections one partition may take part in.
pub const MAX_CONNS_PER_CID: usize = 1024;

/// Why a vsock operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or too large.
    #[error("vsock: CID {0} is not usable by a partition (3 ..= 4294967294)")]
    ReservedCid(u64),
    /// Another partition has the CID.
    #[error("vsock: CID {0} is already attached")]
    DuplicateCid(u64),
    /// The host socket could not be set up.
    #[error("vsock: uds {path}: {source}")]
    Uds {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The `uds` path exists and is not a socket (it is not removed).
    #[error("vsock: uds {0} exists and is not a socket")]
    UdsNotSocket(PathBuf),
    /// The host bridge (its eventfd, timer) could not be set up.
    #[error("vsock: host bridge: {0}")]
    Bridge(std::io::Error),
    /// The device event loop could not be started or did not take the bridge.
    #[error("vsock: {0}")]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    /// The transport could not be created or restored.
    #[error("vsock: {0}")]
    Mmio(#[from] MmioError),
    /// A saved state (switch or device) is not valid; nothing was changed.
    #[error("vsock: invalid saved state: {0}")]
    InvalidState(String),
    /// The switch state can only be restored while no partition is attached.
    #[error("vsock: CID {0} is attached; detach every partition before restoring the switch")]
    Attached(u64),
}

/// What the switch's mutex protects.
struct Shared {
    inner: Mutex<switch::Inner>,
}

/// The switch's place on a device event loop: the bridge's subscriber is removed when the
/// last handle on the switch goes (and a loop the switch started for itself stops then).
struct OnLoop {
    event_loop: EventLoop,
    key: SubscriptionKey,
}

impl Drop for OnLoop {
    fn drop(&mut self) {
        self.event_loop.remove(self.key);
    }
}

/// The vsock switch of a monitor: all partitions' vsock devices, by CID, and the host bridge.
#[derive(Clone)]
pub struct VsockSwitch {
    shared: Arc<Shared>,
    _on_loop: Arc<OnLoop>,
}

impl std::fmt::Debug for VsockSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockSwitch").finish_non_exhaustive()
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
        let bridge = bridge::Bridge::new().map_err(VsockError::Bridge)?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(switch::Inner::new(bridge)),
        });
        let subscriber =
            bridge::BridgeSubscriber::new(shared.clone()).map_err(VsockError::Bridge)?;
        let key = event_loop.add(Box::new(subscriber))?;
        Ok(VsockSwitch {
            shared,
            _on_loop: Arc::new(OnLoop {
                event_loop: event_loop.clone(),
                key,
            }),
        })
    }

    /// Attaches a partition with `cid`: returns its virtio-mmio window. With `uds`, host
    /// programs can connect to the partition through that Unix socket (a stale socket file
    /// there is replaced).
    pub fn attach(
        &self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        uds: Option<PathBuf>,
    ) -> Result<VsockMmio, VsockError> {
        let irq = Arc::new(irq);
        let attach_id =
            self.with(|inner| inner.attach(cid, name, mem.clone(), irq.clone(), uds))?;
        let device = VsockDevice {
            cid,
            attach_id,
            switch: self.clone(),
        };
        let transport = MmioTransport::new(device, mem, irq)?;
        Ok(VsockMmio {
            cid,
            transport: Mutex::new(transport),
        })
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
    fn set_connect_timeout(&self, timeout: Duration) {
        self.with(|inner| inner.connect_timeout = timeout);
    }

    fn with<R>(&self, f: impl FnOnce(&mut switch::Inner) -> R) -> R {
        self.shared.with(f)
    }
}

impl Shared {
    /// Runs `f` on the locked state, then raises the interrupts it asked for (outside the
    /// lock, so a partition's wake-up never runs under it).
    fn with<R>(&self, f: impl FnOnce(&mut switch::Inner) -> R) -> R {
        self.locked(f)
    }

    fn locked<R>(&self, f: impl FnOnce(&mut switch::Inner) -> R) -> R {
        let (result, irqs) = {
            let mut inner = match self.inner.lock() {
                Ok(inner) => inner,
                Err(poisoned) => {
                    // An update panicked half-way: the table may be inconsistent, so it is
                    // not reused. Every connection is reset, as a device reset would.
                    let mut inner = poisoned.into_inner();
                    inner.reset_after_panic();
                    self.inner.clear_poison();
                    inner
                }
            };
            let result = f(&mut inner);
            (result, std::mem::take(&mut inner.to_notify))
        };
        for irq in dedup(irqs) {
            irq.trigger();
        }
        result
    }
}

/// The interrupts to raise, each once.
fn dedup(mut irqs: Vec<Arc<Interrupt>>) -> Vec<Arc<Interrupt>> {
    irqs.sort_by_key(|i| Arc::as_ptr(i) as usize);
    irqs.dedup_by(|a, b| Arc::ptr_eq(a, b));
    irqs
}

/// The vsock device of one partition, as its transport sees it.
#[derive(Debug)]
pub struct VsockDevice {
    cid: u64,
    attach_id: u64,
    switch: VsockSwitch,
}

pub(crate) const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_STREAM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let (cid, id) = (self.cid, self.attach_id);
        self.switch
            .with(|inner| inner.activate(cid, id, mem, queues, irq))
    }

    fn queue_notify(&mut self, index: u16) {
        let (cid, id) = (self.cid, self.attach_id);
        self.switch.with(|inner| inner.notify(cid, id, index));
    }

    fn reset(&mut self) {
        let (cid, id) = (self.cid, self.attach_id);
        self.switch.with(|inner| inner.reset_device(cid, id));
    }
}

/// A partition's vsock virtio-mmio window (0x1000 bytes).
#[derive(Debug)]
pub struct VsockMmio {
    cid: u64,
    transport: Mutex<MmioTransport<VsockDevice>>,
}

impl VsockMmio {
    fn transport(&self) -> MutexGuard<'_, MmioTransport<VsockDevice>> {
        self.transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A guest read at `offset` within the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport().read(offset, data);
    }

    /// A guest write at `offset` within the window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.transport().write(offset, data);
    }

    /// The partition's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Register accesses the transport ignored (misaligned, wrong size, unknown).
    pub fn bad_accesses(&self) -> u64 {
        self.transport().bad_accesses()
    }
}
