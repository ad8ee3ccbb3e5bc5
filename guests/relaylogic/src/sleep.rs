//! Sleep and wake (`docs/relay.md`, sleep): a relay with `sleep_idle_ms=`, a `segment=`
//! and a MAC asks the mediator for a **lease** (`Sleep`) once it has had no tunnel work
//! for that long; on `SleepGranted` it closes the session and asks its firmware to sleep
//! ([`Action::Sleep`]); [`Relay::on_woken`] starts it again from a clean slate.
//!
//! As a **substitute** (any relay with a `segment=`), it carries out the mediator's
//! `WakeRelay`: one magic packet broadcast on its LAN ([`Action::SendMagic`]), answered
//! with `WakeSent`. The request being woken for stays queued at the mediator, which offers
//! it to the woken relay when it logs in.

use alloc::format;
use alloc::string::{String, ToString};

use duplex_tunnel::{error_code, valid_id, RelayToMediator, MAX_ID_LEN, MAX_MESSAGE_LEN};

use crate::action::Action;
use crate::relay::{cut, Relay};
use crate::session::Session;

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// An identifier from the network, fit for a console line: as it is when valid, else
/// quoted and escaped (at most [`MAX_ID_LEN`] bytes of it).
fn shown(id: &str) -> String {
    if valid_id(id) {
        id.to_string()
    } else {
        format!("{:?}", cut(id.to_string(), MAX_ID_LEN))
    }
}

impl Relay {
    /// Whether anything tunnel-related is under way: a tunnel open or dialling, or a
    /// controller request in flight.
    pub(crate) fn busy(&self) -> bool {
        !self.tunnels.is_empty() || !self.pending.is_empty()
    }

    /// While busy, the idle clock keeps restarting.
    pub(crate) fn note_activity(&mut self, now: u64) {
        if self.busy() {
            self.idle_since = now;
        }
    }

    /// The lease this relay would ask for: `None` without `sleep_idle_ms=`, a segment or
    /// a MAC.
    fn lease(&self) -> Option<(u64, [u8; 6], &str)> {
        let idle = self.cfg.sleep_idle_ms.filter(|ms| *ms > 0)?;
        Some((idle, self.cfg.mac?, self.cfg.segment.as_deref()?))
    }

    /// When the relay will ask to sleep, if it is idle with a session up.
    pub(crate) fn sleep_deadline(&self) -> Option<u64> {
        let (idle, _, _) = self.lease()?;
        if self.sleep_asked || self.busy() || self.session.up_conn().is_none() {
            return None;
        }
        Some(self.idle_since.saturating_add(idle))
    }

    /// Sends `Sleep` once the relay has been idle for `sleep_idle_ms`.
    pub(crate) fn sleep_tick(&mut self, now: u64) {
        if self.sleep_deadline().is_none_or(|at| now < at) {
            return;
        }
        let (Some(conn), Some((idle, mac, segment))) = (self.session.up_conn(), self.lease())
        else {
            return;
        };
        let sleep = RelayToMediator::Sleep {
            devices: self.cfg.devices.clone(),
            mac,
            segment: segment.to_string(),
        };
        self.sleep_asked = true;
        self.log(format!("idle for {idle} ms; asking to sleep"));
        self.send_frame(conn, &sleep);
    }

    /// After `Welcome`: the relay's LAN (`Lan`), and why it will not sleep, once.
    pub(crate) fn session_welcomed(&mut self, conn: u64, now: u64) {
        self.idle_since = now;
        self.sleep_asked = false;
        if let (Some(segment), Some(mac)) = (self.cfg.segment.clone(), self.cfg.mac) {
            self.send_frame(conn, &RelayToMediator::Lan { segment, mac });
        }
        if self.cfg.sleep_idle_ms.is_some() && self.lease().is_none() && !self.sleep_note_logged {
            self.sleep_note_logged = true;
            let missing = if self.cfg.segment.is_none() {
                "no segment="
            } else {
                "no MAC"
            };
            self.log(format!("sleep_idle_ms set but {missing}: never sleeping"));
        }
    }

    /// A `TunnelRequest` arrived: the idle clock restarts and a pending sleep request is
    /// given up (a `SleepGranted` for it will be ignored).
    pub(crate) fn tunnel_activity(&mut self, now: u64) {
        self.idle_since = now;
        if self.sleep_asked {
            self.sleep_asked = false;
            self.log("sleep given up: a tunnel request arrived".into());
        }
    }

    /// `SleepGranted`: close the session and sleep, unless this relay did not ask or has
    /// work again.
    pub(crate) fn sleep_granted(&mut self, conn: u64, now: u64) {
        if !self.sleep_asked || self.busy() {
            let why = if self.busy() {
                "tunnels are open"
            } else {
                "no sleep request pending"
            };
            self.log(format!("SleepGranted ignored: {why}; staying awake"));
            self.idle_since = now;
            return;
        }
        self.sleep_asked = false;
        self.log("going to sleep (lease granted)".into());
        self.push(Action::Close { conn });
        self.session = Session::Sleeping;
        self.push(Action::Sleep);
    }

    /// `SleepRefused`: stay up; ask again after another idle period.
    pub(crate) fn sleep_refused(&mut self, code: u16, message: &str, now: u64) {
        self.sleep_asked = false;
        self.idle_since = now;
        let message = cut(message.to_string(), MAX_MESSAGE_LEN);
        self.log(format!("sleep refused: {code} {message:?}; staying awake"));
    }

    /// `WakeRelay`: send one magic packet for `mac` on the LAN (an untrusted instruction:
    /// nothing else changes), or answer at once that this relay cannot.
    pub(crate) fn wake_relay(
        &mut self,
        wake_id: u64,
        relay_id: &str,
        mac: [u8; 6],
        device_id: &str,
        tunnel_id: u64,
    ) {
        let line = format!(
            "waking relay {} ({}) for tunnel {tunnel_id} to {}",
            shown(relay_id),
            mac_string(&mac),
            shown(device_id)
        );
        let refused = if self.cfg.segment.is_none() {
            Some("not on a LAN segment")
        } else if mac[0] & 1 != 0 || mac == [0; 6] {
            Some("not a unicast MAC")
        } else {
            None
        };
        match refused {
            Some(why) => {
                self.log(format!("{line}: cannot: {why}"));
                self.wake_sent(wake_id, Err(why.to_string()));
            }
            None => {
                self.log(line);
                self.push(Action::SendMagic { wake_id, mac });
            }
        }
    }

    /// Answers a `WakeRelay` on the session that asked (a wake outlives no session: the
    /// answer is dropped when the session is gone).
    fn wake_sent(&mut self, wake_id: u64, result: Result<(), String>) {
        let msg = match result {
            Ok(()) => RelayToMediator::WakeSent {
                wake_id,
                sent: true,
                code: 0,
                message: String::new(),
            },
            Err(why) => RelayToMediator::WakeSent {
                wake_id,
                sent: false,
                code: error_code::WAKE_FAILED,
                message: cut(why, MAX_MESSAGE_LEN),
            },
        };
        match self.session.up_conn() {
            Some(conn) => self.send_frame(conn, &msg),
            None => self.log(format!("wake {wake_id}: no session to answer on")),
        }
    }

    /// The firmware sent (or could not send) the magic packet of [`Action::SendMagic`]
    /// `wake_id`.
    pub fn on_magic_sent(&mut self, wake_id: u64, result: Result<(), String>, _now: u64) {
        if let Err(why) = &result {
            self.log(format!("wake {wake_id}: magic packet not sent: {why}"));
        }
        self.wake_sent(wake_id, result);
    }

    /// Whether the relay is asleep (after [`Action::Sleep`], until
    /// [`Relay::on_woken`]): no session, no timers.
    pub fn is_sleeping(&self) -> bool {
        matches!(self.session, Session::Sleeping)
    }

    /// The partition woke (`reason`: `magic packet`, `operator`, ...) and the firmware
    /// rebuilt its network stack: every connection is gone. The relay forgets its session,
    /// resets the backoff and dials the mediator at once; requests waiting for it come as
    /// ordinary `TunnelRequest`s after the new `Welcome`.
    pub fn on_woken(&mut self, reason: &str, now: u64) {
        self.log(format!("woken ({reason})"));
        self.restart(now, "wake");
    }
}
