//! Restore and reboot, prepare then commit: the set is opened, checked against the config
//! and verified while every partition is built from it, paused, beside the running device
//! (on VMs made ahead when there are: `partition::shell`). Only then are the old partitions
//! put to sleep and the switch and partitions exchanged in one step; the new ones run at
//! once and the old ones are torn down on a thread of their own. On any failure before the
//! exchange the old device wakes where it was.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use duplex_snapshot::{LoadMode, SnapshotSet};

use super::ops::{OpGuard, Operation, Phase};
use super::snapshot::{ms, SnapshotFailure, VSOCK_STATE};
use super::{lock, Monitor};
use crate::config::DeviceConfig;
use crate::partition::snapshot::{PartitionState, STATE_VERSION};

mod checks;
use crate::partition::{self, PreparedRun};
pub use checks::{check_cids, check_config, check_layout, confine};
use duplex_devices::vsock::SwitchState;

impl Monitor {
    /// Starts every partition from the set at `dir` (see the module docs): `kind` is
    /// `Restore` in a new process, or `Reboot` in place, where host vsock connections idle
    /// since the cut keep their sockets.
    pub fn restore_from(
        &self,
        dir: &Path,
        mode: LoadMode,
        kind: Operation,
    ) -> Result<Value, SnapshotFailure> {
        let root = self
            .config
            .snapshot
            .as_ref()
            .and_then(|s| s.root.as_deref());
        confine(dir, root)?;
        let op = self.ops.begin(kind).map_err(SnapshotFailure::Busy)?;
        let restored = self.restore_in(&op, dir, mode, kind == Operation::Reboot);
        // Whether it worked or not, the next restore finds VMs made for it.
        self.make_shells();
        restored
    }

    fn restore_in(
        &self,
        op: &OpGuard<'_>,
        dir: &Path,
        mode: LoadMode,
        keep_host_sockets: bool,
    ) -> Result<Value, SnapshotFailure> {
        let t0 = Instant::now();
        let invalid = |reason: String| SnapshotFailure::Invalid {
            dir: dir.to_owned(),
            reason,
        };
        op.phase(Phase::Opening);
        let set = SnapshotSet::open(dir).map_err(|e| invalid(e.to_string()))?;
        check_config(dir, &set.manifest.device_config, &self.config)?;
        check_layout(dir, &set.manifest, &self.config)?;
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
        let switch_state: Option<SwitchState> = match &self.vsock {
            None => None,
            Some(_) => {
                let bytes = set
                    .read_device_state(VSOCK_STATE)
                    .map_err(|e| invalid(e.to_string()))?
                    .ok_or_else(|| invalid("the set has no vsock switch state".into()))?;
                let state: SwitchState = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("vsock switch state: {e}")))?;
                check_cids(dir, &state, &self.config)?;
                Some(state)
            }
        };
        let t_open = t0.elapsed();

        // Prepare: verify and build beside the running device.
        op.phase(Phase::Building);
        let t = Instant::now();
        let set_id = set.manifest.set_id.clone();
        let made_ahead = std::sync::atomic::AtomicUsize::new(0);
        let (verified, built) = std::thread::scope(|scope| {
            let verifier = scope.spawn(|| {
                crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
                let t = Instant::now();
                set.verify()
                    .map(|v| (v.bytes_read, t.elapsed()))
                    .map_err(|e| e.to_string())
            });
            let built = self.build_all(&set, &states, mode, &made_ahead);
            let verified = verifier
                .join()
                .unwrap_or_else(|_| Err("the verify thread panicked".to_owned()));
            (verified, built)
        });
        let (prepared, verified_bytes, t_verify) = match (verified, built) {
            (Ok((bytes, t)), Ok(p)) => (p, bytes, t),
            // Runs built for a set that fails verification end as they are dropped.
            (Err(e), _) => return Err(invalid(e)),
            (Ok(_), Err(e)) => return Err(e),
        };
        if let Err(e) = self.faults.check("restore.build") {
            drop(prepared);
            return Err(SnapshotFailure::RestoreFailed {
                step: "build",
                reason: e.to_string(),
            });
        }
        let t_build = t.elapsed();

        // Commit: pause the old device, exchange, resume the new one.
        op.phase(Phase::Switching);
        let t_switch = Instant::now();
        let asleep = match self.sleep_all() {
            Ok(a) => a,
            Err(reason) => {
                drop(prepared);
                return Err(SnapshotFailure::RestoreFailed {
                    step: "pause",
                    reason,
                });
            }
        };
        let switched = self
            .faults
            .check("restore.switch")
            .map_err(|e| e.to_string())
            .and_then(|()| match (&self.vsock, &switch_state) {
                (Some(sw), Some(state)) => {
                    let devices: Vec<_> = prepared
                        .iter()
                        .filter_map(PreparedRun::vsock_device)
                        .collect();
                    sw.replace(state, &devices, keep_host_sockets)
                        .map_err(|e| e.to_string())
                }
                _ => Ok(()),
            });
        if let Err(reason) = switched {
            drop(asleep);
            drop(prepared);
            return Err(SnapshotFailure::RestoreFailed {
                step: "switch",
                reason,
            });
        }
        // Nothing below fails.
        let mut old = Vec::new();
        for (p, run) in self.partitions.iter().zip(prepared) {
            let mut p = lock(p);
            old.extend(p.install(run));
            p.release();
        }
        // Wakes the switch; the partitions' new runs were never asleep.
        drop(asleep);
        let t_switch = t_switch.elapsed();
        partition::discard_in_background(old);
        *lock(&self.restored_from) = Some(json!({ "set": dir, "set_id": set_id }));
        Ok(json!({
            "set": dir,
            "set_id": set_id,
            "downtime_ms": ms(t_switch),
            "verified_bytes": verified_bytes,
            "vms_made_ahead": made_ahead.into_inner(),
            "timings_ms": {
                "open": ms(t_open),
                "verify": ms(t_verify),
                "build": ms(t_build),
                "switch": ms(t_switch),
                "total": ms(t0.elapsed()),
            },
        }))
    }

    /// Builds every partition from `set`, in parallel (each is a VM of its own), paused.
    fn build_all(
        &self,
        set: &SnapshotSet,
        states: &[PartitionState],
        mode: LoadMode,
        made_ahead: &std::sync::atomic::AtomicUsize,
    ) -> Result<Vec<PreparedRun>, SnapshotFailure> {
        let with = &partition::RestoreWith {
            kvm: self.kvm.clone(),
            switch: self.vsock.clone(),
            ended: lock(&self.ended).clone(),
            set_id: set.manifest.set_id.clone(),
        };
        let made_ahead = &made_ahead;
        let results: Vec<Result<PreparedRun, SnapshotFailure>> = std::thread::scope(|scope| {
            let handles: Vec<_> =
                self.partitions
                    .iter()
                    .zip(states)
                    .map(|(p, state)| {
                        scope.spawn(move || {
                            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
                            let (name, builder) = {
                                let p = lock(p);
                                (p.name().to_owned(), p.builder())
                            };
                            let shell = self.take_shell(&name);
                            if shell.is_some() {
                                made_ahead.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            let invalid =
                                |e: duplex_snapshot::SnapshotError| SnapshotFailure::Invalid {
                                    dir: set.dir.clone(),
                                    reason: e.to_string(),
                                };
                            let mem = match &shell {
                                // SAFETY: the reservation is the shell's alone; the shell goes
                                // into the run with the memory, and the run drops the
                                // reservation last. On an error both are dropped here together.
                                Some(sh) => unsafe {
                                    set.load_memory_into::<vm_memory::bitmap::AtomicBitmap>(
                                        &name,
                                        mode,
                                        &sh.reservation.addresses(),
                                    )
                                },
                                None => set
                                    .load_memory_with_bitmap::<vm_memory::bitmap::AtomicBitmap>(
                                        &name, mode,
                                    ),
                            }
                            .map_err(invalid)?;
                            // Guarded until the run guards it itself (`Run::restore`): a memory
                            // file truncated meanwhile reads as zeros instead of raising SIGBUS.
                            let guard = duplex_snapshot::MemoryGuard::for_memory(&mem, None)
                                .map_err(|e| SnapshotFailure::RestoreFailed {
                                    step: "build",
                                    reason: e.to_string(),
                                })?;
                            let disk = match &builder_config_disk(&self.config, &name) {
                                Some(d) => Some(
                                    partition::disk::RestoredDisk::write(&name, d, set).map_err(
                                        |e| SnapshotFailure::RestoreFailed {
                                            step: "build",
                                            reason: e.to_string(),
                                        },
                                    )?,
                                ),
                                None => None,
                            };
                            let prepared = builder
                                .prepare_restore(with, mem, state, shell, disk)
                                .map_err(|e| SnapshotFailure::RestoreFailed {
                                    step: "build",
                                    reason: e.to_string(),
                                });
                            drop(guard);
                            prepared
                        })
                    })
                    .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SnapshotFailure::RestoreFailed {
                            step: "build",
                            reason: "a build thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        // On an error the runs built so far are dropped, which ends them.
        results.into_iter().collect()
    }
}

/// The disk of partition `name` in `config`, if it has one.
fn builder_config_disk(config: &DeviceConfig, name: &str) -> Option<crate::config::DiskConfig> {
    config.partition(name).and_then(|p| p.disk.clone())
}
