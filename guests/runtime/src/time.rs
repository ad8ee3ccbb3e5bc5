//! Time from the TSC, and sleeping in the monitor through `WAIT_UNTIL`.
//!
//! The TSC frequency comes from the system control page's `TSC_KHZ` register, read once
//! at start-up ([`init`]). `rdtsc` is allowed in ring 3 (CR4.TSD is clear).
//!
//! Guest time is the TSC less a *time bias* the monitor keeps: a restore from a snapshot
//! set may not be able to give the vCPU back the TSC it had at the cut (on some hosts the
//! TSC stays the host's), so the monitor adds the jump to the bias, in this partition's
//! memory (the variable registered at start-up, `TIME_BIAS_ADDR`), and time goes on from
//! where it was. `WAIT_UNTIL` deadlines are in guest time too (the monitor adds the bias).

use core::ops::{Add, Sub};
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use crate::sysctl;

/// Frequency assumed when the monitor reports 0 (never under a conforming monitor).
const FALLBACK_TSC_KHZ: u64 = 1_000_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Ticks subtracted from the TSC: written by the monitor when a restore moved the TSC.
static TIME_BIAS: AtomicU64 = AtomicU64::new(0);

/// Records the TSC frequency and registers the time bias with the monitor. Returns false
/// if `khz` was 0 and a fallback is used.
pub(crate) fn init(khz: u64) -> bool {
    let ok = khz != 0;
    TSC_KHZ.store(if ok { khz } else { FALLBACK_TSC_KHZ }, Ordering::Relaxed);
    TIME_BIAS.store(sysctl::time_bias(), Ordering::Relaxed);
    // Guest memory is identity mapped: the variable's address is its guest-physical one.
    sysctl::register_time_bias(core::ptr::addr_of!(TIME_BIAS) as u64);
    ok
}

/// The current time bias in TSC ticks (0 after a cold boot).
///
/// The monitor changes it only when it restores this partition from a snapshot set (it
/// adds the TSC's jump across the restore), so firmware that keeps state which does not
/// survive a restore — TCP connections to other machines, say — compares it on each turn
/// of its loop with the value it saw last: a change means "restored".
pub fn bias() -> u64 {
    TIME_BIAS.load(Ordering::Relaxed)
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// The guest's time in TSC ticks: the time-stamp counter less the time bias.
#[inline]
pub fn rdtsc() -> u64 {
    raw_tsc().wrapping_sub(TIME_BIAS.load(Ordering::Relaxed))
}

/// Reads the time-stamp counter itself.
#[inline]
pub fn raw_tsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the TSC into EDX:EAX; it touches no memory or stack.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let khz = tsc_khz().max(1);
    (u128::from(ticks) * 1_000_000 / u128::from(khz)).min(u128::from(u64::MAX)) as u64
}

/// Converts nanoseconds to TSC ticks (rounded up).
pub fn ns_to_ticks(ns: u64) -> u64 {
    let khz = u128::from(tsc_khz().max(1));
    (u128::from(ns) * khz)
        .div_ceil(1_000_000)
        .min(u128::from(u64::MAX)) as u64
}

/// Converts a duration to TSC ticks (rounded up, saturating).
pub fn duration_to_ticks(d: Duration) -> u64 {
    ns_to_ticks(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Nanoseconds since the TSC was reset (the partition's boot, or its last reset).
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc())
}

/// A point in time, as a TSC value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The current time.
    pub fn now() -> Self {
        Instant(rdtsc())
    }

    /// The instant at TSC value `tsc`.
    pub const fn from_tsc(tsc: u64) -> Self {
        Instant(tsc)
    }

    /// The TSC value of this instant.
    pub const fn tsc(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(ticks_to_ns(self.0.saturating_sub(earlier.0)))
    }

    /// Time since this instant.
    pub fn elapsed(self) -> Duration {
        Instant::now().duration_since(self)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(duration_to_ticks(d)))
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;

    fn sub(self, earlier: Instant) -> Duration {
        self.duration_since(earlier)
    }
}

/// Sleeps until `deadline`: the vCPU waits in the monitor, re-checking the TSC on each wake.
pub fn sleep_until(deadline: Instant) {
    while rdtsc() < deadline.0 {
        sysctl::wait_until(deadline.0);
    }
}

/// Sleeps for `d`.
pub fn sleep(d: Duration) {
    sleep_until(Instant::now() + d);
}

/// Sleeps for `ms` milliseconds.
pub fn sleep_ms(ms: u64) {
    sleep(Duration::from_millis(ms));
}
