//! One relay's control session, from the TCP accept to the close
//! (`docs/tunnel-protocol.md#control-session-relay--mediator`): TLS, `Hello`, `Challenge`,
//! `Login` checked against the registry, `Welcome`, then heartbeats, tunnel requests and
//! the relay's reports until the relay leaves, breaks the protocol, goes quiet, or a newer
//! login evicts it ([`super::login`] is the part before `Welcome`). A bad frame ends
//! this connection only. `Lan`, `Sleep`, `WakeSent` and the `WakeRelay` sent on the hub's
//! behalf go to [`super::wake`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use duplex_tunnel::error_code as code;
use duplex_tunnel::{valid_id, Endpoint, MediatorToRelay, RelayToMediator, Ticket, TicketBody};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::login::{login, message};
use super::{wake_flow as wake, Command, ConnectionGuard, Mediator, SessionSlot};
use crate::store::{Lease, StoreError, Transition, TunnelRecord, TunnelState};
use crate::util::{now_ms, random_bytes};
use crate::wire::{Framed, WireError};

/// A control session's connection, server side.
pub type Conn = Framed<TlsStream<TcpStream>, RelayToMediator>;

/// Read buffer per session: control frames are small; the decoder grows to a frame's size.
pub const READ_BUF: usize = 512;
/// Longest a write to a relay may take before the session is dropped.
const WRITE_LIMIT: Duration = Duration::from_secs(10);
/// How long the server waits for its last frame (Refused, Error, Evicted) to leave.
pub const GOODBYE_LIMIT: Duration = Duration::from_secs(2);

/// Serves one accepted connection on the relay port.
pub async fn run(m: Arc<Mediator>, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let _counted = ConnectionGuard::new(m.clone());
    let limit = Duration::from_millis(m.cfg.login_timeout_ms);
    let (conn, relay_id, devices) =
        match tokio::time::timeout(limit, login(&m, acceptor, tcp, peer)).await {
            Ok(Some(done)) => done,
            Ok(None) => return,
            Err(_) => {
                log::info!(
                    "login timed out: no login from {peer} within {} ms",
                    limit.as_millis()
                );
                return;
            }
        };
    let mut session = Session::open(m, conn, relay_id, devices, peer);
    let reason = session.serve().await;
    session.close(&reason).await;
}

/// Why a session ended.
enum End {
    Bye,
    Evicted,
    Timeout,
    /// The relay broke the protocol: code and message sent in `Error`.
    Protocol(u16, String),
    Lost(WireError),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Bye => "relay said Bye".into(),
            End::Evicted => "evicted by a newer login".into(),
            End::Timeout => "heartbeat timeout".into(),
            End::Protocol(c, m) => format!("protocol error {c}: {m}"),
            End::Lost(e) => format!("connection lost: {e}"),
        }
    }
}

/// A logged-in session.
struct Session {
    m: Arc<Mediator>,
    conn: Conn,
    relay_id: String,
    devices: Vec<String>,
    session_id: u64,
    peer: SocketAddr,
    last_heard: Arc<AtomicU64>,
    rx: mpsc::UnboundedReceiver<Command>,
    /// Tunnels offered on this session and not yet answered.
    offered: HashSet<u64>,
    /// Wake ids sent to this relay in `WakeRelay` and not yet answered.
    wakes_asked: HashSet<u64>,
    /// The server answered `SleepGranted`: nothing more is offered on this session.
    granted_sleep: bool,
}

impl Session {
    /// Registers the session (evicting the relay's previous one).
    fn open(
        m: Arc<Mediator>,
        conn: Conn,
        relay_id: String,
        devices: Vec<String>,
        peer: SocketAddr,
    ) -> Session {
        let session_id = m.next_session_id();
        let last_heard = Arc::new(AtomicU64::new(now_ms()));
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = SessionSlot {
            session_id,
            devices: devices.clone(),
            since_ms: now_ms(),
            last_heard_ms: last_heard.clone(),
            tx,
        };
        if let Some(old) = m.sessions().insert(relay_id.clone(), slot) {
            let _ = old.tx.send(Command::Evict);
        }
        Session {
            m,
            conn,
            relay_id,
            devices,
            session_id,
            peer,
            last_heard,
            rx,
            offered: HashSet::new(),
            wakes_asked: HashSet::new(),
            granted_sleep: false,
        }
    }

    async fn send(&mut self, msg: &MediatorToRelay) -> Result<(), End> {
        self.conn
            .send_within(msg, WRITE_LIMIT)
            .await
            .map_err(End::Lost)
    }

    /// `Welcome`, the waiting requests, then the session's loop; returns why it ended.
    async fn serve(&mut self) -> End {
        let cfg = &self.m.cfg;
        let welcome = MediatorToRelay::Welcome {
            session_id: self.session_id,
            heartbeat_ms: cfg.heartbeat_ms,
            heartbeat_timeout_ms: cfg.heartbeat_timeout_ms,
        };
        if let Err(end) = self.send(&welcome).await {
            return end;
        }
        let lease = Lease {
            relay_id: self.relay_id.clone(),
            devices: self.devices.clone(),
            session_id: self.session_id,
            since_ms: now_ms(),
            last_heard_ms: now_ms(),
            online: true,
        };
        if let Err(e) = self.m.store.run(move |s| s.put_lease(&lease)).await {
            log::error!("relay {}: cannot store the lease: {e}", self.relay_id);
        }
        log::info!(
            "relay {} logged in: session {} devices {:?} from {}",
            self.relay_id,
            self.session_id,
            self.devices,
            self.peer
        );
        wake::on_login(&self.m, &self.relay_id).await;
        let relay = self.relay_id.clone();
        match self.m.store.run(move |s| s.waiting_for_relay(&relay)).await {
            Ok(waiting) => {
                for rec in waiting {
                    if let Err(end) = self.offer(rec).await {
                        return end;
                    }
                }
            }
            Err(e) => log::error!("relay {}: cannot read waiting requests: {e}", self.relay_id),
        }
        match self.run_loop().await {
            Ok(()) => End::Bye,
            Err(end) => end,
        }
    }

    async fn run_loop(&mut self) -> Result<(), End> {
        let timeout = Duration::from_millis(u64::from(self.m.cfg.heartbeat_timeout_ms));
        let mut deadline = Instant::now() + timeout;
        loop {
            tokio::select! {
                msg = self.conn.recv() => {
                    let msg = match msg {
                        Ok(msg) => msg,
                        Err(e) => return Err(match e.code() {
                            Some(c) => End::Protocol(c, e.to_string()),
                            None => End::Lost(e),
                        }),
                    };
                    deadline = Instant::now() + timeout;
                    self.last_heard.store(now_ms(), Ordering::Relaxed);
                    if self.handle(msg).await? {
                        return Ok(());
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Offer(id)) => {
                        match self.m.store.run(move |s| s.tunnel(id)).await {
                            Ok(Some(rec)) => self.offer(rec).await?,
                            Ok(None) => {}
                            Err(e) => log::error!("tunnel {id}: {e}"),
                        }
                    }
                    Some(Command::Send(msg)) => {
                        if let MediatorToRelay::WakeRelay { wake_id, .. } = *msg {
                            self.wakes_asked.insert(wake_id);
                        }
                        self.send(&msg).await?;
                    }
                    Some(Command::Evict) | None => return Err(End::Evicted),
                },
                _ = tokio::time::sleep_until(deadline) => return Err(End::Timeout),
            }
        }
    }

    /// Handles one frame from the relay; `Ok(true)` ends the session (Bye).
    async fn handle(&mut self, msg: RelayToMediator) -> Result<bool, End> {
        let now = now_ms();
        let (id, t) = match msg {
            RelayToMediator::Ping { seq } => {
                self.send(&MediatorToRelay::Pong { seq }).await?;
                return Ok(false);
            }
            RelayToMediator::Bye => return Ok(true),
            RelayToMediator::Hello { .. } | RelayToMediator::Login { .. } => {
                return Err(End::Protocol(
                    code::MALFORMED,
                    "Hello or Login after Welcome".into(),
                ));
            }
            RelayToMediator::Lan { segment, mac } => {
                if !valid_id(&segment) {
                    let shown: String = segment.chars().take(80).collect();
                    return Err(End::Protocol(
                        code::MALFORMED,
                        format!("Lan: invalid segment {shown:?}"),
                    ));
                }
                wake::on_lan(&self.m, &self.relay_id, self.session_id, segment, mac).await;
                return Ok(false);
            }
            RelayToMediator::Sleep {
                devices,
                mac,
                segment,
            } => {
                let answer = wake::sleep(&self.m, &self.relay_id, devices, mac, segment).await;
                self.granted_sleep = matches!(answer, MediatorToRelay::SleepGranted);
                self.send(&answer).await?;
                return Ok(false);
            }
            RelayToMediator::WakeSent {
                wake_id,
                sent,
                code: c,
                message: why,
            } => {
                if !self.wakes_asked.remove(&wake_id) {
                    return Err(End::Protocol(
                        code::UNKNOWN_TUNNEL,
                        format!("WakeSent: wake {wake_id} was not asked of this relay"),
                    ));
                }
                wake::wake_sent(&self.m, &self.relay_id, wake_id, sent, c, &why).await;
                return Ok(false);
            }
            RelayToMediator::TunnelAccepted { tunnel_id } => {
                (tunnel_id, Transition::Opened { at: now })
            }
            RelayToMediator::TunnelFailed {
                tunnel_id,
                code,
                message,
            } => (
                tunnel_id,
                Transition::Failed {
                    at: now,
                    code,
                    message,
                },
            ),
            RelayToMediator::TunnelClosed { tunnel_id, jobs } => {
                if let Some(bad) = jobs.iter().find(|j| !valid_id(j)) {
                    let why = format!(
                        "TunnelClosed {tunnel_id}: invalid job id {:?}",
                        bad.chars().take(80).collect::<String>()
                    );
                    return Err(End::Protocol(code::MALFORMED, why));
                }
                (tunnel_id, Transition::Closed { at: now, jobs })
            }
        };
        if !matches!(t, Transition::Opened { .. }) {
            self.offered.remove(&id);
        }
        let relay = self.relay_id.clone();
        let what = format!("{t:?}");
        match self
            .m
            .store
            .run(move |s| s.update_tunnel(id, Some(&relay), t))
            .await
        {
            Ok(rec) => {
                log::info!(
                    "tunnel {id} {} (relay {}, device {})",
                    rec.state.name(),
                    rec.relay_id,
                    rec.device_id
                );
                Ok(false)
            }
            Err(StoreError::UnknownTunnel(_)) => Err(End::Protocol(
                code::UNKNOWN_TUNNEL,
                format!("tunnel {id} is not this relay's"),
            )),
            Err(e @ StoreError::BadTransition { .. }) => {
                log::warn!("relay {}: ignored report: {e}", self.relay_id);
                Ok(false)
            }
            Err(e) => {
                log::error!("relay {}: cannot record {what}: {e}", self.relay_id);
                Ok(false)
            }
        }
    }

    /// Sends a `TunnelRequest` for `rec` if it is still waiting for a device of this session
    /// (a fresh ticket when pending, the same one when offered before).
    async fn offer(&mut self, rec: TunnelRecord) -> Result<(), End> {
        let now = now_ms();
        if self.granted_sleep
            || !rec.state.is_waiting()
            || rec.expires_ms <= now
            || rec.relay_id != self.relay_id
            || !self.devices.contains(&rec.device_id)
            || self.offered.contains(&rec.tunnel_id)
        {
            return Ok(());
        }
        let id = rec.tunnel_id;
        let ticket = match (&rec.ticket, rec.state) {
            (Some(t), TunnelState::Offered) => t.clone(),
            _ => {
                let Some(cloud) = self.m.cloud_by_name(&rec.cloud) else {
                    let t = Transition::Failed {
                        at: now,
                        code: code::TICKET_REJECTED,
                        message: format!("cloud {} is no longer configured", rec.cloud),
                    };
                    let _ = self
                        .m
                        .store
                        .run(move |s| s.update_tunnel(id, None, t))
                        .await;
                    return Ok(());
                };
                Ticket::sign(
                    &cloud.ticket_key,
                    TicketBody {
                        tunnel_id: id,
                        relay_id: rec.relay_id.clone(),
                        device_id: rec.device_id.clone(),
                        nonce: random_bytes(),
                        expires_ms: now + self.m.cfg.ticket_ttl_ms,
                    },
                )
            }
        };
        let t = Transition::Offered {
            at: now,
            ticket: ticket.clone(),
        };
        match self
            .m
            .store
            .run(move |s| s.update_tunnel(id, None, t))
            .await
        {
            Ok(_) => {}
            Err(StoreError::BadTransition { .. }) => return Ok(()),
            Err(e) => {
                log::error!("tunnel {id}: cannot record the offer: {e}");
                return Ok(());
            }
        }
        self.offered.insert(id);
        log::info!(
            "tunnel {id} offered to relay {} (device {})",
            self.relay_id,
            rec.device_id
        );
        let req = MediatorToRelay::TunnelRequest {
            tunnel_id: id,
            device_id: rec.device_id,
            cloud: Endpoint {
                ip: rec.dial.ip().octets(),
                port: rec.dial.port(),
            },
            ticket,
        };
        self.send(&req).await
    }

    /// Says goodbye as `end` requires, unregisters the session and records the lease's end.
    async fn close(&mut self, end: &End) {
        let goodbye = match end {
            End::Evicted => Some(MediatorToRelay::Evicted {
                message: message(format!("relay {} logged in again", self.relay_id)),
            }),
            End::Timeout => Some(MediatorToRelay::Error {
                code: code::HEARTBEAT_TIMEOUT,
                message: message(format!(
                    "nothing heard for {} ms",
                    self.m.cfg.heartbeat_timeout_ms
                )),
            }),
            End::Protocol(c, why) => Some(MediatorToRelay::Error {
                code: *c,
                message: message(why.clone()),
            }),
            End::Bye | End::Lost(_) => None,
        };
        if let Some(msg) = goodbye {
            let _ = self.conn.send_within(&msg, GOODBYE_LIMIT).await;
        }
        {
            let mut sessions = self.m.sessions();
            if sessions
                .get(&self.relay_id)
                .is_some_and(|s| s.session_id == self.session_id)
            {
                sessions.remove(&self.relay_id);
            }
        }
        wake::on_session_end(&self.m, &self.relay_id, self.session_id).await;
        let (relay, session, heard) = (
            self.relay_id.clone(),
            self.session_id,
            self.last_heard.load(Ordering::Relaxed),
        );
        if let Err(e) = self
            .m
            .store
            .run(move |s| s.end_lease(&relay, session, heard))
            .await
        {
            log::error!(
                "relay {}: cannot record the session's end: {e}",
                self.relay_id
            );
        }
        log::info!(
            "relay {} session {} ended: {} ({})",
            self.relay_id,
            self.session_id,
            end.describe(),
            self.peer
        );
        self.conn.shutdown(GOODBYE_LIMIT).await;
    }
}
