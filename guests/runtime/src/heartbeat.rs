//! The banner-and-heartbeat loop shared by the placeholder firmware (engine, controller,
//! faulty).
//!
//! Each beat sleeps until *now + period* and then prints `<role> heartbeat N`; the counter
//! lives in memory, so after a pause (the vCPU not running) the beats carry on from where
//! they were, one per period, without a burst to catch up.

use core::time::Duration;

use crate::time::{sleep_until, Instant};
use crate::{println, BootInfo};

/// Default heartbeat period.
pub const DEFAULT_PERIOD_MS: u64 = 1000;

/// A numbered heartbeat printer.
#[derive(Debug)]
pub struct Heartbeat {
    role: &'static str,
    period: Duration,
    count: u64,
}

impl Heartbeat {
    /// A heartbeat printing `<role> heartbeat N` every `period_ms` (at least 1 ms).
    pub fn new(role: &'static str, period_ms: u64) -> Self {
        Heartbeat {
            role,
            period: Duration::from_millis(period_ms.max(1)),
            count: 0,
        }
    }

    /// Sleeps one period from now, then prints the next heartbeat.
    pub fn beat(&mut self) {
        sleep_until(Instant::now() + self.period);
        self.count += 1;
        println!("{} heartbeat {}", self.role, self.count);
    }

    /// Heartbeats printed so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The period from the command line's `heartbeat_ms=N`, else `default_ms`.
pub fn period_ms(boot: &BootInfo, default_ms: u64) -> u64 {
    match boot.arg("heartbeat_ms") {
        None => default_ms,
        Some(v) => crate::bootinfo::parse_u64(v).unwrap_or_else(|| {
            println!("warning: bad heartbeat_ms={v:?}, using {default_ms}");
            default_ms
        }),
    }
}

/// Prints `duplex <role>: role=<role> cmdline="<cmdline>"`, then heartbeats forever.
pub fn run(boot: &BootInfo, role: &'static str) -> ! {
    println!("duplex {role}: role={role} cmdline=\"{}\"", boot.cmdline);
    let mut heartbeat = Heartbeat::new(role, period_ms(boot, DEFAULT_PERIOD_MS));
    loop {
        heartbeat.beat();
    }
}
