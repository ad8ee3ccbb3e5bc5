//! The control session to the mediation server (`docs/tunnel-protocol.md`, control
//! session): dial, `Hello`, `Challenge`, `Login`, `Welcome`, heartbeats, and the end of a
//! session with the delay before the next attempt.

use alloc::format;
use alloc::string::String;

use duplex_link::{FrameDecoder, FrameError};
use duplex_tunnel::{
    control_decoder, login_proof, MediatorToRelay, RelayToMediator, MAX_CONTROL_FRAME,
    PROTOCOL_VERSION,
};

use crate::action::{Action, ConnId, Peer};
use crate::config::endpoint_string;
use crate::relay::Relay;

/// Where a session is.
#[derive(Debug)]
pub(crate) enum Phase {
    /// TCP and TLS under way.
    Connecting,
    /// `Hello` sent.
    AwaitChallenge,
    /// `Login` sent.
    AwaitWelcome,
    /// `Welcome` received.
    Up {
        session_id: u64,
        heartbeat_ms: u64,
        timeout_ms: u64,
        next_ping: u64,
        seq: u64,
    },
}

/// A session connection.
pub(crate) struct Control {
    pub conn: ConnId,
    pub phase: Phase,
    decoder: FrameDecoder<MediatorToRelay>,
    /// When the dial started.
    started: u64,
    /// When the last frame arrived (or the session came up).
    heard: u64,
}

/// The control session.
pub(crate) enum Session {
    /// No connection; the next dial at `retry_at`.
    Waiting { retry_at: u64 },
    /// A connection, logging in or up.
    Active(Control),
    /// Asleep with a lease ([`crate::Action::Sleep`]): no connection, no dial, until
    /// [`Relay::on_woken`].
    Sleeping,
}

impl Session {
    /// The connection, if any.
    pub fn conn(&self) -> Option<ConnId> {
        match self {
            Session::Active(c) => Some(c.conn),
            Session::Waiting { .. } | Session::Sleeping => None,
        }
    }

    /// The connection of a session that is up.
    pub fn up_conn(&self) -> Option<ConnId> {
        match self {
            Session::Active(c) if matches!(c.phase, Phase::Up { .. }) => Some(c.conn),
            _ => None,
        }
    }

    /// The session id, while up.
    pub fn id(&self) -> Option<u64> {
        match self {
            Session::Active(Control {
                phase: Phase::Up { session_id, .. },
                ..
            }) => Some(*session_id),
            _ => None,
        }
    }
}

fn name(msg: &MediatorToRelay) -> &'static str {
    match msg {
        MediatorToRelay::Challenge { .. } => "Challenge",
        MediatorToRelay::Welcome { .. } => "Welcome",
        MediatorToRelay::Refused { .. } => "Refused",
        MediatorToRelay::Pong { .. } => "Pong",
        MediatorToRelay::TunnelRequest { .. } => "TunnelRequest",
        MediatorToRelay::Evicted { .. } => "Evicted",
        MediatorToRelay::Error { .. } => "Error",
        MediatorToRelay::SleepGranted => "SleepGranted",
        MediatorToRelay::SleepRefused { .. } => "SleepRefused",
        MediatorToRelay::WakeRelay { .. } => "WakeRelay",
    }
}

impl Relay {
    pub(crate) fn session_deadline(&self) -> Option<u64> {
        match &self.session {
            Session::Waiting { retry_at } => Some(*retry_at),
            Session::Sleeping => None,
            Session::Active(c) => match c.phase {
                Phase::Up {
                    timeout_ms,
                    next_ping,
                    ..
                } => Some(next_ping.min(c.heard.saturating_add(timeout_ms))),
                _ => Some(c.started.saturating_add(self.cfg.login_timeout_ms)),
            },
        }
    }

    pub(crate) fn session_tick(&mut self, now: u64) {
        let login_timeout = self.cfg.login_timeout_ms;
        let mut ping = None;
        let mut down = None;
        match &mut self.session {
            Session::Waiting { retry_at } => {
                if now >= *retry_at {
                    self.dial_mediator(now);
                }
                return;
            }
            Session::Sleeping => return,
            Session::Active(c) => match &mut c.phase {
                Phase::Up {
                    heartbeat_ms,
                    timeout_ms,
                    next_ping,
                    seq,
                    ..
                } => {
                    if now >= c.heard.saturating_add(*timeout_ms) {
                        down = Some(format!(
                            "heartbeat timeout: nothing heard for {timeout_ms} ms"
                        ));
                    } else if now >= *next_ping {
                        *seq += 1;
                        ping = Some((c.conn, *seq));
                        *next_ping = now.saturating_add(*heartbeat_ms);
                    }
                }
                phase => {
                    if now >= c.started.saturating_add(login_timeout) {
                        let at = match phase {
                            Phase::Connecting => "connecting",
                            Phase::AwaitChallenge => "waiting for Challenge",
                            _ => "waiting for Welcome",
                        };
                        down = Some(format!("login timed out after {login_timeout} ms ({at})"));
                    }
                }
            },
        }
        if let Some(why) = down {
            self.session_down(now, &why, false);
        } else if let Some((conn, seq)) = ping {
            self.send_frame(conn, &RelayToMediator::Ping { seq });
        }
    }

    fn dial_mediator(&mut self, now: u64) {
        let conn = self.new_conn();
        let endpoint = self.cfg.mediator;
        self.log(format!(
            "dialing mediator {} (attempt {})",
            endpoint_string(&endpoint),
            self.backoff.attempt()
        ));
        self.push(Action::Dial {
            conn,
            endpoint,
            peer: Peer::Mediator,
        });
        self.session = Session::Active(Control {
            conn,
            phase: Phase::Connecting,
            decoder: control_decoder(),
            started: now,
            heard: now,
        });
    }

    pub(crate) fn session_connected(&mut self, now: u64) {
        let Session::Active(c) = &mut self.session else {
            return;
        };
        if !matches!(c.phase, Phase::Connecting) {
            return;
        }
        c.phase = Phase::AwaitChallenge;
        c.heard = now;
        let conn = c.conn;
        let hello = RelayToMediator::Hello {
            version: PROTOCOL_VERSION,
            relay_id: self.cfg.relay_id.clone(),
        };
        self.send_frame(conn, &hello);
    }

    pub(crate) fn session_data(&mut self, bytes: &[u8], now: u64) {
        let Session::Active(c) = &mut self.session else {
            return;
        };
        let conn = c.conn;
        c.decoder.push(bytes);
        // Each message may end the session; stop as soon as the connection changes.
        while let Session::Active(c) = &mut self.session {
            if c.conn != conn {
                return;
            }
            let Some(next) = c.decoder.next_message() else {
                return;
            };
            c.heard = now;
            match next {
                Ok(msg) => self.on_mediator(msg, now),
                Err(FrameError::TooLong(n)) => {
                    let why =
                        format!("frame of {n} bytes over the {MAX_CONTROL_FRAME}-byte limit (413)");
                    self.session_down(now, &why, false);
                }
                Err(_) => self.session_down(now, "malformed frame (400)", false),
            }
        }
    }

    fn on_mediator(&mut self, msg: MediatorToRelay, now: u64) {
        let Session::Active(c) = &mut self.session else {
            return;
        };
        let conn = c.conn;
        match (&mut c.phase, msg) {
            (Phase::AwaitChallenge, MediatorToRelay::Challenge { nonce }) => {
                c.phase = Phase::AwaitWelcome;
                let proof = login_proof(&self.cfg.secret, &self.cfg.relay_id, &nonce);
                let login = RelayToMediator::Login {
                    proof,
                    devices: self.cfg.devices.clone(),
                };
                self.send_frame(conn, &login);
            }
            (
                Phase::AwaitWelcome,
                MediatorToRelay::Welcome {
                    session_id,
                    heartbeat_ms,
                    heartbeat_timeout_ms,
                },
            ) => {
                let (hb, to) = if heartbeat_ms > 0 && heartbeat_timeout_ms > heartbeat_ms {
                    (heartbeat_ms, heartbeat_timeout_ms)
                } else {
                    (self.cfg.heartbeat_ms, self.cfg.heartbeat_timeout_ms)
                };
                c.phase = Phase::Up {
                    session_id,
                    heartbeat_ms: hb.into(),
                    timeout_ms: to.into(),
                    next_ping: now.saturating_add(hb.into()),
                    seq: 0,
                };
                c.heard = now;
                self.backoff.reset();
                if (hb, to) != (heartbeat_ms, heartbeat_timeout_ms) {
                    self.log(format!(
                        "Welcome has an unusable heartbeat ({heartbeat_ms}/{heartbeat_timeout_ms} ms); using {hb}/{to} ms"
                    ));
                }
                self.log(format!("session up id={session_id}"));
                self.session_welcomed(conn, now);
                while let Some(r) = self.reports.pop_front() {
                    self.send_frame(conn, &r);
                }
            }
            (_, MediatorToRelay::Refused { code, message }) => {
                self.session_down(now, &format!("refused {code}: {message}"), false);
            }
            (_, MediatorToRelay::Evicted { message }) => {
                self.session_down(now, &format!("evicted: {message}"), true);
            }
            (_, MediatorToRelay::Error { code, message }) => {
                self.session_down(now, &format!("error {code}: {message}"), false);
            }
            (Phase::Up { .. }, MediatorToRelay::Pong { .. }) => {}
            (
                Phase::Up { .. },
                MediatorToRelay::TunnelRequest {
                    tunnel_id,
                    device_id,
                    cloud,
                    ticket,
                },
            ) => {
                self.tunnel_activity(now);
                self.tunnel_request(tunnel_id, device_id, cloud, ticket, now);
            }
            (Phase::Up { .. }, MediatorToRelay::SleepGranted) => self.sleep_granted(conn, now),
            (Phase::Up { .. }, MediatorToRelay::SleepRefused { code, message }) => {
                self.sleep_refused(code, &message, now);
            }
            (
                Phase::Up { .. },
                MediatorToRelay::WakeRelay {
                    wake_id,
                    relay_id,
                    mac,
                    device_id,
                    tunnel_id,
                },
            ) => self.wake_relay(wake_id, &relay_id, mac, &device_id, tunnel_id),
            (phase, msg) => {
                let why = format!("unexpected {} in phase {:?} (400)", name(&msg), phase);
                self.session_down(now, &why, false);
            }
        }
    }

    /// Ends the session (closing its connection) and schedules the next dial: after the
    /// backoff delay, or the full cap after an eviction.
    pub(crate) fn session_down(&mut self, now: u64, why: &str, evicted: bool) {
        if let Session::Active(c) = &self.session {
            let conn = c.conn;
            self.push(Action::Close { conn });
        }
        let delay = if evicted {
            self.backoff.evicted_delay_ms()
        } else {
            let r = self.random();
            self.backoff.next_delay_ms(r)
        };
        self.sleep_asked = false;
        let line: String = format!("session down: {why}; next attempt in {delay} ms");
        self.log(line);
        self.session = Session::Waiting {
            retry_at: now.saturating_add(delay),
        };
    }
}
