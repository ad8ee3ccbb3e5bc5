//! A partition: one guest system of the device, as its own KVM VM with its own memory,
//! vCPU threads, console and control page. It can be started (cold boot), paused,
//! resumed and stopped; how its last run ended is kept for `status`.

mod build;
pub mod disk;
pub mod net;
mod run;
pub mod shared;
pub mod shell;
pub mod sleep;
pub mod snapshot;
pub mod state;
pub mod vcpu;

pub use run::{discard_in_background, Builder, PreparedRun, RestoreWith, Run};

use duplex_devices::GuestMemoryMmap;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::Kvm;
use serde::Serialize;

use vmm_sys_util::signal::Killable;

use duplex_devices::blk::BlkStats;
use duplex_devices::console::{ConsoleHandle, ConsoleOutput};
use duplex_devices::event_loop::EventLoop;
use duplex_devices::net::NetStats;
use duplex_devices::persist::Suspendable;
use duplex_devices::sysctl::WakeReason;
use duplex_devices::vsock::VsockSwitch;
use std::sync::Arc;

use crate::boot::BootError;
use crate::config::{ConsoleSink, PartitionConfig};
use shared::{CrashInfo, ExitCounts, Outcome, Want};
use vcpu::PartitionEvent;

/// How long pause and stop wait for vCPU threads to come out of the guest.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a partition operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// A KVM ioctl failed.
    #[error("partition {name}: {what}: {source}")]
    Kvm {
        name: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// The guest memory could not be created.
    #[error("partition {name}: guest memory of {mib} MiB: {message}")]
    Memory {
        name: String,
        mib: u64,
        message: String,
    },
    /// The kernel could not be loaded.
    #[error("partition {name}: {source}")]
    Boot { name: String, source: BootError },
    /// The console file could not be opened.
    #[error("partition {name}: console file {path}: {source}")]
    ConsoleFile {
        name: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A vCPU thread could not be started.
    #[error("partition {name}: starting vCPU thread: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
    /// The operation does not fit the partition's state.
    #[error("partition {name} is {state}, cannot {op}")]
    InvalidState {
        name: String,
        state: State,
        op: &'static str,
    },
    /// The vsock device could not be attached.
    #[error("partition {name}: vsock: {source}")]
    Vsock {
        name: String,
        source: duplex_devices::vsock::VsockError,
    },
    /// The network card's TAP could not be opened, or the card could not be built.
    #[error("partition {name}: network card: {message}")]
    Net { name: String, message: String },
    /// The partition has a vsock device but the monitor has no switch.
    #[error("partition {name}: has a vsock device but the monitor has no vsock switch")]
    NoSwitch { name: String },
    /// Saving or restoring KVM state failed.
    #[error("partition {name}: {source}")]
    State {
        name: String,
        source: state::StateError,
    },
    /// A saved state does not fit this partition.
    #[error("partition {name}: cannot restore: {message}")]
    Restore { name: String, message: String },
    /// The partition's disk could not be opened, built or restored.
    #[error("partition {name}: disk: {message}")]
    Disk { name: String, message: String },
    /// vCPUs did not come out of the guest in time.
    #[error("partition {name}: vCPUs did not stop within {0:?}", PARK_TIMEOUT)]
    Timeout { name: String },
}

/// The lifecycle state of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Configured, never started.
    Created,
    /// Its vCPUs run.
    Running,
    /// Running, but the guest sleeps (power saving, guest ABI `SLEEP`) until it is woken:
    /// its vCPUs wait in the monitor.
    Sleeping,
    /// Its vCPUs are parked.
    Paused,
    /// It powered off or was stopped.
    Stopped,
    /// It faulted, panicked or could not be run.
    Crashed,
}

impl State {
    /// Running or sleeping: its vCPU threads are there to be paused or stopped.
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Sleeping)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            State::Created => "created",
            State::Running => "running",
            State::Sleeping => "sleeping",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Crashed => "crashed",
        };
        f.write_str(s)
    }
}

/// What `status` reports about a partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub name: String,
    pub role: crate::config::Role,
    pub state: State,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub uptime_ms: u64,
    pub boots: u64,
    pub exit_status: Option<u32>,
    pub crash: Option<CrashInfo>,
    pub exits: ExitCounts,
    pub console_lines: u64,
    /// The console's writer: lines dropped because its sink was too slow, rotations of
    /// its file (see `docs/config.md`, `console`).
    pub console: duplex_devices::console::ConsoleStats,
    /// Guest register accesses the devices ignored (misaligned, wrong size, unknown
    /// register), per device, in the current run (see `docs/guest-abi.md`).
    pub bad_accesses: BadAccesses,
    /// The network card: TAP, MAC and counters (absent without one; see `docs/net.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<net::NetStatus>,
    /// The disk: backing file, size and counters (absent without one; see `docs/blk.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<disk::DiskStatus>,
    /// Its power-saving sleeps: since when it sleeps, the last wake's reason (absent if it
    /// never slept in this run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep: Option<sleep::SleepStatus>,
}

/// Ignored register accesses of one run, per device.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BadAccesses {
    /// The system control page.
    pub sysctl: u64,
    /// The vsock device's virtio-mmio window (0 without one).
    pub vsock: u64,
    /// The network card's virtio-mmio window (0 without one).
    pub net: u64,
    /// The disk's virtio-mmio window (0 without one).
    pub disk: u64,
}

/// A partition of the device.
pub struct Partition {
    config: PartitionConfig,
    console: ConsoleHandle,
    run: Option<Run>,
    /// How the last finished run ended (kept after its VM is torn down).
    last: Option<Outcome>,
    last_exits: ExitCounts,
    boots: u64,
    /// Paused by [`Suspendable::sleep`] (so [`Suspendable::wake`] resumes it).
    asleep: bool,
    /// The TAP of its network card, open for the partition's life (each run's card gets a
    /// duplicate).
    net: Option<Arc<net::PartitionNet>>,
    /// The run's network card was put to sleep by [`Suspendable::sleep`].
    card_asleep: bool,
    /// The run's disk was put to sleep by [`Suspendable::sleep`].
    disk_asleep: bool,
    /// The card's counters when the last run ended.
    last_net: Option<NetStats>,
    /// The disk's counters when the last run ended.
    last_disk: Option<BlkStats>,
}

impl Partition {
    /// A partition from its config; opens its console sink, and the TAP of its network card
    /// (whose runs' cards wait on `event_loop`).
    pub fn new(config: PartitionConfig, event_loop: &EventLoop) -> Result<Self, PartitionError> {
        let net = match &config.net {
            Some(n) => Some(Arc::new(net::PartitionNet::open(
                &config.name,
                n,
                event_loop,
            )?)),
            None => None,
        };
        let output = match &config.console {
            ConsoleSink::Stdout => ConsoleOutput::Stdout {
                prefix: config.name.clone(),
            },
            // Appended to, rotated to `<file>.1` at its cap (console::FILE_MAX_BYTES).
            ConsoleSink::File(path) => {
                ConsoleOutput::file(path).map_err(|source| PartitionError::ConsoleFile {
                    name: config.name.clone(),
                    path: path.clone(),
                    source,
                })?
            }
        };
        Ok(Partition {
            console: ConsoleHandle::new(output),
            config,
            run: None,
            last: None,
            last_exits: ExitCounts::default(),
            boots: 0,
            asleep: false,
            net,
            card_asleep: false,
            disk_asleep: false,
            last_net: None,
            last_disk: None,
        })
    }

    /// The partition's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The partition's config.
    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// Its console's recent lines.
    pub fn console(&self) -> &ConsoleHandle {
        &self.console
    }

    /// The current state.
    pub fn state(&self) -> State {
        let outcome_state = |o: &Outcome| match o {
            Outcome::Crashed(_) => State::Crashed,
            _ => State::Stopped,
        };
        match &self.run {
            None => self.last.as_ref().map_or(State::Created, outcome_state),
            Some(run) => {
                let c = run.shared.lock();
                match (&c.outcome, c.want) {
                    (Some(o), _) => outcome_state(o),
                    (None, Want::Pause) if c.parked >= c.live => State::Paused,
                    (None, Want::Stop) => State::Stopped,
                    _ => {
                        drop(c);
                        if sleep::asleep(&run.devices) {
                            State::Sleeping
                        } else {
                            State::Running
                        }
                    }
                }
            }
        }
    }

    fn invalid(&self, op: &'static str) -> PartitionError {
        PartitionError::InvalidState {
            name: self.config.name.clone(),
            state: self.state(),
            op,
        }
    }

    /// Cold-boots the partition: a new VM, memory, kernel, devices and vCPU threads.
    pub fn start(
        &mut self,
        kvm: &Kvm,
        switch: Option<&VsockSwitch>,
        ended: &Sender<PartitionEvent>,
    ) -> Result<(), PartitionError> {
        match self.state() {
            State::Created | State::Stopped | State::Crashed => {}
            _ => return Err(self.invalid("start")),
        }
        self.reap();
        let built = build::build(
            &self.config,
            &self.console,
            kvm,
            switch,
            self.net.as_deref(),
            build::Source::Cold,
        )?;
        self.launch(built, ended)
    }

    /// What building a run from a snapshot needs of the partition, to build it without
    /// holding the partition (its lock stays free for `status` meanwhile):
    /// [`Builder::prepare_restore`], then [`Partition::install`].
    pub fn builder(&self) -> Builder {
        Builder {
            config: self.config.clone(),
            console: self.console.clone(),
            boot: run::next_boot_id(),
            net: self.net.clone(),
        }
    }

    /// Makes a prepared run the partition's run, paused (resume it to run); returns the
    /// run it replaces, for the caller to end ([`discard_in_background`]).
    /// The replaced run's card stays asleep (it shares the TAP) until it is dropped.
    pub fn install(&mut self, prepared: PreparedRun) -> Option<Run> {
        if let Some(disk) = prepared.disk {
            // The new run has the restored file open already: only its name moves.
            if let Err(e) = disk.commit() {
                log::error!(
                    "partition {}: putting the restored disk in place: {e}",
                    self.config.name
                );
            }
        }
        let mut run = prepared.run;
        run.subscribe_net();
        let old = self.run.replace(run);
        self.asleep = false;
        self.card_asleep = false;
        self.disk_asleep = false;
        self.boots += 1;
        self.last = None;
        old
    }

    /// Starts the vCPU threads of a built VM (cold boot).
    fn launch(
        &mut self,
        built: build::Built,
        ended: &Sender<PartitionEvent>,
    ) -> Result<(), PartitionError> {
        let mut run = self.spawn(built, ended, run::next_boot_id())?;
        run.subscribe_net();
        self.boots += 1;
        self.last = None;
        self.run = Some(run);
        Ok(())
    }

    fn spawn(
        &self,
        built: build::Built,
        ended: &Sender<PartitionEvent>,
        boot: u64,
    ) -> Result<Run, PartitionError> {
        run::spawn(&self.config.name, built, ended, boot)
    }

    /// Parks every vCPU; returns once they are all out of the guest.
    pub fn pause(&mut self) -> Result<(), PartitionError> {
        if !self.state().is_live() {
            return Err(self.invalid("pause"));
        }
        let run = self.run.as_ref().ok_or_else(|| self.invalid("pause"))?;
        run.shared.set_want(Want::Pause);
        let threads = &run.threads;
        if run.shared.wait_parked(PARK_TIMEOUT, || kick_all(threads)) {
            Ok(())
        } else {
            Err(PartitionError::Timeout {
                name: self.config.name.clone(),
            })
        }
    }

    /// Lets the vCPUs of a freshly installed restored run go (they may not all have parked
    /// yet, which [`Partition::resume`] would refuse).
    pub fn release(&mut self) {
        if let Some(run) = &self.run {
            run.shared.set_want(Want::Run);
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&mut self) -> Result<(), PartitionError> {
        if self.state() != State::Paused {
            return Err(self.invalid("resume"));
        }
        if let Some(run) = &self.run {
            run.shared.set_want(Want::Run);
        }
        Ok(())
    }

    /// Stops the partition: its vCPU threads end and its VM is torn down.
    pub fn stop(&mut self) -> Result<(), PartitionError> {
        match self.state() {
            State::Running | State::Sleeping | State::Paused => {}
            _ => return Err(self.invalid("stop")),
        }
        if let Some(run) = &self.run {
            run.shared.finish(Outcome::Stopped);
        }
        self.reap();
        Ok(())
    }

    /// Joins the vCPU threads of an ended run and frees its VM; keeps how it ended.
    /// Does nothing while the run is still going.
    pub fn reap(&mut self) {
        let Some(run) = &self.run else { return };
        if run.shared.lock().outcome.is_none() {
            return;
        }
        if let Some(mut run) = self.run.take() {
            let (exits, outcome) = run.end();
            self.last_net = run.net.as_ref().map(|n| n.card.stats());
            self.last_disk = run.devices.disk.as_ref().map(|d| d.stats());
            self.last_exits = exits;
            self.last = outcome;
            self.console.lock().flush_partial();
        }
    }

    /// The id of the current run (unique in the process), if any.
    pub fn boot_id(&self) -> Option<u64> {
        self.run.as_ref().map(|r| r.boot)
    }

    /// How the current (ended) or last run ended.
    pub fn outcome(&self) -> Option<Outcome> {
        match &self.run {
            Some(run) => run.shared.lock().outcome.clone(),
            None => self.last.clone(),
        }
    }

    /// Guest memory of the current run (for tests and measurements).
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.run.as_ref().map(|r| &r.mem)
    }

    /// What `status` reports.
    pub fn status(&self) -> PartitionStatus {
        // The state before the outcome: an outcome, once set, stays, so a state that says
        // the run ended always comes with its outcome (the other order could show
        // `crashed` without the crash, if the run ended between the two reads).
        let state = self.state();
        let outcome = self.outcome();
        // Read before the literal below: a lock taken inside it would be held to its end.
        let console = self.console.stats();
        PartitionStatus {
            name: self.config.name.clone(),
            role: self.config.role,
            state,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            uptime_ms: self
                .run
                .as_ref()
                .filter(|_| outcome.is_none())
                .map_or(0, |r| r.started.elapsed().as_millis() as u64),
            boots: self.boots,
            exit_status: match outcome {
                Some(Outcome::PowerOff { status }) => Some(status),
                _ => None,
            },
            crash: match outcome {
                Some(Outcome::Crashed(info)) => Some(info),
                _ => None,
            },
            exits: self
                .run
                .as_ref()
                .map_or(self.last_exits, |r| r.shared.exits.read()),
            console_lines: console.lines,
            console,
            bad_accesses: self
                .run
                .as_ref()
                .map_or_else(BadAccesses::default, |r| BadAccesses {
                    sysctl: crate::lock(&r.devices.sysctl).bad_accesses(),
                    vsock: r.devices.vsock.as_ref().map_or(0, |v| v.bad_accesses()),
                    net: r.devices.net.as_ref().map_or(0, |n| n.bad_accesses()),
                    disk: r.devices.disk.as_ref().map_or(0, |d| d.bad_accesses()),
                }),
            net: self.net.as_ref().map(|n| {
                let counters = match &self.run {
                    Some(r) => r.devices.net.as_ref().map(|c| c.stats()),
                    None => self.last_net,
                };
                net::NetStatus::new(n, counters.unwrap_or_default())
            }),
            disk: self.config.disk.as_ref().map(|d| {
                let counters = match &self.run {
                    Some(r) => r.devices.disk.as_ref().map(|c| c.stats()),
                    None => self.last_disk,
                };
                disk::DiskStatus::new(d, counters.unwrap_or_default())
            }),
            sleep: self.run.as_ref().and_then(|r| {
                sleep::SleepStatus::new(crate::lock(&r.devices.sysctl).sleep_state())
            }),
        }
    }

    /// Wakes the partition from its power-saving sleep (the operator's `wake`).
    pub fn wake_up(&mut self) -> Result<(), PartitionError> {
        let run = self
            .run
            .as_ref()
            .filter(|_| self.state() == State::Sleeping)
            .ok_or_else(|| self.invalid("wake"))?;
        if !sleep::wake(&run.devices, &run.shared, WakeReason::Operator) {
            return Err(self.invalid("wake"));
        }
        Ok(())
    }

    /// The current run's disk, if any.
    pub fn disk(&self) -> Option<Arc<disk::Disk>> {
        self.run.as_ref().and_then(|r| r.devices.disk.clone())
    }

    /// The current run's network card, if any.
    fn card(&self) -> Option<Arc<net::Card>> {
        self.run.as_ref().and_then(|r| r.devices.net.clone())
    }
}

/// A partition is quiet at a cut when its vCPUs are parked and its network card asleep:
/// `sleep` pauses it if it runs, `wake` resumes it only if `sleep` paused it.
impl Suspendable for Partition {
    type Error = PartitionError;

    /// Its network card sleeps too, whatever the partition's state: a card delivers frames
    /// into the memory of a paused guest as well.
    fn sleep(&mut self) -> Result<(), PartitionError> {
        if self.state().is_live() {
            self.pause()?;
            self.asleep = true;
        }
        if let Some(mut card) = self.card() {
            let Ok(()) = card.sleep();
            self.card_asleep = true;
        }
        if let Some(mut disk) = self.disk() {
            let Ok(()) = disk.sleep();
            self.disk_asleep = true;
        }
        Ok(())
    }

    fn wake(&mut self) {
        if std::mem::take(&mut self.disk_asleep) {
            if let Some(mut disk) = self.disk() {
                disk.wake();
            }
        }
        if std::mem::take(&mut self.card_asleep) {
            if let Some(mut card) = self.card() {
                card.wake();
            }
        }
        if std::mem::take(&mut self.asleep) {
            if let Err(e) = self.resume() {
                log::error!("partition {}: waking: {e}", self.config.name);
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Some(run) = &self.run {
            run.shared.finish(Outcome::Stopped);
        }
        self.reap();
    }
}

/// The signal that brings a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler of [`kick_signal`]; call once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

fn kick_all(threads: &[JoinHandle<()>]) {
    for t in threads {
        if !t.is_finished() {
            // A thread that just left cannot be signalled; that is fine.
            let _ = t.kill(kick_signal());
        }
    }
}
