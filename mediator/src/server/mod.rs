//! The mediation server (`duplex-mediator serve`): relays' control sessions on TLS
//! ([`session`]), the HTTP API cloud servers ask for tunnels with ([`api`]), sleeping
//! relays and their wakes through substitutes ([`wake`]), and the store of leases and
//! tunnel records ([`crate::store`]). The protocol is
//! `docs/tunnel-protocol.md`; running it is `docs/mediator.md`.
//!
//! State shared by all tasks is one [`Mediator`]: the registry from the configuration,
//! the live sessions (one per relay: a newer login evicts the older), the wake book, and
//! the store. Sessions are one task each; the API and the background sweeps (expiry every
//! second, leases' `last_heard_ms` every 5 s, wakes every 100 ms) are tasks too.

pub mod api;
pub mod config;
pub mod login;
pub mod session;
pub mod wake;
pub mod wake_flow;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::store::memory::MemoryStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError, StoreHandle};
use crate::tls::TlsError;
use config::{CloudEntry, Config, RelayEntry};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the hub asks a session task to do.
#[derive(Debug)]
pub enum Command {
    /// Offer this tunnel request (if still waiting).
    Offer(u64),
    /// A newer session of the relay logged in: send `Evicted` and close.
    Evict,
    /// Send this message (a `WakeRelay` for this relay to carry out as a substitute).
    Send(Box<duplex_tunnel::MediatorToRelay>),
}

/// A live, logged-in session of a relay.
#[derive(Debug)]
pub struct SessionSlot {
    pub session_id: u64,
    /// The devices the relay announced (all listed for it).
    pub devices: Vec<String>,
    pub since_ms: u64,
    pub last_heard_ms: Arc<AtomicU64>,
    pub tx: mpsc::UnboundedSender<Command>,
}

/// The server's shared state.
pub struct Mediator {
    pub cfg: Config,
    pub store: StoreHandle,
    relays: HashMap<String, RelayEntry>,
    clouds_by_token: HashMap<String, CloudEntry>,
    clouds_by_name: HashMap<String, CloudEntry>,
    sessions: Mutex<HashMap<String, SessionSlot>>,
    /// Sleeping relays, LAN segments and wakes (held across the store calls of a step).
    pub book: tokio::sync::Mutex<wake::WakeBook>,
    next_session: AtomicU64,
    next_wake: AtomicU64,
    /// TCP connections open on the relay port (logged in or not).
    connections: AtomicUsize,
    ready: AtomicBool,
}

impl Mediator {
    /// The state for `cfg` over `store`.
    pub fn new(cfg: Config, store: Arc<dyn Store>) -> Result<Mediator, StoreError> {
        let next = store.max_session_id()? + 1;
        let book = wake::WakeBook::new(store.sleep_leases()?);
        Ok(Mediator {
            book: tokio::sync::Mutex::new(book),
            next_wake: AtomicU64::new(crate::util::random_u64() >> 16),
            relays: cfg
                .relays
                .iter()
                .map(|r| (r.id.clone(), r.clone()))
                .collect(),
            clouds_by_token: cfg
                .clouds
                .iter()
                .map(|c| (c.token.clone(), c.clone()))
                .collect(),
            clouds_by_name: cfg
                .clouds
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            cfg,
            store: StoreHandle::new(store),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(next),
            connections: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
        })
    }

    /// The registry entry of relay `id`.
    pub fn relay(&self, id: &str) -> Option<&RelayEntry> {
        self.relays.get(id)
    }

    /// The cloud server whose API token this is.
    pub fn cloud_by_token(&self, token: &str) -> Option<&CloudEntry> {
        self.clouds_by_token.get(token)
    }

    /// The cloud server called `name`.
    pub fn cloud_by_name(&self, name: &str) -> Option<&CloudEntry> {
        self.clouds_by_name.get(name)
    }

    /// The live sessions (never held across an await).
    pub fn sessions(&self) -> MutexGuard<'_, HashMap<String, SessionSlot>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh wake id (random start, then rising: unique across restarts in practice).
    pub fn next_wake_id(&self) -> u64 {
        self.next_wake.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the store is open and the relay listener bound.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Open TCP connections on the relay port.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Asks the session of the relay serving `device_id`, if it is online and announced
    /// the device, to offer `tunnel_id`.
    pub fn nudge(&self, relay_id: &str, device_id: &str, tunnel_id: u64) {
        if let Some(slot) = self.sessions().get(relay_id) {
            if slot.devices.iter().any(|d| d == device_id) {
                let _ = slot.tx.send(Command::Offer(tunnel_id));
            }
        }
    }
}

/// Counts a relay connection for as long as it lives.
pub struct ConnectionGuard(Arc<Mediator>);

impl ConnectionGuard {
    /// Counts one more connection.
    pub fn new(m: Arc<Mediator>) -> Self {
        m.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(m)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A started server.
pub struct Running {
    pub relay_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The certificate's pin (64 hex digits).
    pub pin: String,
    pub mediator: Arc<Mediator>,
    pub tasks: JoinSet<()>,
}

/// Binds a TCP listener with a backlog fit for thousands of relays reconnecting at once;
/// returns it with the address it got (port 0 in `addr` picks a free port).
pub fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bind_err = |source| ServerError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.bind(addr).map_err(bind_err)?;
    let listener = socket.listen(4096).map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
}

/// Opens the store, binds both listeners and starts every task.
pub async fn start(cfg: Config) -> Result<Running, ServerError> {
    let (tls, pin) = crate::tls::server_config(&cfg.cert, &cfg.key)?;
    let store: Arc<dyn Store> = match &cfg.db {
        Some(path) => {
            let path = path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??,
            )
        }
        None => Arc::new(MemoryStore::new()),
    };
    let (relay_listener, relay_addr) = bind(cfg.relay_listen)?;
    let (api_listener, api_addr) = bind(cfg.api_listen)?;
    let mediator = Arc::new(Mediator::new(cfg, store)?);
    let mut tasks = JoinSet::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tasks.spawn(accept_loop(mediator.clone(), relay_listener, acceptor));
    tasks.spawn(api::serve(mediator.clone(), api_listener));
    tasks.spawn(expiry_sweep(mediator.clone()));
    tasks.spawn(lease_flush(mediator.clone()));
    tasks.spawn(wake_flow::sweep(mediator.clone()));
    mediator.ready.store(true, Ordering::Relaxed);
    Ok(Running {
        relay_addr,
        api_addr,
        pin,
        mediator,
        tasks,
    })
}

async fn accept_loop(m: Arc<Mediator>, listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(session::run(m.clone(), acceptor.clone(), tcp, peer));
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to close.
                log::warn!("relay listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Marks requests that were not opened in time `expired`, every second.
async fn expiry_sweep(m: Arc<Mediator>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::util::now_ms();
        match m.store.run(move |s| s.expire_due(now)).await {
            Ok(ids) if !ids.is_empty() => log::info!("tunnels expired: {ids:?}"),
            Ok(_) => {}
            Err(e) => log::error!("expiry sweep: {e}"),
        }
    }
}

/// Writes the live sessions' `last_heard_ms` to the store every 5 s.
async fn lease_flush(m: Arc<Mediator>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let heard: Vec<(String, u64, u64)> = m
            .sessions()
            .iter()
            .map(|(id, s)| {
                (
                    id.clone(),
                    s.session_id,
                    s.last_heard_ms.load(Ordering::Relaxed),
                )
            })
            .collect();
        if heard.is_empty() {
            continue;
        }
        if let Err(e) = m.store.run(move |s| s.touch_leases(&heard)).await {
            log::error!("lease flush: {e}");
        }
    }
}
