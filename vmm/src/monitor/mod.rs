//! The monitor: every partition of the device, the control commands over them, and the
//! supervisor that reacts when a partition's run ends (reaping it, or cold-booting it
//! again on a guest reboot request).

pub mod faults;
pub mod guest_snapshot;
pub mod ops;
pub mod restore;
pub mod snapshot;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde_json::{json, Value};

use crate::api::protocol::{ApiError, Command, ErrorCode};
use crate::api::server::ControlHandler;
use crate::config::DeviceConfig;
pub(crate) use crate::lock;
use crate::partition::shared::Outcome;
use crate::partition::shell::VmShell;
use crate::partition::vcpu::{Ended, PartitionEvent};
use crate::partition::{self, Partition, PartitionError, State};
use duplex_devices::event_loop::{EventLoop, EventLoopError};
use duplex_devices::health::{process_limits, HealthRegistry, Restart};
use duplex_devices::vsock::{VsockError, VsockSwitch};

/// A VM shell being made on a thread of its own.
type ShellMaking = std::thread::JoinHandle<Result<VmShell, PartitionError>>;

/// Why the monitor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The KVM device could not be opened.
    #[error("cannot open {path}: {source} (is KVM available and are you allowed to use it?)")]
    Kvm {
        /// The node (`/dev/kvm`, or `duplex run --kvm`).
        path: std::path::PathBuf,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The vsock switch could not be started.
    #[error("starting the vsock switch: {0}")]
    Vsock(VsockError),
    /// The device event loop could not be started.
    #[error("{0}")]
    EventLoop(EventLoopError),
    /// A partition failed to be created or started.
    #[error(transparent)]
    Partition(#[from] PartitionError),
}

/// All partitions of one device.
pub struct Monitor {
    kvm: Arc<Kvm>,
    config: DeviceConfig,
    /// The one device-level operation that may run at a time.
    ops: ops::OpSlot,
    /// Faults armed for tests (feature `fault-injection`).
    faults: faults::Faults,
    /// Who may raise a snapshot from a guest, and what was refused.
    guest_snapshots: Arc<guest_snapshot::GuestSnapshotGate>,
    /// VMs being made ahead for the next restore, by partition (see `partition::shell`).
    shells: Mutex<std::collections::HashMap<String, ShellMaking>>,
    restored_from: Mutex<Option<Value>>,
    fallback: Mutex<Option<String>>,
    device: Option<String>,
    partitions: Vec<Mutex<Partition>>,
    vsock: Option<VsockSwitch>,
    /// The device event loop (network cards, the vsock host bridge).
    event_loop: EventLoop,
    ended: Mutex<Sender<PartitionEvent>>,
    shutdown: Mutex<bool>,
    shutdown_cv: Condvar,
    started: Instant,
}

impl Monitor {
    /// A monitor for `config`, with every partition created but not started.
    pub fn new(config: &DeviceConfig) -> Result<Arc<Monitor>, MonitorError> {
        Monitor::with_kvm(config, std::path::Path::new("/dev/kvm"))
    }

    /// [`Monitor::new`] over the KVM device node `kvm_path` (`duplex run --kvm`).
    pub fn with_kvm(
        config: &DeviceConfig,
        kvm_path: &std::path::Path,
    ) -> Result<Arc<Monitor>, MonitorError> {
        let kvm_error = |source| MonitorError::Kvm {
            path: kvm_path.to_path_buf(),
            source,
        };
        let c_path = std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes())
            .map_err(|_| kvm_error(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(c_path).map_err(kvm_error)?;
        partition::install_kick_handler().map_err(MonitorError::Signal)?;
        let event_loop = EventLoop::start("device-loop").map_err(MonitorError::EventLoop)?;
        let partitions = config
            .partitions
            .iter()
            .map(|p| Partition::new(p.clone(), &event_loop).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let vsock = if config.partitions.iter().any(|p| p.vsock.is_some()) {
            Some(VsockSwitch::on_loop(&event_loop).map_err(MonitorError::Vsock)?)
        } else {
            None
        };
        let (tx, rx) = channel();
        let monitor = Arc::new(Monitor {
            kvm: Arc::new(kvm),
            config: config.clone(),
            ops: ops::OpSlot::default(),
            faults: faults::Faults::from_env(),
            guest_snapshots: Arc::new(guest_snapshot::GuestSnapshotGate::new(config)),
            shells: Mutex::new(std::collections::HashMap::new()),
            restored_from: Mutex::new(None),
            fallback: Mutex::new(None),
            device: config.device.clone(),
            partitions,
            vsock,
            event_loop,
            ended: Mutex::new(tx),
            shutdown: Mutex::new(false),
            shutdown_cv: Condvar::new(),
            started: Instant::now(),
        });
        let weak = Arc::downgrade(&monitor);
        // Supervised: a panic while handling one event restarts the loop (the event is
        // lost, the others are not), and shows in `status` (`services`).
        duplex_devices::health::spawn_service_with(
            "supervisor",
            Restart::UpTo(10),
            || crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Supervisor),
            move || {
                supervise(&weak, &rx);
                Ok(())
            },
        )
        .map_err(|e| {
            MonitorError::Partition(PartitionError::Thread {
                name: "supervisor".into(),
                source: e,
            })
        })?;
        Ok(monitor)
    }

    /// Cold-boots every partition. On failure, partitions already started are stopped.
    pub fn start_all(&self) -> Result<(), MonitorError> {
        for (i, p) in self.partitions.iter().enumerate() {
            let started = {
                let mut p = lock(p);
                p.start(&self.kvm, self.vsock.as_ref(), &lock(&self.ended))
            };
            if let Err(e) = started {
                for q in &self.partitions[..i] {
                    let _ = lock(q).stop();
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Result<&Mutex<Partition>, ApiError> {
        self.partitions
            .iter()
            .find(|p| lock(p).name() == name)
            .ok_or_else(|| ApiError::unknown_partition(name))
    }

    /// Partitions named by an optional `partition` argument (all when absent).
    fn targets(&self, name: Option<&str>) -> Result<Vec<&Mutex<Partition>>, ApiError> {
        match name {
            Some(n) => Ok(vec![self.find(n)?]),
            None => Ok(self.partitions.iter().collect()),
        }
    }

    /// `status` of one partition or all.
    pub fn status(&self, name: Option<&str>) -> Result<Value, ApiError> {
        let list: Vec<Value> = self
            .targets(name)?
            .into_iter()
            .map(|p| serde_json::to_value(lock(p).status()).unwrap_or(Value::Null))
            .collect();
        Ok(json!({
            "device": self.device,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "partitions": list,
            "operation": self.ops.current(),
            "restored_from": lock(&self.restored_from).clone(),
            "fallback": lock(&self.fallback).clone(),
            "vsock": self.vsock.as_ref().map(|v| serde_json::to_value(v.stats()).unwrap_or(Value::Null)),
            "event_loop": serde_json::to_value(self.event_loop.stats()).unwrap_or(Value::Null),
            "guest_snapshots": self.guest_snapshots.status(),
            "services": HealthRegistry::global().snapshot(),
            "process": process_limits(),
            "seccomp": crate::sandbox::enforcing(),
        }))
    }

    /// Applies `op` to the named partition, or to every partition in state `from` when
    /// no name is given. Returns the names affected.
    fn each(
        &self,
        name: Option<&str>,
        from: State,
        op: impl Fn(&mut Partition) -> Result<(), PartitionError>,
    ) -> Result<Value, ApiError> {
        let mut done = Vec::new();
        for p in self.targets(name)? {
            let mut p = lock(p);
            let state = p.state();
            // A sleeping partition runs (its guest sleeps): "every running one" takes it.
            if name.is_none() && state != from && !(from == State::Running && state.is_live()) {
                continue;
            }
            op(&mut p).map_err(api_error)?;
            done.push(p.name().to_owned());
        }
        Ok(json!({ "partitions": done }))
    }

    /// Takes the operation slot for a lifecycle command, or answers `busy`.
    fn begin(&self, op: ops::Operation) -> Result<ops::OpGuard<'_>, ApiError> {
        let g = self.ops.begin(op).map_err(busy_error)?;
        g.phase(ops::Phase::Working);
        Ok(g)
    }

    /// Pauses one partition, or every running one.
    pub fn pause(&self, name: Option<&str>) -> Result<Value, ApiError> {
        let _op = self.begin(ops::Operation::Pause)?;
        self.each(name, State::Running, Partition::pause)
    }

    /// Resumes one partition, or every paused one.
    pub fn resume(&self, name: Option<&str>) -> Result<Value, ApiError> {
        let _op = self.begin(ops::Operation::Resume)?;
        self.each(name, State::Paused, Partition::resume)
    }

    /// Stops one partition.
    pub fn stop(&self, name: &str) -> Result<Value, ApiError> {
        let _op = self.begin(ops::Operation::Stop)?;
        self.each(Some(name), State::Running, Partition::stop)
    }

    /// Wakes one sleeping partition (power saving). Not a device operation: it takes no
    /// slot, so it works while a snapshot runs (the partition wakes when it is resumed).
    pub fn wake(&self, name: &str) -> Result<Value, ApiError> {
        lock(self.find(name)?).wake_up().map_err(api_error)?;
        Ok(json!({ "partitions": [name] }))
    }

    /// Cold-boots one stopped or crashed partition.
    pub fn start(&self, name: &str) -> Result<Value, ApiError> {
        let _op = self.begin(ops::Operation::Start)?;
        let ended = lock(&self.ended).clone();
        self.each(Some(name), State::Stopped, |p| {
            p.start(&self.kvm, self.vsock.as_ref(), &ended)
        })
    }

    /// The last `lines` console lines of a partition.
    pub fn console(&self, name: &str, lines: usize) -> Result<Value, ApiError> {
        let p = lock(self.find(name)?);
        let tail = p.console().lock().tail(lines);
        Ok(json!({ "partition": name, "lines": tail }))
    }

    /// Starts making a VM shell (see `partition::shell`) for every partition that has none
    /// being made, each on a thread of its own: a restore then skips creating its VMs.
    pub fn make_shells(&self) {
        let mut shells = lock(&self.shells);
        for config in &self.config.partitions {
            if shells.contains_key(&config.name) {
                continue;
            }
            let (kvm, cfg) = (self.kvm.clone(), config.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-shell", config.name))
                .spawn(move || {
                    crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
                    VmShell::new(&kvm, &cfg)
                });
            match spawned {
                Ok(h) => {
                    shells.insert(config.name.clone(), h);
                }
                Err(e) => log::warn!("making a VM shell for {}: {e}", config.name),
            }
        }
    }

    /// The shell made for partition `name`, waiting for it if it is still being made;
    /// `None` if there is none (or it failed: the restore then makes its VM itself).
    fn take_shell(&self, name: &str) -> Option<VmShell> {
        let h = lock(&self.shells).remove(name)?;
        match h.join() {
            Ok(Ok(shell)) => Some(shell),
            Ok(Err(e)) => {
                log::warn!("VM shell for {name}: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Records why a restore was not done and the device booted cold instead.
    pub fn set_fallback(&self, reason: String) {
        *lock(&self.fallback) = Some(reason);
    }

    /// Asks the monitor to shut down (the main thread waits for this).
    pub fn request_shutdown(&self) {
        *lock(&self.shutdown) = true;
        self.shutdown_cv.notify_all();
    }

    /// Whether shutdown was requested.
    pub fn shutting_down(&self) -> bool {
        *lock(&self.shutdown)
    }

    /// Waits up to `d` for a shutdown request; true once requested.
    pub fn wait_shutdown(&self, d: Duration) -> bool {
        let g = lock(&self.shutdown);
        let (g, _) = self
            .shutdown_cv
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    /// Stops every partition that still runs, once the running operation (if any) is
    /// done (it gets 10 s; then they are stopped anyway).
    pub fn stop_all(&self) {
        let _op = self
            .ops
            .begin_wait(ops::Operation::Stop, Duration::from_secs(10))
            .map_err(|busy| log::warn!("stopping every partition although {busy}"));
        for p in &self.partitions {
            let mut p = lock(p);
            if matches!(p.state(), State::Running | State::Sleeping | State::Paused) {
                let _ = p.stop();
            }
        }
    }

    /// Runs `f` on the named partition (for tests and measurements).
    pub fn with_partition<R>(&self, name: &str, f: impl FnOnce(&Partition) -> R) -> Option<R> {
        self.find(name).ok().map(|p| f(&lock(p)))
    }

    fn on_ended(&self, ended: &Ended) {
        let Ok(p) = self.find(&ended.name) else {
            return;
        };
        // A message about a run that is not the partition's current one (replaced by a
        // restore, or prepared and thrown away) is stale: no operation for it.
        if lock(p).boot_id() != Some(ended.boot) {
            return;
        }
        // Handling the end is a device operation too: it waits for the running one (a
        // restore that replaces this run meanwhile makes the event stale: checked again).
        let _op = match self
            .ops
            .begin_wait(ops::Operation::PartitionEnded, Duration::from_secs(30))
        {
            Ok(g) => g,
            Err(busy) => {
                log::error!("partition {} ended; not handled: {busy}", ended.name);
                return;
            }
        };
        _op.phase(ops::Phase::Working);
        let mut p = lock(p);
        if p.boot_id() != Some(ended.boot) {
            return;
        }
        p.reap();
        match p.outcome() {
            Some(Outcome::Crashed(info)) => {
                log::error!("partition {} crashed: {}", ended.name, info.reason)
            }
            Some(Outcome::PowerOff { status }) => {
                log::info!("partition {} powered off with status {status}", ended.name)
            }
            Some(Outcome::Reboot) if !self.shutting_down() => {
                log::info!("partition {} asked to reboot; cold-booting it", ended.name);
                let tx = lock(&self.ended).clone();
                if let Err(e) = p.start(&self.kvm, self.vsock.as_ref(), &tx) {
                    log::error!("partition {} could not reboot: {e}", ended.name);
                }
            }
            _ => {}
        }
    }
}

fn supervise(monitor: &std::sync::Weak<Monitor>, rx: &Receiver<PartitionEvent>) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => match (monitor.upgrade(), event) {
                (None, _) => return,
                (Some(m), PartitionEvent::Ended(ended)) => m.on_ended(&ended),
                (Some(m), PartitionEvent::SnapshotRequest { run, reboot, latch }) => {
                    m.on_snapshot_request(&run, reboot, &latch)
                }
            },
            Err(RecvTimeoutError::Timeout) => {
                if monitor.strong_count() == 0 {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn snapshot_error(e: snapshot::SnapshotFailure) -> ApiError {
    use snapshot::SnapshotFailure as F;
    let code = match &e {
        F::Busy(b) => return busy_error(b.clone()),
        F::Denied(_) => ErrorCode::SnapshotDenied,
        F::NotRunning { .. } => ErrorCode::InvalidState,
        F::Invalid { .. } => ErrorCode::InvalidSnapshot,
        F::Quiesce(_) | F::Failed(_) => ErrorCode::SnapshotFailed,
        F::RestoreFailed { step, .. } => {
            let step = *step;
            return ApiError::new(ErrorCode::RestoreFailed, e.to_string())
                .with_details(json!({ "step": step }));
        }
    };
    ApiError::new(code, e.to_string())
}

fn busy_error(b: ops::Busy) -> ApiError {
    let details = serde_json::to_value(&b).unwrap_or(Value::Null);
    ApiError::new(ErrorCode::Busy, b.to_string()).with_details(details)
}

fn api_error(e: PartitionError) -> ApiError {
    match e {
        PartitionError::InvalidState { .. } => {
            ApiError::new(ErrorCode::InvalidState, e.to_string())
        }
        other => ApiError::internal(other.to_string()),
    }
}

impl ControlHandler for Monitor {
    fn handle(&self, cmd: Command) -> Result<Value, ApiError> {
        if self.shutting_down() && cmd != Command::Shutdown {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the monitor is shutting down",
            ));
        }
        match cmd {
            Command::Status { partition } => self.status(partition.as_deref()),
            Command::Pause { partition } => self.pause(partition.as_deref()),
            Command::Resume { partition } => self.resume(partition.as_deref()),
            Command::Stop { partition } => self.stop(&partition),
            Command::Start { partition } => self.start(&partition),
            Command::Wake { partition } => self.wake(&partition),
            Command::Console { partition, lines } => self.console(&partition, lines),
            Command::Snapshot { dest, parent } => self
                .snapshot(
                    std::path::Path::new(&dest),
                    parent.as_deref().map(std::path::Path::new),
                )
                .map_err(snapshot_error),
            Command::Reboot { from } => {
                let dir = match (from, &self.config.snapshot) {
                    (Some(f), _) => std::path::PathBuf::from(f),
                    (None, Some(s)) => s.dir.clone(),
                    (None, None) => {
                        return Err(ApiError::new(
                            ErrorCode::InvalidRequest,
                            "reboot needs \"from\": the config has no snapshot.dir",
                        ))
                    }
                };
                self.restore_from(
                    &dir,
                    duplex_snapshot::LoadMode::Lazy,
                    ops::Operation::Reboot,
                )
                .map_err(snapshot_error)
            }
            Command::Shutdown => {
                self.request_shutdown();
                Ok(json!({ "shutting_down": true }))
            }
        }
    }
}
