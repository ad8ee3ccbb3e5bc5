//! A network card on the device event loop ([`NetPoller`], an `event-manager` subscriber):
//! it watches the card's [`rx_poll_fd`](NetMmio::rx_poll_fd) always, and the backend's fd
//! (level-triggered) only while [`NetMmio::wants_rx_poll`] is true, so that a TAP holding
//! frames the guest has no buffer for does not make the loop spin. After every call into
//! the card it looks again. While the partition sleeps and the card reads its TAP for a
//! magic packet, a full batch takes the TAP out of the loop for
//! [`WATCH_PAUSE`](super::wol::WATCH_PAUSE) (a timerfd brings it back): a flood costs a
//! bounded amount of CPU.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use super::{NetBackend, NetMmio};

/// A card's subscriber on the device event loop.
pub struct NetPoller<B: NetBackend> {
    card: Arc<NetMmio<B>>,
    /// The backend's fd is in the loop now.
    registered: bool,
    /// The backend reported an error or hang-up: it is not polled again (it would spin).
    broken: bool,
    /// Calls to `process_rx` from the loop (tests).
    polls: Arc<AtomicU64>,
    /// Brings the backend back after a watch pause; `None` if it could not be made (then a
    /// sleeping card's full batches are not paused).
    pause_timer: Option<TimerFd>,
    /// The backend is left alone until the timer fires.
    paused: bool,
}

impl<B: NetBackend> std::fmt::Debug for NetPoller<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPoller")
            .field("registered", &self.registered)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend> NetPoller<B> {
    /// A subscriber for `card`.
    pub fn new(card: Arc<NetMmio<B>>) -> Self {
        let pause_timer = TimerFd::new()
            .map_err(|e| log::warn!("net: a timerfd for watch pauses: {e}"))
            .ok();
        NetPoller {
            card,
            registered: false,
            broken: false,
            polls: Arc::new(AtomicU64::new(0)),
            pause_timer,
            paused: false,
        }
    }

    /// How many times the loop moved frames into the card (shared counter, for tests).
    pub fn polls(&self) -> Arc<AtomicU64> {
        self.polls.clone()
    }

    /// Leaves the backend alone for [`WATCH_PAUSE`](super::wol::WATCH_PAUSE).
    fn pause(&mut self) {
        if let Some(timer) = &mut self.pause_timer {
            match timer.reset(super::wol::WATCH_PAUSE, None) {
                Ok(()) => self.paused = true,
                Err(e) => log::warn!("net: arming the watch pause timer: {e}"),
            }
        }
    }

    /// Puts the backend's fd in the loop or takes it out, as the card wants now.
    fn reconcile(&mut self, ops: &mut EventOps) {
        let want = self.card.wants_rx_poll() && !self.broken && !self.paused;
        if want == self.registered {
            return;
        }
        let fd = self.card.backend_fd();
        let result = if want {
            ops.add(Events::new_raw(fd, EventSet::IN))
        } else {
            ops.remove(Events::new_raw(fd, EventSet::IN))
        };
        match result {
            Ok(()) => self.registered = want,
            Err(e) => {
                log::warn!("net: the backend fd in the event loop: {e}");
                if want {
                    // Not polled: frames wait in the backend until the next change.
                    self.broken = true;
                }
            }
        }
    }
}

impl<B: NetBackend + 'static> MutEventSubscriber for NetPoller<B> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.card.rx_poll_fd() {
            self.card.take_rx_poll_change();
        } else if events.fd() == self.card.backend_fd() {
            let set = events.event_set();
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                log::warn!("net: the backend reported {set:?}; it is no longer polled");
                self.broken = true;
            } else if set.contains(EventSet::IN) {
                self.polls.fetch_add(1, Ordering::Relaxed);
                if self.card.poll_backend() {
                    self.pause();
                }
            }
        } else if let Some(timer) = self
            .pause_timer
            .as_mut()
            .filter(|t| t.as_raw_fd() == events.fd())
        {
            // Readable: expired. Reading it re-arms nothing.
            let _ = timer.wait();
            self.paused = false;
        }
        self.reconcile(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.card.rx_poll_fd(), EventSet::IN)) {
            log::warn!("net: the card's poll eventfd in the event loop: {e}");
        }
        if let Some(timer) = &self.pause_timer {
            if let Err(e) = ops.add(Events::new_raw(timer.as_raw_fd(), EventSet::IN)) {
                log::warn!("net: the watch pause timer in the event loop: {e}");
                self.pause_timer = None;
            }
        }
        self.reconcile(ops);
    }
}
