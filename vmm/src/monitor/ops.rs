//! One device-level operation at a time: snapshot, restore, reboot and the per-partition
//! lifecycle commands (pause, resume, start, stop) each hold the device's operation slot
//! while they run. A command that arrives meanwhile is answered `busy`, naming the running
//! operation and its phase; `status` shows them too.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lock;

/// A device-level operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Snapshot,
    Restore,
    Reboot,
    Pause,
    Resume,
    Start,
    Stop,
    /// A partition's run ended (crash, power-off, reboot request): reaping it, and
    /// cold-booting it again when its guest asked to reboot.
    PartitionEnded,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Snapshot => "snapshot",
            Operation::Restore => "restore",
            Operation::Reboot => "reboot",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::PartitionEnded => "partition_ended",
        }
    }
}

/// Where an operation is (documented in `docs/control-api.md`, "Operations").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Checking the request against the device.
    Checking,
    /// Opening and verifying a set, reading its states.
    Opening,
    /// Building the new partitions (VMs, memory, vCPU and device state), paused.
    Building,
    /// Copying memory while the partitions run (live snapshot, first pass).
    Copying,
    /// Asking the controller to have the engine reach a safe point.
    Quiescing,
    /// Partitions paused: the pages written since the copy, vCPU, VM and device state.
    Capturing,
    /// Old partitions paused, the switch and partitions exchanged for the new ones.
    Switching,
    /// Writing state files, checksums, fsync and rename.
    Committing,
    /// A lifecycle command at work.
    Working,
}

#[derive(Debug, Clone, Serialize)]
struct Running {
    operation: Operation,
    phase: Phase,
    #[serde(skip)]
    since: Instant,
}

/// The device's operation slot.
#[derive(Debug, Default)]
pub struct OpSlot {
    current: Mutex<Option<Running>>,
    freed: Condvar,
}

/// The operation that holds the slot, for a `busy` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Busy {
    pub operation: Operation,
    pub phase: Phase,
    pub running_ms: u64,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the device is busy: {} is running (phase {}, for {} ms); try again when it is done",
            self.operation.as_str(),
            serde_json::to_value(self.phase)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.running_ms
        )
    }
}

impl OpSlot {
    /// Takes the slot for `operation`, or says who has it.
    pub fn begin(&self, operation: Operation) -> Result<OpGuard<'_>, Busy> {
        let mut cur = lock(&self.current);
        if let Some(r) = cur.as_ref() {
            return Err(busy(r));
        }
        *cur = Some(Running {
            operation,
            phase: Phase::Checking,
            since: Instant::now(),
        });
        Ok(OpGuard { slot: self })
    }

    /// Takes the slot, waiting up to `timeout` for the running operation to end.
    pub fn begin_wait(&self, operation: Operation, timeout: Duration) -> Result<OpGuard<'_>, Busy> {
        let cur = lock(&self.current);
        let (mut cur, _) = self
            .freed
            .wait_timeout_while(cur, timeout, |c| c.is_some())
            .unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cur.as_ref() {
            return Err(busy(r));
        }
        *cur = Some(Running {
            operation,
            phase: Phase::Checking,
            since: Instant::now(),
        });
        Ok(OpGuard { slot: self })
    }

    /// The running operation, for `status`.
    pub fn current(&self) -> Option<Busy> {
        lock(&self.current).as_ref().map(busy)
    }
}

fn busy(r: &Running) -> Busy {
    Busy {
        operation: r.operation,
        phase: r.phase,
        running_ms: r.since.elapsed().as_millis() as u64,
    }
}

/// Holds the slot; frees it when dropped (also on an error or a panic).
#[derive(Debug)]
pub struct OpGuard<'a> {
    slot: &'a OpSlot,
}

impl OpGuard<'_> {
    /// Records the operation's phase.
    pub fn phase(&self, phase: Phase) {
        if let Some(r) = lock(&self.slot.current).as_mut() {
            r.phase = phase;
        }
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.slot.current) = None;
        self.slot.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_operation_is_told_who_runs_and_where() {
        let slot = OpSlot::default();
        let g = slot.begin(Operation::Snapshot).expect("free");
        g.phase(Phase::Copying);
        let b = slot.begin(Operation::Resume).expect_err("busy");
        assert_eq!(
            (b.operation, b.phase),
            (Operation::Snapshot, Phase::Copying)
        );
        assert!(
            b.to_string().contains("snapshot is running (phase copying"),
            "{b}"
        );
        assert_eq!(
            slot.current().map(|c| c.operation),
            Some(Operation::Snapshot)
        );
        drop(g);
        assert!(slot.current().is_none());
        assert!(slot.begin(Operation::Resume).is_ok());
    }

    #[test]
    fn begin_wait_gets_the_slot_once_freed() {
        let slot = std::sync::Arc::new(OpSlot::default());
        let s = slot.clone();
        let g = slot.begin(Operation::Reboot).expect("free");
        let t = std::thread::spawn(move || {
            s.begin_wait(Operation::PartitionEnded, Duration::from_secs(10))
                .map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(30));
        drop(g);
        assert!(t.join().expect("join").is_ok());
        let _g = slot.begin(Operation::Stop).expect("free");
        assert!(slot
            .begin_wait(Operation::Start, Duration::from_millis(20))
            .is_err());
    }
}
