//! What the mediation server remembers: relays' **leases** (who was logged in, with which
//! devices, when last heard), **sleep leases** (a relay that went to sleep: its devices,
//! MAC and LAN segment, so that it can be woken) and **tunnel records** (each request, its
//! state, its wake if its relay was asleep, and the job ids the tunnel carried). [`Store`] is the interface; [`sqlite::SqliteStore`] is the
//! durable one (a restarted server comes back with its records), [`memory::MemoryStore`]
//! the one for unit tests. State changes of a tunnel go through [`TunnelRecord::apply`],
//! so both stores follow the same rules.

pub mod memory;
pub mod sqlite;

use std::net::SocketAddrV4;
use std::sync::Arc;

use duplex_tunnel::Ticket;
use serde::{Deserialize, Serialize};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: rusqlite::Error,
    },
    #[error("database holds a bad value in {column}: {value}")]
    Corrupt { column: &'static str, value: String },
    #[error("no tunnel {0} for this relay")]
    UnknownTunnel(u64),
    #[error("tunnel {id} is {state}: cannot be {what}")]
    BadTransition {
        id: u64,
        state: &'static str,
        what: &'static str,
    },
    #[error("store task failed: {0}")]
    Task(String),
}

/// A relay's lease: its last (or current) session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub relay_id: String,
    pub devices: Vec<String>,
    pub session_id: u64,
    pub since_ms: u64,
    pub last_heard_ms: u64,
    pub online: bool,
}

/// A relay asleep (power saving), as its `Sleep` said: recorded when the server answers
/// `SleepGranted`, cleared when the relay logs in again. It does not expire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SleepLease {
    pub relay_id: String,
    pub devices: Vec<String>,
    pub mac: [u8; 6],
    pub segment: String,
    pub since_ms: u64,
}

/// A tunnel request's wake: its relay was asleep and a substitute was asked to wake it
/// (`docs/tunnel-protocol.md#the-wake-object`). Every request sharing one wake shows the
/// same values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeInfo {
    /// The sleeping relay.
    pub relay_id: String,
    /// The relay last asked to wake it (`None` before any was).
    pub substitute: Option<String>,
    /// The sleeping relay's LAN segment (its lease's).
    pub segment: String,
    /// `WakeRelay` messages sent so far.
    pub attempts: u32,
    /// When the wake started.
    pub requested_ms: u64,
    /// When a substitute first reported `WakeSent { sent: true }`.
    pub sent_ms: Option<u64>,
    /// When the relay logged in.
    pub woken_ms: Option<u64>,
    /// When the wake gives up (`wake_timeout_ms` after `requested_ms`).
    pub deadline_ms: u64,
}

/// Where a tunnel request stands (`docs/tunnel-protocol.md#tunnel-record`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    Pending,
    /// The device's relay is asleep: a substitute is asked to wake it.
    Waking,
    Offered,
    Open,
    Closed,
    Failed,
    Expired,
}

impl TunnelState {
    /// The state's name, as in JSON and the database.
    pub fn name(self) -> &'static str {
        match self {
            TunnelState::Pending => "pending",
            TunnelState::Waking => "waking",
            TunnelState::Offered => "offered",
            TunnelState::Open => "open",
            TunnelState::Closed => "closed",
            TunnelState::Failed => "failed",
            TunnelState::Expired => "expired",
        }
    }

    /// The state named `name`.
    pub fn from_name(name: &str) -> Option<TunnelState> {
        [
            TunnelState::Pending,
            TunnelState::Waking,
            TunnelState::Offered,
            TunnelState::Open,
            TunnelState::Closed,
            TunnelState::Failed,
            TunnelState::Expired,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// Pending or offered: still waiting for the relay (a `waking` request is offered only
    /// once it is `pending` again, when its relay logged in).
    pub fn is_waiting(self) -> bool {
        matches!(self, TunnelState::Pending | TunnelState::Offered)
    }

    /// Not finished: pending, waking or offered (counted against a device's limit, and
    /// expired at `expires_ms`).
    pub fn is_unfinished(self) -> bool {
        self.is_waiting() || self == TunnelState::Waking
    }
}

/// A record's error: a code name and a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// A new tunnel request, before the store gives it an id.
#[derive(Clone, Debug)]
pub struct NewTunnel {
    pub device_id: String,
    pub relay_id: String,
    /// The name of the cloud server that asked (its ticket key signs the ticket).
    pub cloud: String,
    /// Where the relay is to dial.
    pub dial: SocketAddrV4,
    pub created_ms: u64,
    /// When a request still pending lapses (`pending_ttl_ms` after `created_ms`).
    pub expires_ms: u64,
}

/// A tunnel request and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelRecord {
    pub tunnel_id: u64,
    pub device_id: String,
    pub relay_id: String,
    pub cloud: String,
    pub dial: SocketAddrV4,
    pub state: TunnelState,
    pub created_ms: u64,
    /// Pending: when the request lapses; offered and later: the ticket's expiry.
    pub expires_ms: u64,
    pub offered_ms: Option<u64>,
    pub opened_ms: Option<u64>,
    pub closed_ms: Option<u64>,
    pub jobs: Vec<String>,
    pub error: Option<ErrorInfo>,
    /// The ticket sent in the last `TunnelRequest` (resent if offered again).
    pub ticket: Option<Ticket>,
    /// The wake of its relay, if the relay was asleep when the request came.
    pub wake: Option<WakeInfo>,
}

/// A change of a tunnel record.
#[derive(Clone, Debug)]
pub enum Transition {
    /// Sent to the relay with `ticket` (its expiry becomes the record's).
    Offered { at: u64, ticket: Ticket },
    /// The relay reported `TunnelAccepted`.
    Opened { at: u64 },
    /// The relay reported `TunnelFailed`.
    Failed { at: u64, code: u16, message: String },
    /// The relay reported `TunnelClosed`.
    Closed { at: u64, jobs: Vec<String> },
    /// Not opened before `expires_ms`.
    Expired { at: u64 },
    /// The relay is asleep: a wake is under way (`pending` or `waking` → `waking`, the wake
    /// info updated).
    Waking { wake: WakeInfo },
    /// The relay logged in: `waking` → `pending` (then offered as usual), `woken_ms` set.
    Woken { at: u64 },
    /// The wake failed (`no_substitute`, `wake_timeout`): `pending` or `waking` → `failed`.
    WakeFailed {
        at: u64,
        error: ErrorInfo,
        wake: WakeInfo,
    },
}

/// The name of a protocol error code, for a record's `error.code`.
pub fn code_name(code: u16) -> String {
    use duplex_tunnel::error_code as c;
    match code {
        c::MALFORMED => "malformed".into(),
        c::DEVICE_NOT_SERVED => "device_not_served".into(),
        c::TICKET_EXPIRED => "ticket_expired".into(),
        c::TICKET_REJECTED => "ticket_rejected".into(),
        c::UNSUPPORTED_VERSION => "unsupported_version".into(),
        c::TOO_MANY => "too_many".into(),
        c::DIAL_FAILED => "dial_failed".into(),
        c::SLEEP_DEFERRED => "sleep_deferred".into(),
        c::WAKE_FAILED => "wake_failed".into(),
        other => format!("error_{other}"),
    }
}

impl TunnelRecord {
    /// Applies `t`; `Ok(false)` when it changes nothing (a repeated report).
    pub fn apply(&mut self, t: Transition) -> Result<bool, StoreError> {
        use TunnelState::*;
        let bad = |what| StoreError::BadTransition {
            id: self.tunnel_id,
            state: self.state.name(),
            what,
        };
        match t {
            Transition::Offered { at, ticket } => {
                if !self.state.is_waiting() {
                    return Err(bad("offered"));
                }
                self.state = Offered;
                self.offered_ms = Some(at);
                self.expires_ms = ticket.body.expires_ms;
                self.ticket = Some(ticket);
            }
            Transition::Opened { at } => match self.state {
                Pending | Waking | Offered | Expired => {
                    self.state = Open;
                    self.opened_ms = Some(at);
                    self.error = None;
                }
                Open => return Ok(false),
                Closed | Failed => return Err(bad("opened")),
            },
            Transition::Failed { at, code, message } => match self.state {
                Pending | Waking | Offered | Expired => {
                    self.state = Failed;
                    self.closed_ms = Some(at);
                    self.error = Some(ErrorInfo {
                        code: code_name(code),
                        message: format!("{code}: {message}"),
                    });
                }
                // A tunnel once accepted ends with `TunnelClosed`; a late failure report
                // (a second dial of a re-offered request) does not undo it.
                Open | Closed | Failed => return Ok(false),
            },
            Transition::Closed { at, jobs } => match self.state {
                Pending | Waking | Offered | Open | Expired => {
                    self.state = Closed;
                    self.closed_ms = Some(at);
                    self.jobs = jobs;
                    self.error = None;
                }
                Closed | Failed => return Ok(false),
            },
            Transition::Expired { at } => {
                if !self.state.is_unfinished() {
                    return Ok(false);
                }
                self.state = Expired;
                self.closed_ms = Some(at);
                self.error = Some(ErrorInfo {
                    code: "expired".into(),
                    message: "not opened before expires_ms".into(),
                });
            }
            Transition::Waking { wake } => match self.state {
                Pending | Waking => {
                    self.state = Waking;
                    self.wake = Some(wake);
                }
                _ => return Err(bad("waking")),
            },
            Transition::Woken { at } => match self.state {
                Waking => {
                    self.state = Pending;
                    if let Some(w) = self.wake.as_mut() {
                        w.woken_ms = Some(at);
                    }
                }
                _ => return Ok(false),
            },
            Transition::WakeFailed { at, error, wake } => match self.state {
                Pending | Waking => {
                    self.state = Failed;
                    self.closed_ms = Some(at);
                    self.error = Some(error);
                    self.wake = Some(wake);
                }
                _ => return Ok(false),
            },
        }
        Ok(true)
    }

    /// The record as the HTTP API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tunnel_id": self.tunnel_id,
            "device_id": self.device_id,
            "relay_id": self.relay_id,
            "state": self.state,
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
            "offered_ms": self.offered_ms,
            "opened_ms": self.opened_ms,
            "closed_ms": self.closed_ms,
            "jobs": self.jobs,
            "error": self.error,
            "wake": self.wake.as_ref().map(WakeInfo::to_json),
        })
    }
}

impl WakeInfo {
    /// The wake as the HTTP API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "relay_id": self.relay_id,
            "substitute": self.substitute,
            "segment": self.segment,
            "attempts": self.attempts,
            "requested_ms": self.requested_ms,
            "sent_ms": self.sent_ms,
            "woken_ms": self.woken_ms,
            "deadline_ms": self.deadline_ms,
        })
    }
}

/// The mediation server's memory. Calls block (SQLite): async code goes through
/// [`StoreHandle`], which runs them on tokio's blocking pool.
pub trait Store: Send + Sync + 'static {
    /// Every relay's lease.
    fn leases(&self) -> Result<Vec<Lease>, StoreError>;
    /// Records a login (replacing the relay's lease).
    fn put_lease(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Updates `last_heard_ms` of leases whose session is still the one given:
    /// `(relay_id, session_id, last_heard_ms)`.
    fn touch_leases(&self, heard: &[(String, u64, u64)]) -> Result<(), StoreError>;
    /// Marks the lease offline if `session_id` is still its session.
    fn end_lease(
        &self,
        relay_id: &str,
        session_id: u64,
        last_heard_ms: u64,
    ) -> Result<(), StoreError>;
    /// The largest session id ever given (0 if none).
    fn max_session_id(&self) -> Result<u64, StoreError>;
    /// Stores a new request (state `pending`) under a fresh tunnel id.
    fn create_tunnel(&self, new: &NewTunnel) -> Result<TunnelRecord, StoreError>;
    /// The record of `tunnel_id`.
    fn tunnel(&self, tunnel_id: u64) -> Result<Option<TunnelRecord>, StoreError>;
    /// How many requests for `device_id` are pending, waking or offered.
    fn waiting_for_device(&self, device_id: &str) -> Result<usize, StoreError>;
    /// How many requests for `relay_id` are pending, waking, offered or open (a relay
    /// with any may not sleep).
    fn busy_for_relay(&self, relay_id: &str) -> Result<usize, StoreError>;
    /// Every `waking` request, oldest first (a restarted server wakes their relays again).
    fn waking(&self) -> Result<Vec<TunnelRecord>, StoreError>;
    /// Every sleep lease.
    fn sleep_leases(&self) -> Result<Vec<SleepLease>, StoreError>;
    /// Records a sleep lease (replacing the relay's previous one).
    fn put_sleep_lease(&self, lease: &SleepLease) -> Result<(), StoreError>;
    /// Removes the relay's sleep lease; whether it had one.
    fn clear_sleep_lease(&self, relay_id: &str) -> Result<bool, StoreError>;
    /// The pending and offered requests for `relay_id`, oldest first.
    fn waiting_for_relay(&self, relay_id: &str) -> Result<Vec<TunnelRecord>, StoreError>;
    /// Applies `t` to `tunnel_id` (which must be `relay_id`'s when given); returns the
    /// record after it.
    fn update_tunnel(
        &self,
        tunnel_id: u64,
        relay_id: Option<&str>,
        t: Transition,
    ) -> Result<TunnelRecord, StoreError>;
    /// Expires unfinished requests with `expires_ms <= now_ms`; returns their ids.
    fn expire_due(&self, now_ms: u64) -> Result<Vec<u64>, StoreError>;
}

/// A shared store whose calls run off the async threads.
#[derive(Clone)]
pub struct StoreHandle(Arc<dyn Store>);

impl StoreHandle {
    /// Wraps a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreHandle(store)
    }

    /// Runs `f` on the store in tokio's blocking pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

#[cfg(test)]
mod tests;
