//! Sleeping relays and their wakes (`docs/tunnel-protocol.md#sleep-and-wake`).
//!
//! A relay is `active` (a session), `offline` (no session, no sleep lease), `sleeping`
//! (a sleep lease: it asked to sleep and was granted it) or `waking` (asleep, and a
//! substitute was asked to wake it). A request for a device of a sleeping relay is
//! recorded `waking` and joins the relay's one **wake**: the server asks a substitute (an
//! active relay that sent `Lan` with the sleeping relay's segment; the one with the fewest
//! wakes in flight, then the lowest id) with `WakeRelay`, again every `wake_retry_ms` up to
//! `wake_attempts` times (another substitute if the last one's session is gone or it
//! answered `WakeSent { sent: false }`), until the relay logs in (its requests become
//! `pending` and are offered to it as usual) or `wake_timeout_ms` passes (they fail with
//! `wake_timeout`; the relay stays asleep). No possible substitute at the request: it
//! fails at once with `no_substitute`.
//!
//! The [`WakeBook`] is in memory behind an async mutex held across the store calls of a
//! step, so that a login, a request and a sleep never interleave. Sleep leases are in the
//! store too (a restarted server still knows who sleeps); `waking` records found at start
//! get a fresh wake.

//! This module is the state (the book, a wake, the substitute choice, the errors);
//! [`super::wake_flow`] carries out the steps on a [`super::Mediator`].

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{json, Map, Value};

use crate::store::{ErrorInfo, SleepLease, WakeInfo};
use crate::util::mac_string;

/// What an active relay said in `Lan`.
#[derive(Clone, Debug)]
pub struct Lan {
    pub session_id: u64,
    pub segment: String,
    pub mac: [u8; 6],
}

/// A wake in flight for one sleeping relay.
#[derive(Clone, Debug)]
pub struct Wake {
    /// What the tunnel records show.
    pub info: WakeInfo,
    pub mac: [u8; 6],
    /// The requests waiting for it (tunnel id, device id), oldest first.
    pub tunnels: Vec<(u64, String)>,
    /// Every `WakeRelay` sent: wake id and substitute.
    pub sent_to: Vec<(u64, String)>,
    /// Substitutes that answered `WakeSent { sent: false }`.
    pub failed: HashSet<String>,
    /// When the next `WakeRelay` may go.
    pub next_send_ms: u64,
}

/// What a wake should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// The deadline passed: fail its requests.
    Timeout,
    /// Send (again) `WakeRelay`.
    Send,
    /// Nothing yet.
    Wait,
}

impl Wake {
    /// A wake for `lease` started at `now`, no `WakeRelay` sent yet.
    pub fn new(lease: &SleepLease, now: u64, timeout_ms: u64) -> Wake {
        Wake {
            info: WakeInfo {
                relay_id: lease.relay_id.clone(),
                substitute: None,
                segment: lease.segment.clone(),
                attempts: 0,
                requested_ms: now,
                sent_ms: None,
                woken_ms: None,
                deadline_ms: now.saturating_add(timeout_ms),
            },
            mac: lease.mac,
            tunnels: Vec::new(),
            sent_to: Vec::new(),
            failed: HashSet::new(),
            next_send_ms: now,
        }
    }

    /// What to do at `now`, with at most `max_attempts` `WakeRelay` messages.
    pub fn due(&self, now: u64, max_attempts: u32) -> Due {
        if now >= self.info.deadline_ms {
            Due::Timeout
        } else if now >= self.next_send_ms && self.info.attempts < max_attempts {
            Due::Send
        } else {
            Due::Wait
        }
    }

    /// The substitutes asked, in order, each once.
    pub fn substitutes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (_, s) in &self.sent_to {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }
}

/// How the last wake of a relay ended, for `GET /v1/relays`.
#[derive(Clone, Debug)]
pub struct LastWake {
    pub info: WakeInfo,
    /// `woken`, `wake_timeout` or `no_substitute`.
    pub outcome: &'static str,
}

/// The server's memory of sleeping relays, LAN segments and wakes.
#[derive(Debug, Default)]
pub struct WakeBook {
    /// Sleep leases (as in the store).
    pub leases: BTreeMap<String, SleepLease>,
    /// Active relays' `Lan`, by relay id.
    pub lans: HashMap<String, Lan>,
    /// Wakes in flight, by sleeping relay.
    pub wakes: BTreeMap<String, Wake>,
    /// The last finished wake of each relay.
    pub last: HashMap<String, LastWake>,
    /// Whether the `waking` records found at start were taken up.
    pub recovered: bool,
}

impl WakeBook {
    /// A book with the stored sleep leases.
    pub fn new(leases: Vec<SleepLease>) -> WakeBook {
        WakeBook {
            leases: leases
                .into_iter()
                .map(|l| (l.relay_id.clone(), l))
                .collect(),
            ..WakeBook::default()
        }
    }

    /// The relay to ask to wake `sleeping` (on `segment`): an active relay (`is_active`)
    /// that sent `Lan` with that segment, is not asleep itself and did not fail this wake;
    /// `prefer` if it qualifies, else the one with the fewest wakes in flight, then the
    /// lowest id.
    pub fn choose_substitute(
        &self,
        sleeping: &str,
        segment: &str,
        prefer: Option<&str>,
        avoid: &HashSet<String>,
        is_active: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let ok = |id: &str| {
            id != sleeping
                && !avoid.contains(id)
                && !self.leases.contains_key(id)
                && self.lans.get(id).is_some_and(|l| l.segment == segment)
                && is_active(id)
        };
        if let Some(p) = prefer.filter(|p| ok(p)) {
            return Some(p.to_string());
        }
        let load = |id: &str| {
            self.wakes
                .values()
                .filter(|w| w.info.substitute.as_deref() == Some(id))
                .count()
        };
        self.lans
            .keys()
            .filter(|id| ok(id))
            .min_by(|a, b| load(a).cmp(&load(b)).then_with(|| a.cmp(b)))
            .cloned()
    }

    /// The relay's state: `active`, `offline`, `sleeping` or `waking`.
    pub fn state(&self, relay_id: &str, has_session: bool) -> &'static str {
        if self.wakes.contains_key(relay_id) {
            "waking"
        } else if self.leases.contains_key(relay_id) {
            "sleeping"
        } else if has_session {
            "active"
        } else {
            "offline"
        }
    }

    /// `state`, `segment`, `lease`, `wake` and `last_wake` of a relay for `GET /v1/relays`.
    pub fn relay_json(&self, relay_id: &str, has_session: bool) -> Map<String, Value> {
        let lease = self.leases.get(relay_id);
        let segment = self
            .lans
            .get(relay_id)
            .map(|l| l.segment.clone())
            .or_else(|| lease.map(|l| l.segment.clone()));
        let mut out = Map::new();
        out.insert("state".into(), json!(self.state(relay_id, has_session)));
        out.insert("segment".into(), json!(segment));
        out.insert(
            "lease".into(),
            lease.map_or(Value::Null, |l| {
                json!({"mac": mac_string(&l.mac), "segment": l.segment,
                       "devices": l.devices, "since_ms": l.since_ms})
            }),
        );
        out.insert(
            "wake".into(),
            self.wakes.get(relay_id).map_or(Value::Null, |w| {
                json!({"substitute": w.info.substitute, "attempts": w.info.attempts,
                       "requested_ms": w.info.requested_ms, "sent_ms": w.info.sent_ms,
                       "deadline_ms": w.info.deadline_ms,
                       "tunnels": w.tunnels.iter().map(|t| t.0).collect::<Vec<_>>()})
            }),
        );
        out.insert(
            "last_wake".into(),
            self.last.get(relay_id).map_or(Value::Null, |l| {
                let mut v = l.info.to_json();
                v["outcome"] = json!(l.outcome);
                v
            }),
        );
        out
    }
}

/// The `wake_timeout` error of a wake given up.
pub fn timeout_error(w: &Wake, timeout_ms: u64) -> ErrorInfo {
    let how = if w.info.attempts == 0 {
        format!(
            "no awake relay on segment {} could be asked",
            w.info.segment
        )
    } else {
        format!(
            "{} wake request{} through {}",
            w.info.attempts,
            if w.info.attempts == 1 { "" } else { "s" },
            w.substitutes().join(", ")
        )
    };
    ErrorInfo {
        code: "wake_timeout".into(),
        message: format!(
            "relay {} did not wake within {timeout_ms} ms ({how})",
            w.info.relay_id
        ),
    }
}

/// The `no_substitute` error of a request for a sleeping relay.
pub fn no_substitute_error(relay_id: &str, segment: &str) -> ErrorInfo {
    ErrorInfo {
        code: "no_substitute".into(),
        message: format!(
            "relay {relay_id} is asleep and no awake relay on segment {segment} can wake it"
        ),
    }
}

#[cfg(test)]
#[path = "wake_tests.rs"]
mod tests;
