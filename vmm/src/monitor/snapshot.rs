//! The coordinated snapshot of every partition into one set.
//!
//! Snapshot (live): KVM's dirty log and the devices' bitmap are cleared, memory is copied
//! while the partitions run and, meanwhile, the controller has the engine reach a safe point
//! (quiesce); then every partition is paused and the vsock switch frozen, the pages written
//! since the copy are written again, vCPUs, VM, devices and the switch's table are captured,
//! and the partitions resume. State files, checksums, fsync and the atomic rename follow
//! while the device runs: the set is invisible until committed. A failure at any step
//! changes nothing: the partitions run on, the last set is intact, and dirty tracking keeps
//! every page harvested since the last committed set.
//!
//! Restore and reboot are in `restore`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use duplex_link::{HostReply, HostRequest, JOB_PORT};
use duplex_snapshot::{SetWriter, SnapshotSet};

use super::ops::{Busy, OpGuard, Operation, Phase};
use super::{lock, Monitor};
use crate::config::Role;
use crate::job::{JobClient, JobError};
use crate::partition::snapshot::PartitionState;
use crate::partition::State;
use duplex_devices::persist::{Persist, Suspendable};
use duplex_devices::vsock::SwitchState;

/// Why a snapshot or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    /// The engine (through the controller) refused to reach a safe point.
    #[error("the engine denied the snapshot: {0}")]
    Denied(String),
    /// The controller could not be asked.
    #[error("quiesce: {0}")]
    Quiesce(String),
    /// A partition is in a state that cannot be snapshotted.
    #[error("partition {name} is {state}: every partition must be running or paused")]
    NotRunning { name: String, state: State },
    /// Capturing or writing failed; the partitions were resumed and nothing was written.
    #[error("{0}")]
    Failed(String),
    /// The set cannot be used for this device.
    #[error("set {dir}: {reason}")]
    Invalid { dir: PathBuf, reason: String },
    /// Another device operation is running.
    #[error("{0}")]
    Busy(Busy),
    /// The set is valid but building or switching to it failed at `step`; the device runs
    /// as before.
    #[error("restore failed at {step}: {reason}; the device runs as before")]
    RestoreFailed { step: &'static str, reason: String },
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Monitor {
    /// Asks the controller to have the engine reach a safe point. Returns what the
    /// controller said, or `None` when the device has no controller with a host bridge or
    /// a partition is not running: a device the operator paused, wholly or in part, is
    /// snapshotted as it stands (a paused engine could not answer, and no `resume` can
    /// come while the snapshot holds the device).
    fn quiesce(&self) -> Result<Option<Value>, SnapshotFailure> {
        if !self.partitions.iter().all(|p| lock(p).state().is_live()) {
            return Ok(None);
        }
        let uds = self
            .config
            .partitions
            .iter()
            .find_map(|p| match (p.role, &p.vsock) {
                (Role::Controller, Some(v)) => v.uds.clone(),
                _ => None,
            });
        let Some(uds) = uds else { return Ok(None) };
        // One overall deadline for the whole exchange (connect, request, reply), however
        // the controller dribbles its bytes: the snapshot holds the device's operation
        // slot meanwhile.
        let deadline = Some(Instant::now() + QUIESCE_TIMEOUT);
        let mut c = JobClient::connect_port_by(&uds, JOB_PORT, deadline)
            .map_err(|e| SnapshotFailure::Quiesce(e.to_string()))?;
        match c.call(&HostRequest::PrepareSnapshot) {
            Ok(HostReply::SnapshotReady {
                engine_pages_printed,
                jobs_queued,
            }) => Ok(Some(json!({
                "engine_pages_printed": engine_pages_printed,
                "jobs_queued": jobs_queued,
            }))),
            Ok(other) => Err(SnapshotFailure::Quiesce(format!(
                "unexpected reply {other:?}"
            ))),
            Err(JobError::Controller { code: 409, message }) => {
                Err(SnapshotFailure::Denied(message))
            }
            Err(e) => Err(SnapshotFailure::Quiesce(e.to_string())),
        }
    }

    /// Takes a coordinated snapshot of every partition into the set at `dest` (see the
    /// module docs). With `parent`, the set is incremental: only pages written since the
    /// parent (which must be the last set this device took or was restored from) are
    /// written.
    pub fn snapshot(&self, dest: &Path, parent: Option<&Path>) -> Result<Value, SnapshotFailure> {
        let root = self
            .config
            .snapshot
            .as_ref()
            .and_then(|s| s.root.as_deref());
        super::restore::confine(dest, root)?;
        if let Some(p) = parent {
            super::restore::confine(p, root)?;
        }
        let op = self
            .ops
            .begin(Operation::Snapshot)
            .map_err(SnapshotFailure::Busy)?;
        self.snapshot_in(&op, dest, parent)
    }

    fn snapshot_in(
        &self,
        op: &OpGuard<'_>,
        dest: &Path,
        parent: Option<&Path>,
    ) -> Result<Value, SnapshotFailure> {
        let t0 = Instant::now();
        let fail = |e: &dyn std::fmt::Display| SnapshotFailure::Failed(e.to_string());
        for p in &self.partitions {
            let p = lock(p);
            if !matches!(p.state(), State::Running | State::Sleeping | State::Paused) {
                return Err(SnapshotFailure::NotRunning {
                    name: p.name().to_owned(),
                    state: p.state(),
                });
            }
        }
        let parent = match parent {
            None => None,
            Some(dir) => Some(self.parent_of_next_set(dir)?),
        };
        let mut writer = SetWriter::create(dest, parent.as_ref()).map_err(|e| fail(&e))?;
        self.faults.check("snapshot.create").map_err(|e| fail(&e))?;

        // First pass, while the partitions run; the quiesce meanwhile.
        op.phase(Phase::Copying);
        let t = Instant::now();
        let (copied, quiesced) = std::thread::scope(|scope| {
            let q = scope.spawn(|| {
                crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
                let t = Instant::now();
                self.quiesce().map(|v| (v, t.elapsed()))
            });
            let copied = self.copy_memory(&mut writer, parent.is_some());
            // The copy is done; the engine may still be on its way to its safe point.
            op.phase(Phase::Quiescing);
            let quiesced = q
                .join()
                .unwrap_or_else(|_| Err(SnapshotFailure::Quiesce("the quiesce panicked".into())));
            (copied, quiesced)
        });
        let pages_copied = copied?;
        let (quiesced, t_quiesce) = quiesced?;
        let t_copy = t.elapsed();

        // The cut.
        op.phase(Phase::Capturing);
        let t_down = Instant::now();
        let asleep = self.sleep_all().map_err(|e| fail(&e))?;
        let t_pause = t_down.elapsed();
        let captured = self.capture_cut(&mut writer);
        let t = Instant::now();
        drop(asleep);
        let t_resume = t.elapsed();
        let downtime = t_down.elapsed();
        let cut = captured?;

        // Commit, while the device runs.
        op.phase(Phase::Committing);
        let t = Instant::now();
        for (name, state) in &cut.states {
            let bytes = serde_json::to_vec(state).map_err(|e| fail(&e))?;
            writer.write_state(name, &bytes).map_err(|e| fail(&e))?;
        }
        if let Some(sw) = &cut.switch {
            let bytes = serde_json::to_vec(sw).map_err(|e| fail(&e))?;
            writer
                .write_device_state(VSOCK_STATE, &bytes)
                .map_err(|e| fail(&e))?;
        }
        self.faults.check("snapshot.commit").map_err(|e| fail(&e))?;
        let set_id = writer.set_id().to_owned();
        let config = serde_json::to_value(&self.config).map_err(|e| fail(&e))?;
        let commit = writer.commit(config, Value::Null).map_err(|e| fail(&e))?;
        for p in &self.partitions {
            lock(p).commit_dirty(&set_id);
        }
        let mut pages = serde_json::Map::new();
        let mut memory_bytes = 0;
        for (name, copied) in pages_copied {
            let again = cut.pages_again.get(&name).copied().unwrap_or(0);
            memory_bytes += (copied + again) * duplex_snapshot::PAGE_SIZE as u64;
            pages.insert(name, json!({ "copied": copied, "written_again": again }));
        }
        Ok(json!({
            "set": dest,
            "set_id": set_id,
            "parent": parent.map(|p| p.manifest.set_id.clone()),
            "partitions": cut.states.len(),
            "pages": pages,
            "bytes_written": commit.bytes_written,
            "quiesce": quiesced.unwrap_or(Value::Null),
            "downtime_ms": ms(downtime),
            "memory_bytes_written": memory_bytes,
            "timings_ms": {
                "copy": ms(t_copy),
                "quiesce": ms(t_quiesce),
                "pause": ms(t_pause),
                "capture": ms(cut.elapsed),
                "resume": ms(t_resume),
                "commit": ms(t.elapsed()),
                "fsync": ms(commit.fsync),
                "rename": ms(commit.rename),
                "total": ms(t0.elapsed()),
            },
        }))
    }

    /// The set at `dir` opened as the parent of the next set: it must be the last set
    /// every partition's writes are tracked from.
    fn parent_of_next_set(&self, dir: &Path) -> Result<SnapshotSet, SnapshotFailure> {
        let set = SnapshotSet::open(dir).map_err(|e| SnapshotFailure::Invalid {
            dir: dir.to_owned(),
            reason: e.to_string(),
        })?;
        for p in &self.partitions {
            let p = lock(p);
            if p.dirty_since() != Some(set.manifest.set_id.as_str()) {
                return Err(SnapshotFailure::Invalid {
                    dir: dir.to_owned(),
                    reason: format!(
                        "not a parent for partition {}: an incremental set needs the last set \
                         this device took or was restored from, with the partition running since",
                        p.name()
                    ),
                });
            }
        }
        Ok(set)
    }

    /// The first pass: each partition's dirty logs are cleared (switched on if they were
    /// off), then its memory is written while it runs: every page of a full set, the pages
    /// written since the parent for an incremental one. Returns pages written per partition.
    fn copy_memory(
        &self,
        writer: &mut SetWriter,
        incremental: bool,
    ) -> Result<Vec<(String, u64)>, SnapshotFailure> {
        let fail = |e: &dyn std::fmt::Display| SnapshotFailure::Failed(e.to_string());
        let mut out = Vec::new();
        for p in &self.partitions {
            let (name, mem, only, disk) = {
                let mut p = lock(p);
                // A memory file cut short under a lazily restored guest: that partition is
                // crashed (its memory is not what it was) and no set is taken of it.
                p.check_memory_file().map_err(|e| fail(&e))?;
                p.harvest_dirty().map_err(|e| fail(&e))?;
                let mem = p
                    .memory()
                    .cloned()
                    .ok_or_else(|| fail(&format!("partition {} has no memory", p.name())))?;
                let only = incremental.then(|| p.pending_dirty());
                // The disk's blocks from here on are the second pass's.
                p.harvest_disk_dirty();
                let disk = p.disk_file().map_err(|e| fail(&e))?;
                let disk_only = incremental.then(|| p.pending_disk_dirty());
                (p.name().to_owned(), mem, only, disk.map(|d| (d, disk_only)))
            };
            self.faults.check("snapshot.copy").map_err(|e| fail(&e))?;
            let stats = writer
                .write_memory(&name, &mem, only.as_deref())
                .map_err(|e| fail(&e))?;
            if let Some(((file, len), disk_only)) = disk {
                writer
                    .write_disk(&name, &file, len, disk_only.as_deref())
                    .map_err(|e| fail(&e))?;
            }
            out.push((name, stats.pages_written));
        }
        Ok(out)
    }

    /// Puts every partition, then the vsock switch, to sleep (see [`Suspendable`]): the
    /// device is quiet until the guard is dropped, which wakes them in reverse order. On a
    /// failure those already asleep are woken again.
    pub(super) fn sleep_all(&self) -> Result<Asleep<'_>, String> {
        // Dropped on an error: wakes the partitions it put to sleep so far.
        let mut asleep = Asleep {
            monitor: self,
            switch: false,
        };
        for p in &self.partitions {
            let mut p = lock(p);
            self.faults.check("pause").map_err(|e| e.to_string())?;
            p.sleep().map_err(|e| e.to_string())?;
        }
        if let Some(sw) = &self.vsock {
            let Ok(()) = sw.clone().sleep();
            asleep.switch = true;
        }
        Ok(asleep)
    }

    /// With every partition paused and the switch frozen: the second pass over the pages
    /// written since the first, then vCPU, VM and device state, and the switch's table.
    fn capture_cut(&self, writer: &mut SetWriter) -> Result<Cut, SnapshotFailure> {
        let fail = |e: &dyn std::fmt::Display| SnapshotFailure::Failed(e.to_string());
        let t = Instant::now();
        let mut cut = Cut::default();
        for p in &self.partitions {
            self.faults
                .check("snapshot.capture")
                .map_err(|e| fail(&e))?;
            let mut p = lock(p);
            let name = p.name().to_owned();
            let delta = p.harvest_dirty().map_err(|e| fail(&e))?;
            let mem = p
                .memory()
                .cloned()
                .ok_or_else(|| fail(&format!("partition {name} has no memory")))?;
            let stats = writer
                .update_memory(&name, &mem, &delta)
                .map_err(|e| fail(&e))?;
            cut.pages_again.insert(name.clone(), stats.pages_scanned);
            if let (Some(delta), Some((file, _))) =
                (p.harvest_disk_dirty(), p.disk_file().map_err(|e| fail(&e))?)
            {
                writer
                    .update_disk(&name, &file, &delta)
                    .map_err(|e| fail(&e))?;
            }
            let state = p.capture().map_err(|e| fail(&e))?;
            cut.states.push((name, state));
        }
        cut.switch = match &self.vsock {
            Some(sw) => Some(sw.save().map_err(|e| fail(&e))?),
            None => None,
        };
        cut.elapsed = t.elapsed();
        Ok(cut)
    }
}

/// How long the controller (and through it the engine) has to answer a quiesce.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The component name of the vsock switch's state file in a set (`vsock.devstate`).
pub const VSOCK_STATE: &str = "vsock";

/// What the cut captured.
#[derive(Default)]
struct Cut {
    states: Vec<(String, PartitionState)>,
    switch: Option<SwitchState>,
    pages_again: std::collections::BTreeMap<String, u64>,
    elapsed: Duration,
}

/// The device asleep for a cut or an exchange; woken (switch first, then partitions) when
/// dropped. Only what it put to sleep wakes: an operator-paused partition stays paused.
pub(super) struct Asleep<'a> {
    monitor: &'a Monitor,
    switch: bool,
}

impl Drop for Asleep<'_> {
    fn drop(&mut self) {
        if let (true, Some(sw)) = (self.switch, &self.monitor.vsock) {
            sw.clone().wake();
        }
        for p in &self.monitor.partitions {
            lock(p).wake();
        }
    }
}
