//! Fault injection for tests (cargo feature `fault-injection`; without it every check
//! passes and costs nothing). With the feature, `DUPLEX_FAULTS` in the monitor's
//! environment arms failures at named steps of snapshot, restore and reboot:
//! `DUPLEX_FAULTS=step[@n][,step[@n]...]` makes the `n`-th time (default: every time) the
//! monitor reaches `step` fail with "injected fault at <step>". The steps are listed in
//! [`STEPS`] and in `docs/control-api.md` ("Fault injection").

/// Every step a fault can be injected at.
pub const STEPS: &[&str] = &[
    "snapshot.create",
    "snapshot.copy",
    "pause",
    "snapshot.capture",
    "snapshot.commit",
    "restore.build",
    "restore.switch",
];

/// A failure injected at a step.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct Injected(pub &'static str);

/// The armed faults.
#[derive(Debug, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    armed: std::sync::Mutex<Vec<(String, Option<u32>, u32)>>,
}

impl Faults {
    /// The faults armed by `DUPLEX_FAULTS` (none without the feature).
    pub fn from_env() -> Faults {
        #[cfg(feature = "fault-injection")]
        {
            let spec = std::env::var("DUPLEX_FAULTS").unwrap_or_default();
            let mut armed = Vec::new();
            for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (step, nth) = match item.split_once('@') {
                    Some((s, n)) => (s, n.parse::<u32>().ok()),
                    None => (item, None),
                };
                if !STEPS.contains(&step) {
                    log::warn!("DUPLEX_FAULTS: unknown step {step:?} (known: {STEPS:?})");
                }
                log::warn!("fault injection armed at {step} ({nth:?})");
                armed.push((step.to_owned(), nth, 0));
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
            let mut armed = crate::lock(&self.armed);
            for (s, nth, seen) in armed.iter_mut() {
                if s == step {
                    *seen += 1;
                    if nth.is_none_or(|n| n == *seen) {
                        log::warn!("injecting a fault at {step}");
                        return Err(Injected(step));
                    }
                }
            }
        }
        let _ = step;
        Ok(())
    }
}
