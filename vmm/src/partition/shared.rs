//! What a partition's vCPU threads and the monitor share: the run/pause/stop control,
//! how the partition ended, and VM-exit counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

/// What the monitor wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Run the guest.
    Run,
    /// Park at the next exit and wait.
    Pause,
    /// Leave the vCPU thread.
    Stop,
}

/// How a partition's run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The guest powered off with an exit status.
    PowerOff { status: u32 },
    /// The guest asked to be booted again.
    Reboot,
    /// The monitor stopped it.
    Stopped,
    /// The guest faulted, panicked, or KVM could not run it.
    Crashed(CrashInfo),
}

/// Why a partition crashed, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrashInfo {
    /// What happened, e.g. `guest fault: vector 14 (#PF) at rip 0x..., error 0x6`.
    pub reason: String,
    /// The faulting (or last) instruction pointer, when known.
    pub rip: Option<u64>,
    /// The exception vector, when the guest reported one.
    pub vector: Option<u64>,
    /// The last console lines before the crash.
    pub console_tail: Vec<String>,
}

/// Control block shared by the vCPU threads of one run of a partition.
#[derive(Debug)]
pub struct Control {
    /// What the monitor wants.
    pub want: Want,
    /// vCPU threads currently parked for a pause.
    pub parked: usize,
    /// vCPU threads still alive.
    pub live: usize,
    /// How the run ended, once it has.
    pub outcome: Option<Outcome>,
    /// A device has something for the guest: the next (or current) guest sleep ends
    /// at once. Like a pending interrupt, it is kept until a sleep consumes it.
    pub wake: bool,
    /// The partition was woken from its power-saving sleep (guest ABI `SLEEP`): a vCPU
    /// waiting in [`Shared::power_sleep`] goes back to check.
    pub roused: bool,
}

/// VM-exit counters of one run.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Every return from KVM_RUN.
    pub total: AtomicU64,
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Shutdown (triple fault) exits.
    pub shutdown: AtomicU64,
    /// Interrupted runs (kicks).
    pub intr: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

/// A snapshot of [`ExitCounters`] for `status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ExitCounts {
    pub total: u64,
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub shutdown: u64,
    pub intr: u64,
    pub other: u64,
}

impl ExitCounters {
    /// Adds one to `counter` and to the total.
    pub fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Current values.
    pub fn read(&self) -> ExitCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitCounts {
            total: r(&self.total),
            io: r(&self.io),
            mmio: r(&self.mmio),
            hlt: r(&self.hlt),
            shutdown: r(&self.shutdown),
            intr: r(&self.intr),
            other: r(&self.other),
        }
    }
}

/// The shared part of a running partition.
#[derive(Debug)]
pub struct Shared {
    ctl: Mutex<Control>,
    cv: Condvar,
    /// VM-exit counters.
    pub exits: ExitCounters,
}

impl Shared {
    /// A control block for `vcpus` threads about to start running.
    pub fn new(vcpus: usize) -> Self {
        Shared {
            ctl: Mutex::new(Control {
                want: Want::Run,
                parked: 0,
                live: vcpus,
                outcome: None,
                wake: false,
                roused: false,
            }),
            cv: Condvar::new(),
            exits: ExitCounters::default(),
        }
    }

    /// A control block whose vCPU threads park as soon as they start (a restore: every
    /// partition is resumed together once all are built).
    pub fn new_paused(vcpus: usize) -> Self {
        let s = Shared::new(vcpus);
        s.lock().want = Want::Pause;
        s
    }

    /// Locks the control block (it is plain data, so a poisoned lock is recovered).
    pub fn lock(&self) -> MutexGuard<'_, Control> {
        crate::lock(&self.ctl)
    }

    /// Sets what the monitor wants and wakes every waiting vCPU thread.
    pub fn set_want(&self, want: Want) {
        let mut c = self.lock();
        if c.want != Want::Stop {
            c.want = want;
        }
        drop(c);
        self.cv.notify_all();
    }

    /// Called by a vCPU thread before each KVM_RUN: parks while paused; false means leave.
    pub fn wait_runnable(&self) -> bool {
        self.wait_runnable_then(|| {})
    }

    /// Like [`Shared::wait_runnable`], calling `before_park` (without the lock held) each
    /// time the thread is about to park, e.g. to complete a pending I/O exit so that the
    /// parked vCPU's state can be saved.
    pub fn wait_runnable_then(&self, mut before_park: impl FnMut()) -> bool {
        let mut c = self.lock();
        loop {
            match c.want {
                Want::Run => return true,
                Want::Stop => return false,
                Want::Pause => {
                    drop(c);
                    before_park();
                    c = self.lock();
                    if c.want != Want::Pause {
                        continue;
                    }
                    c.parked += 1;
                    self.cv.notify_all();
                    while c.want == Want::Pause {
                        c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    c.parked -= 1;
                }
            }
        }
    }

    /// Sleeps up to `d` on behalf of the guest; wakes early when the monitor wants
    /// anything but running, or a device wakes the guest ([`Shared::wake_guest`]).
    pub fn guest_sleep(&self, d: Duration) {
        let c = self.lock();
        let (mut c, _) = self
            .cv
            .wait_timeout_while(c, d, |c| c.want == Want::Run && !c.wake)
            .unwrap_or_else(|p| p.into_inner());
        c.wake = false;
    }

    /// Waits, with no timer, while the partition sleeps for power saving: until
    /// [`Shared::rouse`] or the monitor wants anything but running. The caller checks the
    /// sleep again afterwards.
    pub fn power_sleep(&self) {
        let c = self.lock();
        let mut c = self
            .cv
            .wait_while(c, |c| c.want == Want::Run && !c.roused)
            .unwrap_or_else(|p| p.into_inner());
        c.roused = false;
    }

    /// Ends a [`Shared::power_sleep`] (the partition was woken).
    pub fn rouse(&self) {
        self.lock().roused = true;
        self.cv.notify_all();
    }

    /// Ends the guest's current or next sleep: a device has something for it.
    pub fn wake_guest(&self) {
        let mut c = self.lock();
        if !c.wake {
            c.wake = true;
            drop(c);
            self.cv.notify_all();
        }
    }

    /// Records how the run ended (the first outcome wins) and tells every vCPU to stop.
    pub fn finish(&self, outcome: Outcome) {
        let mut c = self.lock();
        if c.outcome.is_none() {
            c.outcome = Some(outcome);
        }
        c.want = Want::Stop;
        drop(c);
        self.cv.notify_all();
    }

    /// Called by a vCPU thread as it leaves.
    pub fn thread_left(&self) {
        let mut c = self.lock();
        c.live = c.live.saturating_sub(1);
        drop(c);
        self.cv.notify_all();
    }

    /// Waits until every live vCPU thread is parked, up to `timeout`, calling `kick`
    /// every millisecond to bring threads out of KVM_RUN. True when all are parked.
    pub fn wait_parked(&self, timeout: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut c = self.lock();
        loop {
            if c.parked >= c.live || c.want != Want::Pause {
                return c.parked >= c.live;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            drop(c);
            kick();
            c = self.lock();
            let step = Duration::from_millis(1).min(deadline - now);
            c = self
                .cv
                .wait_timeout(c, step)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_parks_and_resume_releases() {
        let shared = Arc::new(Shared::new(1));
        shared.set_want(Want::Pause);
        let s = shared.clone();
        let t = std::thread::spawn(move || s.wait_runnable());
        assert!(shared.wait_parked(Duration::from_secs(5), || {}));
        assert_eq!(shared.lock().parked, 1);
        shared.set_want(Want::Run);
        assert!(t.join().expect("join"));
        assert_eq!(shared.lock().parked, 0);
    }

    #[test]
    fn finish_keeps_first_outcome_and_stops() {
        let shared = Shared::new(1);
        shared.finish(Outcome::PowerOff { status: 3 });
        shared.finish(Outcome::Stopped);
        assert_eq!(shared.lock().outcome, Some(Outcome::PowerOff { status: 3 }));
        assert!(!shared.wait_runnable());
        // A stopped partition cannot be set running again.
        shared.set_want(Want::Run);
        assert_eq!(shared.lock().want, Want::Stop);
    }

    #[test]
    fn a_wake_before_the_sleep_is_not_lost() {
        let shared = Shared::new(1);
        shared.wake_guest();
        let start = std::time::Instant::now();
        shared.guest_sleep(Duration::from_secs(30));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!shared.lock().wake, "the sleep consumed the wake");
    }

    /// How long a 30 s guest sleep lasts when `wake` is called 20 ms into it.
    fn sleep_woken_by(wake: impl FnOnce(&Shared)) -> Duration {
        let shared = Arc::new(Shared::new(1));
        let s = shared.clone();
        let t = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            s.guest_sleep(Duration::from_secs(30));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        wake(&shared);
        t.join().expect("join")
    }

    #[test]
    fn guest_sleep_wakes_on_device_wake() {
        let slept = sleep_woken_by(Shared::wake_guest);
        assert!(slept < Duration::from_secs(10), "slept {slept:?}");
    }

    #[test]
    fn a_power_sleep_ends_on_rouse_or_pause_but_not_on_a_device_wake() {
        for (end, expect_roused) in [(Want::Run, true), (Want::Pause, false)] {
            let shared = Arc::new(Shared::new(1));
            let s = shared.clone();
            let t = std::thread::spawn(move || s.power_sleep());
            shared.wake_guest();
            std::thread::sleep(Duration::from_millis(50));
            assert!(!t.is_finished(), "a device wake does not end a power sleep");
            if expect_roused {
                shared.rouse();
            } else {
                shared.set_want(end);
            }
            t.join().expect("join");
        }
    }

    #[test]
    fn guest_sleep_wakes_on_pause() {
        let slept = sleep_woken_by(|s| s.set_want(Want::Pause));
        assert!(slept < Duration::from_secs(10), "slept {slept:?}");
    }
}
