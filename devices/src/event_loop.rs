//! The monitor's device event loop: one thread running rust-vmm's `event-manager`, on which
//! the devices wait for their host-side file descriptors (`docs/architecture.md`).
//!
//! Subscribers are [`MutEventSubscriber`]s: they register their fds in `init` and change
//! them in `process` through the [`EventOps`](event_manager::EventOps) they are given.
//! Other threads add and remove subscribers with [`EventLoop::add`] and
//! [`EventLoop::remove`]; both are messages to the loop (they never block, so any thread
//! may call them, the loop's own included), handled in order. A subscriber that needs the
//! loop to look at it again (because its wishes changed on another thread) owns an eventfd
//! it registers and writes.
//!
//! An fd must leave the loop (its subscriber removes it, or is removed) before it is
//! closed: the event manager keys registrations by fd number.
//!
//! A panic inside a subscriber is caught and logged; the loop goes on (the subscriber's
//! own state is its business, as with a vCPU thread's devices). The loop's thread is a
//! supervised service ([`crate::health`]): a panic elsewhere on it (in a message, or a
//! subscriber's `Drop`) restarts the loop, up to [`MAX_RESTARTS`] times, and shows in the
//! service health with its message; an error of the event manager ends it as `failed`.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId,
};
use serde::Serialize;

use crate::health::Restart;

/// How many panics outside a subscriber call (in a message, or a subscriber's `Drop`) the
/// loop survives: each restarts it (the same event manager, subscribers kept); one more
/// ends it, `panicked` in the service health (`crate::health`).
pub const MAX_RESTARTS: u32 = 10;

/// Called first thing on the loop's thread (once, not again after a restart), with its
/// name: the monitor sets it to enter its seccomp sandbox there (`vmm/src/sandbox`);
/// unset, nothing is called.
pub static ON_THREAD_START: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// What the loop runs.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Why the loop could not start or take a message.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The event manager (its epoll or channel) could not be made.
    #[error("device event loop: {0}")]
    Manager(event_manager::Error),
    /// The loop's thread could not be started.
    #[error("device event loop: starting its thread: {0}")]
    Thread(std::io::Error),
}

/// Identifies a subscriber added with [`EventLoop::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionKey(u64);

/// The loop's counters (`status`, tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventLoopStats {
    /// Times the loop woke up (an `epoll_wait` returned).
    pub wakeups: u64,
    /// Subscribers registered now.
    pub subscribers: usize,
    /// Subscribers that panicked (caught; the loop went on).
    pub panics: u64,
    /// The loop thread's kernel thread id (`/proc/self/task/<tid>`), 0 before it started.
    pub tid: i32,
}

/// What the loop thread and the handles share.
#[derive(Debug, Default)]
struct Control {
    stop: AtomicBool,
    wakeups: AtomicU64,
    subscribers: AtomicUsize,
    panics: AtomicU64,
    tid: AtomicI32,
    next_key: AtomicU64,
}

/// The last handle stops the loop.
struct Handle {
    control: Arc<Control>,
    endpoint: RemoteEndpoint<Subscriber>,
    /// Subscriber ids by key; only the loop thread uses it (inside messages).
    ids: Arc<Mutex<HashMap<SubscriptionKey, SubscriberId>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        // The loop may be gone already; nothing to stop then.
        let _ = self.endpoint.kick();
    }
}

/// A handle on the device event loop; clones share it, the last one dropped stops it.
#[derive(Clone)]
pub struct EventLoop {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventLoop {
    /// Starts the loop on a thread called `name`.
    pub fn start(name: &str) -> Result<EventLoop, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Manager)?;
        let endpoint = manager.remote_endpoint();
        let control = Arc::new(Control::default());
        let c = control.clone();
        let kicker = manager.remote_endpoint();
        let thread_name = name.to_owned();
        let on_start = move || {
            if let Some(hook) = ON_THREAD_START.get() {
                hook(&thread_name);
            }
        };
        crate::health::spawn_service_with(name, Restart::UpTo(MAX_RESTARTS), on_start, move || {
            // SAFETY: gettid takes no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            c.tid.store(tid, Ordering::SeqCst);
            // After a restart: messages queued behind the one that panicked are still in the
            // channel, but their wake-up was consumed; look at them again.
            let _ = kicker.kick();
            while !c.stop.load(Ordering::SeqCst) {
                manager
                    .run()
                    .map_err(|e| format!("device event loop stops: {e}"))?;
                c.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
        .map_err(EventLoopError::Thread)?;
        Ok(EventLoop {
            handle: Arc::new(Handle {
                control,
                endpoint,
                ids: Arc::new(Mutex::new(HashMap::new())),
            }),
        })
    }

    /// Adds `subscriber` (its `init` runs on the loop thread, soon). Fails only when the loop
    /// has stopped.
    pub fn add(&self, subscriber: Subscriber) -> Result<SubscriptionKey, EventLoopError> {
        let key = SubscriptionKey(self.handle.control.next_key.fetch_add(1, Ordering::Relaxed));
        let ids = self.handle.ids.clone();
        let control = self.handle.control.clone();
        let guarded: Subscriber = Box::new(Guarded {
            inner: subscriber,
            control: control.clone(),
        });
        self.handle
            .endpoint
            .fire(move |ops| {
                let id = ops.add_subscriber(guarded);
                lock(&ids).insert(key, id);
                control.subscribers.fetch_add(1, Ordering::SeqCst);
            })
            .map_err(EventLoopError::Manager)?;
        Ok(key)
    }

    /// Removes the subscriber `key` (its fds leave the loop, then it is dropped, on the loop
    /// thread, soon). Removing one that is gone does nothing.
    pub fn remove(&self, key: SubscriptionKey) {
        let ids = self.handle.ids.clone();
        let control = self.handle.control.clone();
        let sent = self.handle.endpoint.fire(move |ops| {
            let Some(id) = lock(&ids).remove(&key) else {
                return;
            };
            if let Ok(subscriber) = ops.remove_subscriber(id) {
                control.subscribers.fetch_sub(1, Ordering::SeqCst);
                drop(subscriber);
            }
        });
        if let Err(e) = sent {
            // The loop has stopped: its subscribers were dropped with it.
            log::debug!("removing a subscriber: {e}");
        }
    }

    /// The loop's counters.
    pub fn stats(&self) -> EventLoopStats {
        let c = &self.handle.control;
        EventLoopStats {
            wakeups: c.wakeups.load(Ordering::Relaxed),
            subscribers: c.subscribers.load(Ordering::SeqCst),
            panics: c.panics.load(Ordering::Relaxed),
            tid: c.tid.load(Ordering::SeqCst),
        }
    }
}

/// A subscriber whose panics are caught (and counted) instead of ending the loop.
struct Guarded {
    inner: Subscriber,
    control: Arc<Control>,
}

impl Guarded {
    fn guard(&self, what: &str, result: std::thread::Result<()>) {
        if result.is_err() {
            self.control.panics.fetch_add(1, Ordering::Relaxed);
            log::error!("device event loop: a subscriber panicked in {what}; the loop goes on");
        }
    }
}

impl MutEventSubscriber for Guarded {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let inner = &mut self.inner;
        let r = catch_unwind(AssertUnwindSafe(|| inner.process(events, ops)));
        self.guard("process", r);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let inner = &mut self.inner;
        let r = catch_unwind(AssertUnwindSafe(|| inner.init(ops)));
        self.guard("init", r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::EventSet;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EventFd;

    /// Counts the events of an eventfd it owns and resets it.
    struct Counter {
        fd: EventFd,
        seen: Arc<AtomicU64>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.fd.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
        }
    }

    struct Panicker(EventFd);

    impl MutEventSubscriber for Panicker {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.0.read();
            panic!("subscriber bug");
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new_raw(self.0.as_raw_fd(), EventSet::IN))
                .unwrap();
        }
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Panics when dropped (on the loop thread, outside any subscriber call).
    struct PanicOnDrop;

    impl MutEventSubscriber for PanicOnDrop {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
        fn init(&mut self, _ops: &mut EventOps) {}
    }

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("dropped in a bad way");
        }
    }

    #[test]
    fn a_panic_outside_a_subscriber_call_does_not_end_the_loop_silently() {
        let el = EventLoop::start("panicky-loop").unwrap();
        let key = el.add(Box::new(PanicOnDrop)).unwrap();
        wait_for(|| el.stats().subscribers == 1);
        el.remove(key);
        let seen = Arc::new(AtomicU64::new(0));
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let writer = fd.try_clone().unwrap();
        el.add(Box::new(Counter {
            fd,
            seen: seen.clone(),
        }))
        .unwrap();
        writer.write(1).unwrap();
        wait_for(|| seen.load(Ordering::SeqCst) == 1);
        let health = crate::health::HealthRegistry::global()
            .snapshot()
            .into_iter()
            .find(|s| s.name == "panicky-loop")
            .unwrap();
        assert_eq!(health.state, crate::health::ServiceState::Running);
        assert_eq!(health.restarts, 1);
        assert_eq!(health.message.as_deref(), Some("dropped in a bad way"));
    }

    #[test]
    fn subscribers_come_and_go_and_panics_do_not_end_the_loop() {
        let el = EventLoop::start("test-loop").unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let writer = fd.try_clone().unwrap();
        let key = el
            .add(Box::new(Counter {
                fd,
                seen: seen.clone(),
            }))
            .unwrap();
        wait_for(|| el.stats().subscribers == 1);
        writer.write(1).unwrap();
        wait_for(|| seen.load(Ordering::SeqCst) == 1);

        let bad = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bad_writer = bad.try_clone().unwrap();
        let bad_key = el.add(Box::new(Panicker(bad))).unwrap();
        wait_for(|| el.stats().subscribers == 2);
        bad_writer.write(1).unwrap();
        wait_for(|| el.stats().panics == 1);
        el.remove(bad_key);
        wait_for(|| el.stats().subscribers == 1);

        // Still running after the panic.
        writer.write(1).unwrap();
        wait_for(|| seen.load(Ordering::SeqCst) == 2);
        el.remove(key);
        el.remove(key);
        wait_for(|| el.stats().subscribers == 0);
        // Removed: its events are no longer seen.
        writer.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_ne!(el.stats().tid, 0);
    }
}
