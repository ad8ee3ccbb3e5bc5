//! Fault injection for tests (cargo feature `fault-injection`; without it every check
//! passes and costs nothing). With the feature, `DUPLEX_FAULTS` in the monitor's
//! environment arms failures at named steps of snapshot, restore and reboot:
//! `DUPLEX_FAULTS=step[@n][,step[@n]...]` makes the `n`-th time (default: every time) the
//! monitor reaches `step` fail with "injected fault at <step>"; `step~ms` instead holds the
//! operation there for `ms` milliseconds (to test what happens meanwhile). The steps are
//! listed in [`STEPS`] and in `docs/control-api.md` ("Fault injection").
//!
//! One step is not an operation's: `vcpu.forbidden-syscall` makes every vCPU thread call
//! `getppid` (which no vCPU filter allows) at its VM exits ([`at_vcpu_exit`]): with
//! seccomp on, the monitor dies of it (`tests/sandbox.rs`).

/// Every step a fault can be injected at.
pub const STEPS: &[&str] = &[
    "snapshot.create",
    "snapshot.copy",
    "pause",
    "snapshot.capture",
    "snapshot.commit",
    "restore.build",
    "restore.switch",
    VCPU_FORBIDDEN_SYSCALL,
];

/// The step that makes vCPU threads call a forbidden system call ([`at_vcpu_exit`]).
pub const VCPU_FORBIDDEN_SYSCALL: &str = "vcpu.forbidden-syscall";

/// Called by a vCPU thread at each VM exit: with `DUPLEX_FAULTS` naming
/// [`VCPU_FORBIDDEN_SYSCALL`] (feature `fault-injection`), makes a system call the vCPU
/// filter forbids; otherwise nothing.
#[inline]
pub fn at_vcpu_exit() {
    #[cfg(feature = "fault-injection")]
    {
        static ARMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let armed = ARMED.get_or_init(|| {
            std::env::var("DUPLEX_FAULTS")
                .unwrap_or_default()
                .split(',')
                .any(|s| s.trim() == VCPU_FORBIDDEN_SYSCALL)
        });
        if *armed {
            // SAFETY: getppid takes no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
    }
}

/// A failure injected at a step.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct Injected(pub &'static str);

/// One armed fault: at `step`, the `nth` time (or every time), fail or hold `hold_ms`.
#[cfg(feature = "fault-injection")]
#[derive(Debug)]
struct Armed {
    step: String,
    nth: Option<u32>,
    hold_ms: Option<u64>,
    seen: u32,
}

/// The armed faults.
#[derive(Debug, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    armed: std::sync::Mutex<Vec<Armed>>,
}

impl Faults {
    /// The faults armed by `DUPLEX_FAULTS` (none without the feature).
    pub fn from_env() -> Faults {
        #[cfg(feature = "fault-injection")]
        {
            let spec = std::env::var("DUPLEX_FAULTS").unwrap_or_default();
            let mut armed = Vec::new();
            for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (rest, hold_ms) = match item.split_once('~') {
                    Some((s, ms)) => match ms.parse::<u64>() {
                        Ok(ms) => (s, Some(ms)),
                        Err(_) => {
                            log::warn!(
                                "DUPLEX_FAULTS: {item:?}: ~{ms} is not milliseconds; ignored"
                            );
                            continue;
                        }
                    },
                    None => (item, None),
                };
                let (step, nth) = match rest.split_once('@') {
                    Some((s, n)) => match n.parse::<u32>() {
                        Ok(n) => (s, Some(n)),
                        Err(_) => {
                            log::warn!("DUPLEX_FAULTS: {item:?}: @{n} is not a count; ignored");
                            continue;
                        }
                    },
                    None => (rest, None),
                };
                if !STEPS.contains(&step) {
                    log::warn!("DUPLEX_FAULTS: unknown step {step:?} (known: {STEPS:?})");
                }
                log::warn!("fault injection armed at {step} (nth {nth:?}, hold {hold_ms:?})");
                armed.push(Armed {
                    step: step.to_owned(),
                    nth,
                    hold_ms,
                    seen: 0,
                });
            }
            Faults {
                armed: std::sync::Mutex::new(armed),
            }
        }
        #[cfg(not(feature = "fault-injection"))]
        Faults::default()
    }

    /// Fails if a fault is armed at `step` for this time.
    #[inline]
    pub fn check(&self, step: &'static str) -> Result<(), Injected> {
        #[cfg(feature = "fault-injection")]
        {
            let mut hold = None;
            {
                let mut armed = crate::lock(&self.armed);
                for a in armed.iter_mut().filter(|a| a.step == step) {
                    a.seen += 1;
                    if a.nth.is_none_or(|n| n == a.seen) {
                        match a.hold_ms {
                            Some(ms) => hold = Some(ms),
                            None => {
                                log::warn!("injecting a fault at {step}");
                                return Err(Injected(step));
                            }
                        }
                    }
                }
            }
            if let Some(ms) = hold {
                log::warn!("holding {ms} ms at {step}");
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        let _ = step;
        Ok(())
    }
}
