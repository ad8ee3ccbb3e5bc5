//! The gate in front of guest-raised snapshots (guest ABI `SNAPSHOT_REQUEST`): only the
//! partitions the config allows (by default the controller) may raise one, one is taken
//! at a time, and a new one starts no sooner than `min_interval_ms` after the last one
//! ended. Every request is counted by outcome in `status` (`guest_snapshots`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::{lock, ops, Monitor};
use crate::config::DeviceConfig;
use crate::partition::vcpu::{Ended, LatchRef};

/// Why a guest's request was not honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The partition is not in `snapshot.guest_requests.from`.
    #[error("partition {0} may not raise snapshots (snapshot.guest_requests.from)")]
    NotAllowed(String),
    /// The config has no `snapshot.dir` to write the set to.
    #[error("the config has no snapshot.dir")]
    NoDestination,
    /// A guest-raised snapshot is being taken.
    #[error("a snapshot raised by {0} is being taken")]
    InFlight(String),
    /// The last one ended less than `min_interval_ms` ago.
    #[error("rate limited: the next one is allowed in {0} ms")]
    RateLimited(u64),
}

/// One partition's requests, by outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestCounts {
    /// Requests honoured (a snapshot was started).
    pub accepted: u64,
    /// Of those, sets saved.
    pub saved: u64,
    /// Of those, snapshots (or reboots from them) that failed.
    pub failed: u64,
    /// Refused: the partition may not raise snapshots.
    pub refused_not_allowed: u64,
    /// Refused: another guest-raised snapshot was being taken.
    pub refused_in_flight: u64,
    /// Refused: too soon after the last one.
    pub refused_rate_limited: u64,
    /// Refused: no `snapshot.dir`.
    pub refused_no_destination: u64,
    /// Writes made while a request of the partition was queued (never queued themselves).
    pub coalesced: u64,
    /// The last refusal's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<String>,
}

#[derive(Debug, Default)]
struct GateState {
    in_flight: Option<String>,
    last_end: Option<Instant>,
    counts: BTreeMap<String, RequestCounts>,
}

/// The gate: the config's rules and what happened.
#[derive(Debug)]
pub struct GuestSnapshotGate {
    allowed: Vec<String>,
    min_interval: Duration,
    dest: Option<PathBuf>,
    state: Mutex<GateState>,
}

/// Holds the one in-flight slot; dropping it ends the snapshot (for the rate limit).
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<GuestSnapshotGate>,
    name: String,
    /// Where the set goes.
    pub dest: PathBuf,
}

impl GuestSnapshotGate {
    /// The gate for `config`.
    pub fn new(config: &DeviceConfig) -> Self {
        let (allowed, min_interval, dest) = match &config.snapshot {
            Some(s) => (
                s.guest_requests.allowed(&config.partitions),
                Duration::from_millis(s.guest_requests.min_interval_ms),
                Some(s.dir.clone()),
            ),
            None => (Vec::new(), Duration::ZERO, None),
        };
        GuestSnapshotGate {
            allowed,
            min_interval,
            dest,
            state: Mutex::new(GateState::default()),
        }
    }

    /// Decides on a request of partition `name` (`coalesced` more writes were folded into
    /// it): a ticket to take the snapshot with, or why not. Counted either way.
    pub fn admit(self: &Arc<Self>, name: &str, coalesced: u64) -> Result<Ticket, Refusal> {
        let mut st = lock(&self.state);
        let verdict = self.decide(&st, name);
        let in_flight = st.in_flight.is_some();
        let c = st.counts.entry(name.to_owned()).or_default();
        c.coalesced += coalesced;
        match verdict {
            Ok(dest) => {
                c.accepted += 1;
                debug_assert!(!in_flight);
                st.in_flight = Some(name.to_owned());
                Ok(Ticket {
                    gate: self.clone(),
                    name: name.to_owned(),
                    dest,
                })
            }
            Err(refusal) => {
                match &refusal {
                    Refusal::NotAllowed(_) => c.refused_not_allowed += 1,
                    Refusal::NoDestination => c.refused_no_destination += 1,
                    Refusal::InFlight(_) => c.refused_in_flight += 1,
                    Refusal::RateLimited(_) => c.refused_rate_limited += 1,
                }
                c.last_refusal = Some(refusal.to_string());
                Err(refusal)
            }
        }
    }

    fn decide(&self, st: &GateState, name: &str) -> Result<PathBuf, Refusal> {
        if !self.allowed.iter().any(|a| a == name) {
            return Err(Refusal::NotAllowed(name.to_owned()));
        }
        let dest = self.dest.clone().ok_or(Refusal::NoDestination)?;
        if let Some(by) = &st.in_flight {
            return Err(Refusal::InFlight(by.clone()));
        }
        if let Some(end) = st.last_end {
            let since = end.elapsed();
            if since < self.min_interval {
                let wait = self.min_interval - since;
                return Err(Refusal::RateLimited(wait.as_millis().max(1) as u64));
            }
        }
        Ok(dest)
    }

    fn finish(&self, name: &str, ok: bool) {
        let mut st = lock(&self.state);
        st.in_flight = None;
        st.last_end = Some(Instant::now());
        let c = st.counts.entry(name.to_owned()).or_default();
        if ok {
            c.saved += 1;
        } else {
            c.failed += 1;
        }
    }

    /// `status`'s `guest_snapshots` object.
    pub fn status(&self) -> Value {
        let st = lock(&self.state);
        json!({
            "allowed": self.allowed,
            "min_interval_ms": self.min_interval.as_millis() as u64,
            "in_flight": st.in_flight,
            "partitions": st.counts,
        })
    }
}

impl Ticket {
    /// Ends the snapshot: `ok` if the set was saved (and any reboot from it done).
    fn done(self, ok: bool) {
        self.gate.finish(&self.name, ok);
        std::mem::forget(self);
    }
}

impl Drop for Ticket {
    /// A ticket dropped without [`Ticket::done`] (a panic on the snapshot thread) ends
    /// the snapshot as failed, so the gate never stays shut.
    fn drop(&mut self) {
        self.gate.finish(&self.name, false);
    }
}

impl Monitor {
    /// A guest asked for a coordinated snapshot: checked at the gate, then taken on a
    /// thread of its own (the controller must go on running to answer the quiesce); with
    /// `reboot`, the device then reboots from it.
    pub(super) fn on_snapshot_request(
        self: &Arc<Self>,
        run: &Ended,
        reboot: bool,
        latch: &LatchRef,
    ) {
        let coalesced = latch.0.release();
        let ticket = match self.guest_snapshots.admit(&run.name, coalesced) {
            Ok(t) => t,
            Err(refusal) => {
                log::warn!(
                    "snapshot request from partition {} refused: {refusal}",
                    run.name
                );
                return;
            }
        };
        log::info!(
            "partition {} asks for a snapshot (reboot: {reboot})",
            run.name
        );
        let me = Arc::downgrade(self);
        let name = run.name.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
                let Some(m) = me.upgrade() else { return };
                let dir = ticket.dest.clone();
                let ok = match m.snapshot(&dir, None) {
                    Ok(v) => {
                        log::info!("snapshot requested by {name} saved: {v}");
                        !reboot || {
                            let lazy = duplex_snapshot::LoadMode::Lazy;
                            match m.restore_from(&dir, lazy, ops::Operation::Reboot) {
                                Ok(v) => {
                                    log::info!("rebooted from {}: {v}", dir.display());
                                    true
                                }
                                Err(e) => {
                                    log::error!("reboot from {}: {e}", dir.display());
                                    false
                                }
                            }
                        }
                    }
                    Err(e) => {
                        log::error!("snapshot requested by {name} failed: {e}");
                        false
                    }
                };
                ticket.done(ok);
            });
        if let Err(e) = spawned {
            // The ticket went down with the closure: the gate is open again.
            log::error!("starting the snapshot thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(snapshot: Value) -> Arc<GuestSnapshotGate> {
        let cfg = json!({
            "partitions": [
                {"name": "engine", "role": "engine", "kernel": "k", "memory_mib": 8},
                {"name": "controller", "role": "controller", "kernel": "k", "memory_mib": 8},
            ],
            "snapshot": snapshot,
        });
        let cfg = DeviceConfig::parse(&cfg.to_string(), "t.json".as_ref()).expect("config");
        Arc::new(GuestSnapshotGate::new(&cfg))
    }

    #[test]
    fn only_the_controller_by_default() {
        let g = gate(json!({"dir": "/x"}));
        assert_eq!(
            g.admit("engine", 0).map(|_| ()),
            Err(Refusal::NotAllowed("engine".into()))
        );
        let t = g.admit("controller", 0).expect("the controller may");
        assert_eq!(t.dest, PathBuf::from("/x"));
        let s = g.status();
        assert_eq!(s["allowed"], json!(["controller"]));
        assert_eq!(s["partitions"]["engine"]["refused_not_allowed"], 1);
        assert_eq!(s["in_flight"], "controller");
    }

    #[test]
    fn the_config_names_who_may_and_empty_means_none() {
        let g = gate(json!({"dir": "/x", "guest_requests": {"from": ["engine"]}}));
        assert!(g.admit("engine", 0).is_ok());
        let g = gate(json!({"dir": "/x", "guest_requests": {"from": []}}));
        assert!(matches!(
            g.admit("controller", 0),
            Err(Refusal::NotAllowed(_))
        ));
    }

    #[test]
    fn one_at_a_time_then_rate_limited_then_open_again() {
        let g = gate(json!({"dir": "/x", "guest_requests": {"min_interval_ms": 200}}));
        let t = g.admit("controller", 3).expect("first");
        assert_eq!(
            g.admit("controller", 0).map(|_| ()),
            Err(Refusal::InFlight("controller".into()))
        );
        t.done(true);
        assert!(matches!(
            g.admit("controller", 0),
            Err(Refusal::RateLimited(ms)) if ms <= 200
        ));
        std::thread::sleep(Duration::from_millis(210));
        g.admit("controller", 0)
            .expect("after the interval")
            .done(false);
        let c = &g.status()["partitions"]["controller"];
        assert_eq!(c["accepted"], 2, "{c}");
        assert_eq!(c["saved"], 1, "{c}");
        assert_eq!(c["failed"], 1, "{c}");
        assert_eq!(c["refused_in_flight"], 1, "{c}");
        assert_eq!(c["refused_rate_limited"], 1, "{c}");
        assert_eq!(c["coalesced"], 3, "{c}");
        assert!(c["last_refusal"]
            .as_str()
            .unwrap_or("")
            .contains("rate limited"));
    }

    #[test]
    fn a_ticket_lost_to_a_panic_reopens_the_gate() {
        let g = gate(json!({"dir": "/x", "guest_requests": {"min_interval_ms": 0}}));
        let t = g.admit("controller", 0).expect("first");
        let r = std::thread::spawn(move || {
            let _t = t;
            panic!("the snapshot thread died");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(g.status()["partitions"]["controller"]["failed"], 1);
        assert!(g.admit("controller", 0).is_ok(), "{}", g.status());
    }

    #[test]
    fn without_a_destination_nothing_is_taken() {
        let g = gate(Value::Null);
        assert!(matches!(
            g.admit("controller", 0),
            Err(Refusal::NotAllowed(_))
        ));
        let g = gate(json!({"dir": "/x", "guest_requests": {"from": ["controller"]}}));
        assert!(g.admit("controller", 0).is_ok());
    }
}
