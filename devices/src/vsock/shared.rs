//! The switch's lock ([`Shared`]: a panic under it resets instead of reusing a half-updated
//! table; interrupts are raised after it is released) and its place on a device event loop
//! ([`OnLoop`]). Depends on `switch` only.

use std::sync::{Arc, Mutex};

use super::switch::Inner;
use crate::event_loop::{EventLoop, SubscriptionKey};
use crate::virtio::Interrupt;

/// What the switch's mutex protects.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    pub fn new(inner: Inner) -> Self {
        Shared {
            inner: Mutex::new(inner),
        }
    }

    /// Runs `f` on the locked state, then raises the interrupts it asked for (outside the
    /// lock, so a partition's wake-up never runs under it).
    pub fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let (result, irqs) = {
            let mut inner = match self.inner.lock() {
                Ok(inner) => inner,
                Err(poisoned) => {
                    // An update panicked half-way: the table may be inconsistent, so it is
                    // not reused. Every connection is reset, as a device reset would.
                    let mut inner = poisoned.into_inner();
                    inner.reset_after_panic();
                    self.inner.clear_poison();
                    inner
                }
            };
            let result = f(&mut inner);
            (result, inner.take_notify())
        };
        for irq in dedup(irqs) {
            irq.trigger();
        }
        result
    }
}

/// The interrupts to raise, each once.
fn dedup(mut irqs: Vec<Arc<Interrupt>>) -> Vec<Arc<Interrupt>> {
    irqs.sort_by_key(|i| Arc::as_ptr(i) as usize);
    irqs.dedup_by(|a, b| Arc::ptr_eq(a, b));
    irqs
}

/// The switch's place on a device event loop: the bridge's subscriber is removed when the
/// last handle on the switch goes (and a loop the switch started for itself stops then).
pub(crate) struct OnLoop {
    event_loop: EventLoop,
    key: SubscriptionKey,
}

impl OnLoop {
    pub fn new(event_loop: EventLoop, key: SubscriptionKey) -> Self {
        OnLoop { event_loop, key }
    }
}

impl Drop for OnLoop {
    fn drop(&mut self) {
        self.event_loop.remove(self.key);
    }
}
