//! A partition's power-saving sleep (guest ABI `SLEEP`, `docs/guest-abi.md` "Sleep and
//! wake"): the vCPU side that parks a sleeping partition and arms its network card's
//! Wake-on-LAN watch, the one wake path shared by the magic packet and the operator, and
//! what `status` shows of it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use serde::Serialize;

use duplex_devices::net::WakeHook;
use duplex_devices::sysctl::{unix_ms, SleepState, WakeReason};

use super::shared::Shared;
use super::vcpu::Devices;
use crate::lock;

/// Wakes a sleeping partition: records the reason in its system control page (so the guest
/// reads it in `WAKE_REASON`), ends its card's watch, and lets its vCPUs run. False when it
/// was not asleep (nothing changes).
pub fn wake(devices: &Devices, shared: &Shared, reason: WakeReason) -> bool {
    {
        let mut sysctl = lock(&devices.sysctl);
        if !sysctl.wake(reason, unix_ms()) {
            return false;
        }
        devices.asleep.store(false, Ordering::Release);
    }
    if let Some(net) = &devices.net {
        net.stop_watch();
    }
    shared.rouse();
    true
}

/// Whether the partition sleeps (checked by its vCPUs before each entry into the guest: an
/// atomic load, not the control page's lock).
pub fn asleep(devices: &Devices) -> bool {
    devices.asleep.load(Ordering::Acquire)
}

/// Called by a vCPU thread of a sleeping partition: arms the card's watch for its magic
/// packet (again, after a pause or a restore: the watch is not part of a set) and waits,
/// with no timer, until the partition is woken or the monitor needs the vCPU.
pub fn park(devices: &Arc<Devices>, shared: &Arc<Shared>) {
    if let Some(net) = &devices.net {
        net.watch_for_magic(magic_hook(Arc::downgrade(devices), shared.clone()));
    }
    shared.power_sleep();
}

/// What the card calls on its magic packet. It holds the devices weakly: the card is one
/// of them.
fn magic_hook(devices: Weak<Devices>, shared: Arc<Shared>) -> WakeHook {
    Box::new(move || {
        if let Some(devices) = devices.upgrade() {
            if wake(&devices, &shared, WakeReason::MagicPacket) {
                log::info!("a partition was woken by its magic packet");
            }
        }
    })
}

/// What `status` shows of a partition's sleeps (absent if it never slept).
#[derive(Debug, Clone, Serialize)]
pub struct SleepStatus {
    /// Since when it sleeps (ms since the Unix epoch), while it does.
    pub sleeping_since_ms: Option<u64>,
    /// Why it last woke (`magic packet`, `operator`), and when.
    pub wake_reason: Option<String>,
    pub woken_ms: Option<u64>,
    /// How many times it slept, and was woken.
    pub sleeps: u64,
    pub wakes: u64,
}

impl SleepStatus {
    /// The status of a sleep record; `None` when the partition never slept.
    pub fn new(state: SleepState) -> Option<Self> {
        (state.sleeps > 0 || state.since_ms.is_some()).then(|| SleepStatus {
            sleeping_since_ms: state.since_ms,
            wake_reason: state.wake_reason.map(|r| r.to_string()),
            woken_ms: state.woken_ms,
            sleeps: state.sleeps,
            wakes: state.wakes,
        })
    }
}
