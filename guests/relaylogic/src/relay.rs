//! The relay: its state, the events the firmware feeds it, and the output queue. The
//! control session is in `session.rs`, tunnels in `tunnel.rs`, the controller link and
//! jobs in `controller.rs` (all `impl Relay`).
//!
//! Time is milliseconds from any fixed origin (the firmware passes its guest time, which a
//! restore does not make jump). Every entry point takes `now`; [`Relay::next_deadline`]
//! says when [`Relay::on_tick`] next has something to do.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use duplex_link::HostReply;
use serde::Serialize;

use crate::action::{Action, ConnId};
use crate::backoff::Backoff;
use crate::config::RelayConfig;
use crate::controller::{CtlState, Pending};
use crate::session::Session;
use crate::tunnel::Tunnel;
use duplex_tunnel::RelayToMediator;

/// Most tunnels open at once; one more request is refused with 429.
pub const MAX_TUNNELS: usize = 4;
/// How long a tunnel may take from the dial to `DialOk` before it is reported failed (504).
pub const DIAL_TIMEOUT_MS: u64 = 10_000;
/// A tunnel on which nothing arrives for this long while the relay waits for the cloud
/// server (no job, or a job's document being sent) is closed.
pub const TUNNEL_IDLE_MS: u64 = 60_000;
/// Interval between `JobStatus` polls of a job at the controller, at the most.
pub const JOB_POLL_MS: u64 = 100;
/// Wait before the first `JobStatus` poll of a job; each next wait doubles, up to
/// [`JOB_POLL_MS`] (10, 20, 40, 80, 100, 100 ... ms): a short job's result goes back within
/// milliseconds of its end instead of up to 100 ms later, and a long one costs a poll every
/// 100 ms as before.
pub const JOB_POLL_FIRST_MS: u64 = 10;
/// Pause between attempts to reach the controller.
pub const CONTROLLER_RETRY_MS: u64 = 500;
/// Most job ids a `TunnelClosed` lists (so that the frame stays within the control
/// session's limit); later ones are counted but not listed.
pub const MAX_REPORTED_JOBS: usize = 200;
/// Tunnel reports kept while there is no session, sent after the next `Welcome`.
pub(crate) const MAX_QUEUED_REPORTS: usize = 64;
/// Final reports remembered per tunnel id, to answer a request offered again.
pub(crate) const MAX_RECENT: usize = 16;

/// The relay logic (see the crate documentation).
pub struct Relay {
    pub(crate) cfg: RelayConfig,
    rng: Box<dyn FnMut() -> u64>,
    out: Vec<Action>,
    next_conn: ConnId,
    pub(crate) session: Session,
    pub(crate) backoff: Backoff,
    /// Reports for the mediator waiting for a session.
    pub(crate) reports: VecDeque<RelayToMediator>,
    /// The last final report (`TunnelFailed`, `TunnelClosed`) of recent tunnels.
    pub(crate) recent: VecDeque<(u64, RelayToMediator)>,
    pub(crate) tunnels: Vec<Tunnel>,
    pub(crate) ctl: CtlState,
    /// Controller requests sent and not answered, in order.
    pub(crate) pending: VecDeque<Pending>,
    /// Failed controller connection attempts in a row.
    pub(crate) ctl_failures: u64,
    /// When the relay last had tunnel work (the idle clock of `sleep_idle_ms=`).
    pub(crate) idle_since: u64,
    /// `Sleep` sent on this session, not answered yet (and not given up).
    pub(crate) sleep_asked: bool,
    /// Why the relay cannot sleep was logged.
    pub(crate) sleep_note_logged: bool,
}

impl Relay {
    /// A relay that dials the mediation server and the controller at once. `rng` returns
    /// uniformly random values (the reconnect jitter).
    pub fn new(cfg: RelayConfig, rng: Box<dyn FnMut() -> u64>, now: u64) -> Self {
        let backoff = Backoff::new(cfg.backoff_base_ms, cfg.backoff_max_ms);
        Relay {
            cfg,
            rng,
            out: Vec::new(),
            next_conn: 1,
            session: Session::Waiting { retry_at: now },
            backoff,
            reports: VecDeque::new(),
            recent: VecDeque::new(),
            tunnels: Vec::new(),
            ctl: CtlState::Down { retry_at: now },
            pending: VecDeque::new(),
            ctl_failures: 0,
            idle_since: now,
            sleep_asked: false,
            sleep_note_logged: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    /// Takes the actions produced so far, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        core::mem::take(&mut self.out)
    }

    /// The session id, while a session is up.
    pub fn session_id(&self) -> Option<u64> {
        self.session.id()
    }

    /// Tunnels open or opening.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    /// The reconnect backoff (its attempt counter).
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Runs the timers: dials, heartbeats, timeouts, idle tunnels, controller polls, the
    /// idle sleep. Asleep, nothing.
    pub fn on_tick(&mut self, now: u64) {
        if self.is_sleeping() {
            return;
        }
        self.note_activity(now);
        self.session_tick(now);
        self.tunnels_tick(now);
        self.controller_tick(now);
        self.note_activity(now);
        self.sleep_tick(now);
    }

    /// When [`Relay::on_tick`] next has something to do (absolute ms); `None` asleep.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.is_sleeping() {
            return None;
        }
        let tunnels = self.tunnels.iter().filter_map(|t| t.deadline());
        [
            self.session_deadline(),
            self.controller_deadline(),
            self.sleep_deadline(),
        ]
        .into_iter()
        .flatten()
        .chain(tunnels)
        .min()
    }

    /// The TLS session of `conn` is established.
    pub fn on_connected(&mut self, conn: ConnId, now: u64) {
        self.note_activity(now);
        if self.session.conn() == Some(conn) {
            self.session_connected(now);
        } else if let Some(i) = self.tunnel_index(conn) {
            self.tunnel_connected(i, now);
        }
        self.note_activity(now);
    }

    /// Bytes arrived (decrypted) on `conn`.
    pub fn on_data(&mut self, conn: ConnId, bytes: &[u8], now: u64) {
        self.note_activity(now);
        if self.session.conn() == Some(conn) {
            self.session_data(bytes, now);
        } else if let Some(i) = self.tunnel_index(conn) {
            self.tunnel_data(i, bytes, now);
        }
        self.note_activity(now);
    }

    /// `conn` failed or was closed by the peer (TCP or TLS); `why` says how.
    pub fn on_closed(&mut self, conn: ConnId, why: &str, now: u64) {
        self.note_activity(now);
        if self.session.conn() == Some(conn) {
            self.session_down(now, &format!("connection lost: {why}"), false);
        } else if let Some(i) = self.tunnel_index(conn) {
            self.tunnel_lost(i, why);
        }
        self.note_activity(now);
    }

    /// The controller connection is up.
    pub fn on_controller_connected(&mut self, now: u64) {
        self.controller_connected(now);
    }

    /// A reply from the controller.
    pub fn on_controller_reply(&mut self, reply: HostReply, now: u64) {
        self.note_activity(now);
        self.controller_reply(reply, now);
        self.note_activity(now);
    }

    /// The controller sent something that is not a reply: the connection is dropped.
    pub fn on_controller_malformed(&mut self, why: &str, now: u64) {
        self.note_activity(now);
        self.log(format!(
            "controller sent a malformed frame ({why}); reconnecting"
        ));
        self.push(Action::ControllerClose);
        self.controller_down(now);
    }

    /// The controller connection failed or closed (or a connection attempt was refused).
    pub fn on_controller_closed(&mut self, now: u64) {
        self.note_activity(now);
        self.controller_closed(now);
    }

    /// The partition was restored from a snapshot: every TCP connection is gone (the
    /// firmware dropped them with its network stack). Open tunnels are reported closed on
    /// the next session, tunnels still dialing are left for the mediator to offer again,
    /// and a fresh session is dialled at once (backoff from attempt 0). The controller
    /// link is vsock, part of the snapshot, and goes on.
    pub fn on_restored(&mut self, now: u64) {
        if self.session.conn().is_some() || self.session.id().is_some() {
            self.log("session down: restored from a snapshot".into());
        }
        self.restart(now, "restore");
    }

    // ---- helpers for the other modules ----

    /// Forgets the session and every connection (the firmware dropped its network stack:
    /// a restore, a wake): open tunnels are reported closed on the next session, tunnels
    /// still dialing are left for the mediator to offer again, and a fresh session is
    /// dialled at once (backoff from attempt 0).
    pub(crate) fn restart(&mut self, now: u64, by: &str) {
        // The session is gone before the tunnels are reported: their reports must wait for
        // the next session, not go out on the dead connection.
        self.session = Session::Waiting { retry_at: now };
        for t in core::mem::take(&mut self.tunnels) {
            if t.is_open() {
                self.log(format!(
                    "tunnel {} closed ({} jobs) by the {by}",
                    t.id, t.job_count
                ));
                self.finish_report(t.id, t.closed_report());
            }
        }
        self.backoff.reset();
        self.sleep_asked = false;
        self.idle_since = now;
    }

    pub(crate) fn push(&mut self, a: Action) {
        self.out.push(a);
    }

    pub(crate) fn log(&mut self, line: String) {
        self.out.push(Action::Log(line));
    }

    pub(crate) fn random(&mut self) -> u64 {
        (self.rng)()
    }

    pub(crate) fn new_conn(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        id
    }

    /// Sends one message as a frame on `conn`.
    pub(crate) fn send_frame<T: Serialize>(&mut self, conn: ConnId, msg: &T) {
        match duplex_tunnel::try_encode(msg) {
            Ok(bytes) => self.push(Action::Send { conn, bytes }),
            Err(e) => self.log(format!("cannot encode a frame: {e}")),
        }
    }

    pub(crate) fn tunnel_index(&self, conn: ConnId) -> Option<usize> {
        self.tunnels.iter().position(|t| t.conn == conn)
    }

    /// Sends a report to the mediator now, or after the next `Welcome`.
    pub(crate) fn report(&mut self, msg: RelayToMediator) {
        if let Some(conn) = self.session.up_conn() {
            self.send_frame(conn, &msg);
        } else {
            if self.reports.len() >= MAX_QUEUED_REPORTS {
                self.reports.pop_front();
            }
            self.reports.push_back(msg);
        }
    }

    /// Sends a tunnel's final report and remembers it for a request offered again.
    pub(crate) fn finish_report(&mut self, tunnel_id: u64, msg: RelayToMediator) {
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((tunnel_id, msg.clone()));
        self.report(msg);
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub(crate) fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
