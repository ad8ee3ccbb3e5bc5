//! The host bridge on the device event loop: an `event-manager` subscriber that waits on
//! the bridge's eventfd, a timer (host sockets' deadlines, listeners' back-offs) and every
//! listener and host socket as they want, and runs what a TX pass left over. Depends on
//! `shared` and `switch`.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use super::shared::Shared;
use super::switch::Inner;

pub(crate) struct BridgeSubscriber {
    shared: Arc<Shared>,
    timer: TimerFd,
}

impl BridgeSubscriber {
    pub fn new(shared: Arc<Shared>) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: F_SETFL on an fd this process owns; no pointers. The timer is read only
        // after the loop saw it readable, nonblocking is a safeguard.
        let rc = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BridgeSubscriber { shared, timer })
    }

    /// After an event: TX left over, registrations, and the deadline timer.
    fn settle(&mut self, inner: &mut Inner, ops: &mut EventOps) {
        let frozen = inner.frozen();
        if !frozen {
            inner.run_tx_left();
        }
        inner.bridge_mut().sync(ops, frozen);
        if frozen {
            return;
        }
        let next = inner.check_timeouts();
        // Deadlines may have put listeners back: register them now.
        inner.bridge_mut().sync(ops, frozen);
        let armed = match next {
            Some(d) => self.timer.reset(d.max(Duration::from_millis(1)), None),
            None => self.timer.clear(),
        };
        if let Err(e) = armed {
            log::warn!("vsock: host bridge timer: {e}");
        }
    }
}

impl MutEventSubscriber for BridgeSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let timer_fd = self.timer.as_raw_fd();
        let shared = self.shared.clone();
        shared.with(|inner| {
            if fd == inner.bridge_mut().kick_fd() {
                inner.bridge_mut().kicked();
            } else if fd == timer_fd {
                let _ = self.timer.wait();
            } else if let Some(token) = inner.bridge_mut().token_of(fd) {
                if inner.frozen() {
                    inner.bridge_mut().suspend(token, ops);
                } else {
                    inner.on_event(token, events.event_set().bits());
                }
            }
            self.settle(inner, ops);
        });
    }

    fn init(&mut self, ops: &mut EventOps) {
        let timer_fd = self.timer.as_raw_fd();
        let shared = self.shared.clone();
        shared.with(|inner| {
            inner.bridge_mut().set_loop_thread();
            for fd in [inner.bridge_mut().kick_fd(), timer_fd] {
                if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                    log::error!("vsock: the host bridge cannot wait on the loop: {e}");
                }
            }
            inner.bridge_mut().touch_all();
            self.settle(inner, ops);
        });
    }
}
