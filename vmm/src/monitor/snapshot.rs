//! The coordinated snapshot of every partition into one set, and the restore of every
//! partition from a set (in a new process, or in-process as a reboot).
//!
//! Snapshot: quiesce (the controller asks the engine to reach a safe point and approve),
//! pause every partition, freeze the vsock switch, capture devices, vCPUs and the switch's
//! connection table, write memory and state, fsync and rename the set into place, then
//! resume. Restore: open and verify the set, check it against the device config, tear the
//! partitions down, restore the switch, build every partition from the set paused, and
//! resume them together.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use duplex_link::{HostReply, HostRequest};
use duplex_snapshot::{LoadMode, SetWriter, SnapshotSet};

use super::{lock, Monitor};
use crate::config::{DeviceConfig, Role};
use crate::job::{JobClient, JobError};
use crate::partition::snapshot::{PartitionState, STATE_VERSION};
use crate::partition::State;

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
    /// A snapshot is already being taken.
    #[error("a snapshot is already in progress")]
    Busy,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Compares what a set was taken from with the device config it is restored into.
pub fn check_config(
    dir: &Path,
    saved: &Value,
    config: &DeviceConfig,
) -> Result<(), SnapshotFailure> {
    let invalid = |reason: String| SnapshotFailure::Invalid {
        dir: dir.to_owned(),
        reason,
    };
    let saved: DeviceConfig = serde_json::from_value(saved.clone())
        .map_err(|e| invalid(format!("its device config cannot be read: {e}")))?;
    for p in &config.partitions {
        let Some(s) = saved.partitions.iter().find(|s| s.name == p.name) else {
            return Err(invalid(format!(
                "partition {} is missing from the set",
                p.name
            )));
        };
        if s.memory_mib != p.memory_mib {
            return Err(invalid(format!(
                "partition {}: memory_mib is {} in the config but {} in the set",
                p.name, p.memory_mib, s.memory_mib
            )));
        }
        if s.vcpus != p.vcpus {
            return Err(invalid(format!(
                "partition {}: vcpus is {} in the config but {} in the set",
                p.name, p.vcpus, s.vcpus
            )));
        }
        if s.vsock.as_ref().map(|v| v.cid) != p.vsock.as_ref().map(|v| v.cid) {
            return Err(invalid(format!(
                "partition {}: its vsock cid differs between the config and the set",
                p.name
            )));
        }
    }
    if let Some(extra) = saved
        .partitions
        .iter()
        .find(|s| config.partitions.iter().all(|p| p.name != s.name))
    {
        return Err(invalid(format!(
            "the set has partition {} that the config does not",
            extra.name
        )));
    }
    Ok(())
}

impl Monitor {
    /// Asks the controller to have the engine reach a safe point. Returns what the
    /// controller said, or `None` when the device has no running controller with a host
    /// bridge (a device the operator paused is snapshotted as it stands).
    fn quiesce(&self) -> Result<Option<Value>, SnapshotFailure> {
        let running = |name: &str| {
            self.partitions.iter().any(|p| {
                let p = lock(p);
                p.name() == name && p.state() == State::Running
            })
        };
        let uds = self
            .config
            .partitions
            .iter()
            .find_map(|p| match (p.role, &p.vsock) {
                (Role::Controller, Some(v)) if running(&p.name) => v.uds.clone(),
                _ => None,
            });
        let Some(uds) = uds else { return Ok(None) };
        let mut c =
            JobClient::connect(&uds).map_err(|e| SnapshotFailure::Quiesce(e.to_string()))?;
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

    /// Takes a coordinated snapshot of every partition into the set at `dest`. With
    /// `stop_after`, the partitions stay paused afterwards (a reboot follows).
    /// With `parent`, the set is incremental: only pages written since the parent (which
    /// must be the last set this device took or was restored from) are written.
    pub fn snapshot(
        &self,
        dest: &Path,
        parent: Option<&Path>,
        stop_after: bool,
    ) -> Result<Value, SnapshotFailure> {
        let _one = self
            .snapshot_lock
            .try_lock()
            .map_err(|_| SnapshotFailure::Busy)?;
        let t0 = Instant::now();
        for p in &self.partitions {
            let p = lock(p);
            if !matches!(p.state(), State::Running | State::Paused) {
                return Err(SnapshotFailure::NotRunning {
                    name: p.name().to_owned(),
                    state: p.state(),
                });
            }
        }
        let parent = match parent {
            None => None,
            Some(dir) => {
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
                                "not a parent for partition {}: an incremental set needs the \
                                 last set this device took or was restored from, with the \
                                 partition running since",
                                p.name()
                            ),
                        });
                    }
                }
                Some(set)
            }
        };
        let quiesced = self.quiesce()?;
        let t_quiesce = t0.elapsed();

        let t_down = Instant::now();
        let t = t_down;
        let mut paused = Vec::new();
        for p in &self.partitions {
            let mut p = lock(p);
            if p.state() == State::Running {
                if let Err(e) = p.pause() {
                    drop(p);
                    self.resume_names(&paused);
                    return Err(SnapshotFailure::Failed(e.to_string()));
                }
                paused.push(p.name().to_owned());
            }
        }
        let t_pause = t.elapsed();
        let result = self.capture_and_write(dest, parent.as_ref());
        let t = Instant::now();
        if result.is_err() || !stop_after {
            self.resume_names(&paused);
        }
        let t_resume = t.elapsed();
        let downtime = t_down.elapsed();
        let mut v = result?;
        v["quiesce"] = quiesced.unwrap_or(Value::Null);
        let timings = &mut v["timings_ms"];
        timings["quiesce"] = json!(ms(t_quiesce));
        timings["pause"] = json!(ms(t_pause));
        timings["resume"] = json!(ms(t_resume));
        timings["total"] = json!(ms(t0.elapsed()));
        v["downtime_ms"] = json!(ms(downtime));
        Ok(v)
    }

    fn resume_names(&self, names: &[String]) {
        for p in &self.partitions {
            let mut p = lock(p);
            if names.iter().any(|n| n == p.name()) {
                let _ = p.resume();
            }
        }
    }

    /// With every partition paused: capture, write, commit.
    fn capture_and_write(
        &self,
        dest: &Path,
        parent: Option<&SnapshotSet>,
    ) -> Result<Value, SnapshotFailure> {
        let fail = |e: &dyn std::fmt::Display| SnapshotFailure::Failed(e.to_string());
        let t = Instant::now();
        let freeze = self.vsock.as_ref().map(|s| s.freeze());
        let switch = self.vsock.as_ref().map(|s| s.save_state());
        let mut states = Vec::new();
        for p in &self.partitions {
            let p = lock(p);
            let state = p.capture(&self.kvm).map_err(|e| fail(&e))?;
            let bytes = serde_json::to_vec(&state).map_err(|e| fail(&e))?;
            states.push((p.name().to_owned(), bytes));
        }
        let t_capture = t.elapsed();

        let t = Instant::now();
        let mut writer = SetWriter::create(dest, parent).map_err(|e| fail(&e))?;
        let mut memory_bytes = 0;
        let mut pages = serde_json::Map::new();
        for (p, (name, bytes)) in self.partitions.iter().zip(&states) {
            let mut p = lock(p);
            // Always taken: it restarts the logs, so that the next set can be incremental.
            let dirty = p.take_dirty_pages().map_err(|e| fail(&e))?;
            let dirty_pages: u32 = dirty.iter().flatten().map(|w| w.count_ones()).sum();
            let mem = p.memory().ok_or_else(|| {
                SnapshotFailure::Failed(format!("partition {name} has no memory"))
            })?;
            let only = parent.is_some().then_some(dirty.as_slice());
            let stats = writer.write_memory(name, mem, only).map_err(|e| fail(&e))?;
            pages.insert(
                name.clone(),
                json!({ "written": stats.pages_written, "dirty": dirty_pages }),
            );
            memory_bytes += stats.bytes_written;
            writer.write_state(name, bytes).map_err(|e| fail(&e))?;
        }
        let t_write = t.elapsed();
        let set_id = writer.set_id().to_owned();
        let config = serde_json::to_value(&self.config).map_err(|e| fail(&e))?;
        let extra = json!({ "vsock": switch });
        let commit = writer.commit(config, extra).map_err(|e| {
            // The logs were restarted for a set that does not exist: no parent until the
            // next full set.
            for p in &self.partitions {
                lock(p).set_dirty_since(None);
            }
            fail(&e)
        })?;
        for p in &self.partitions {
            lock(p).set_dirty_since(Some(set_id.clone()));
        }
        drop(freeze);
        Ok(json!({
            "set": dest,
            "set_id": set_id,
            "parent": parent.map(|p| p.manifest.set_id.clone()),
            "partitions": states.len(),
            "memory_bytes_written": memory_bytes,
            "pages": pages,
            "bytes_written": commit.bytes_written,
            "timings_ms": {
                "capture": ms(t_capture),
                "write": ms(t_write),
                "fsync": ms(commit.fsync),
                "rename": ms(commit.rename),
            },
        }))
    }

    /// Tears every partition down and starts all of them from the set at `dir`, resumed
    /// together. `keep_host_sockets`: an in-process reboot keeps host vsock connections
    /// that are still open.
    pub fn restore_from(
        &self,
        dir: &Path,
        mode: LoadMode,
        keep_host_sockets: bool,
    ) -> Result<Value, SnapshotFailure> {
        let t0 = Instant::now();
        let invalid = |reason: String| SnapshotFailure::Invalid {
            dir: dir.to_owned(),
            reason,
        };
        let set = SnapshotSet::open(dir).map_err(|e| invalid(e.to_string()))?;
        // An in-process reboot verifies before tearing anything down. A new process has
        // nothing to lose: it verifies the memory files while it builds the partitions
        // (state files are checked as they are read) and resumes only if all is well.
        let (verified, verifier) = if keep_host_sockets {
            let v = set.verify().map_err(|e| invalid(e.to_string()))?;
            (Some(v), None)
        } else {
            let d = dir.to_owned();
            let spawned = std::thread::Builder::new()
                .name("verify".into())
                .spawn(move || SnapshotSet::open(&d).and_then(|s| s.verify()));
            match spawned {
                Ok(h) => (None, Some(h)),
                Err(_) => (
                    Some(set.verify().map_err(|e| invalid(e.to_string()))?),
                    None,
                ),
            }
        };
        check_config(dir, &set.manifest.device_config, &self.config)?;
        let mut states = Vec::new();
        for p in &self.config.partitions {
            let bytes = set
                .read_state(&p.name)
                .map_err(|e| invalid(e.to_string()))?;
            let state: PartitionState = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("partition {}: state file: {e}", p.name)))?;
            if state.version != STATE_VERSION {
                return Err(invalid(format!(
                    "partition {}: state version {} (this monitor reads {STATE_VERSION})",
                    p.name, state.version
                )));
            }
            states.push(state);
        }
        let switch_state = match (&self.vsock, set.manifest.extra.get("vsock")) {
            (Some(_), Some(v)) if !v.is_null() => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| invalid(format!("vsock switch state: {e}")))?,
            ),
            (Some(_), _) => return Err(invalid("the set has no vsock switch state".into())),
            (None, _) => None,
        };
        let t_open = t0.elapsed();

        let t = Instant::now();
        // Frozen from the teardown until every partition is attached again, so the host
        // bridge leaves host sockets alone in between (they are kept, not reset).
        let freeze = self.vsock.as_ref().map(|s| s.freeze());
        for p in &self.partitions {
            lock(p).teardown_quiet();
        }
        if let (Some(switch), Some(state)) = (&self.vsock, &switch_state) {
            switch
                .restore_state(state, keep_host_sockets)
                .map_err(|e| invalid(e.to_string()))?;
        }
        let ended = lock(&self.ended).clone();
        // Partitions are built in parallel: each is a VM of its own.
        let set = &set;
        let results: Vec<Result<(), SnapshotFailure>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .partitions
                .iter()
                .zip(&states)
                .map(|(p, state)| {
                    let ended = ended.clone();
                    scope.spawn(move || {
                        let mut p = lock(p);
                        let mem = set
                            .load_memory_with_bitmap::<vm_memory::bitmap::AtomicBitmap>(
                                p.name(),
                                mode,
                            )
                            .map_err(|e| SnapshotFailure::Invalid {
                                dir: dir.to_owned(),
                                reason: e.to_string(),
                            })?;
                        p.restore(&self.kvm, self.vsock.as_ref(), &ended, mem, state)
                            .map_err(|e| SnapshotFailure::Failed(e.to_string()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SnapshotFailure::Failed("a restore thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        for p in &self.partitions {
            let mut p = lock(p);
            // From here on writes are tracked: the next set may name this one as parent.
            p.take_dirty_pages()
                .map_err(|e| SnapshotFailure::Failed(e.to_string()))?;
            p.set_dirty_since(Some(set.manifest.set_id.clone()));
        }
        let t_restore = t.elapsed();
        let verified = match (verified, verifier) {
            (Some(v), _) => v,
            (None, Some(h)) => {
                let result = match h.join() {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("the verify thread panicked".to_owned()),
                };
                match result {
                    Ok(v) => v,
                    Err(reason) => {
                        for p in &self.partitions {
                            lock(p).teardown_quiet();
                        }
                        return Err(invalid(reason));
                    }
                }
            }
            (None, None) => return Err(invalid("not verified".into())),
        };
        let t = Instant::now();
        drop(freeze);
        for p in &self.partitions {
            let _ = lock(p).resume();
        }
        let t_resume = t.elapsed();
        *lock(&self.restored_from) = Some(json!({
            "set": dir,
            "set_id": set.manifest.set_id,
        }));
        Ok(json!({
            "set": dir,
            "set_id": set.manifest.set_id,
            "verified_bytes": verified.bytes_read,
            "timings_ms": {
                "open": ms(t_open),
                "verify": ms(verified.elapsed),
                "restore": ms(t_restore),
                "resume": ms(t_resume),
                "total": ms(t0.elapsed()),
            },
        }))
    }
}
