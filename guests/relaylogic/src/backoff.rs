//! The reconnect delay (`docs/tunnel-protocol.md`, control session rules): attempt *n*
//! (from 0, reset by a `Welcome`) waits `min(cap, base · 2^n)` scaled by a uniform random
//! factor in [0.5, 1.0) — "equal jitter".

/// Default `backoff_base_ms=`.
pub const DEFAULT_BASE_MS: u64 = 250;
/// Default `backoff_max_ms=`.
pub const DEFAULT_CAP_MS: u64 = 30_000;

/// Capped exponential backoff with equal jitter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at attempt 0. `base_ms` is at least 1 and `cap_ms` at least
    /// `base_ms` (the configuration checks both; they are clamped here too).
    pub fn new(base_ms: u64, cap_ms: u64) -> Self {
        let base_ms = base_ms.max(1);
        Backoff {
            base_ms,
            cap_ms: cap_ms.max(base_ms),
            attempt: 0,
        }
    }

    /// The attempt the next delay is for (0 after [`Backoff::reset`]).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The cap.
    pub fn cap_ms(&self) -> u64 {
        self.cap_ms
    }

    /// `min(cap, base · 2^n)` for the current attempt `n`: the delay before jitter.
    pub fn ceiling_ms(&self) -> u64 {
        let factor = 1u64.checked_shl(self.attempt).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.cap_ms)
    }

    /// The delay before the next attempt, jittered by `random` (any value, uniformly
    /// distributed), and counts the attempt.
    pub fn next_delay_ms(&mut self, random: u64) -> u64 {
        let ceiling = self.ceiling_ms();
        self.attempt = self.attempt.saturating_add(1);
        equal_jitter(ceiling, random)
    }

    /// The delay after an eviction: the full cap, no jitter. Counts the attempt.
    pub fn evicted_delay_ms(&mut self) -> u64 {
        self.attempt = self.attempt.saturating_add(1);
        self.cap_ms
    }

    /// Back to attempt 0 (a `Welcome`, or a fresh start after a restore).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `delay` scaled by a factor in [0.5, 1.0) drawn from `random`: a value in
/// `[delay / 2, delay)` (`delay` itself when it is below 2).
pub fn equal_jitter(delay: u64, random: u64) -> u64 {
    if delay < 2 {
        return delay;
    }
    let half = delay / 2;
    let span = delay - half;
    half + random % span
}
