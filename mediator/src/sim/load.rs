//! Load mode (`duplex-relay-sim --sessions N`): N relays (`<prefix><i>`, one shared
//! secret, no devices), each a bare control session that logs in and sends heartbeats at
//! the interval its `Welcome` gives, reconnecting after a second if it loses the session.
//! Logins are spread out by a limit on handshakes under way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use duplex_tunnel::{MediatorToRelay, RelayToMediator, KEY_LEN};
use rustls::ClientConfig;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::{connect_control, login, SimError};

/// How the load is made.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub mediator: SocketAddr,
    pub mediator_pin: [u8; 32],
    pub relay_prefix: String,
    pub secret: [u8; KEY_LEN],
    pub sessions: usize,
    /// Logins under way at once.
    pub concurrency: usize,
}

/// Counters of a load run.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub online: AtomicUsize,
    pub logins: AtomicU64,
    pub pings: AtomicU64,
    pub pongs: AtomicU64,
    pub failures: AtomicU64,
}

/// A running load.
pub struct Load {
    pub stats: Arc<LoadStats>,
    tasks: JoinSet<()>,
}

impl Load {
    /// Stops every session.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Starts `cfg.sessions` sessions.
pub fn start(cfg: LoadConfig) -> Result<Load, SimError> {
    let tls = crate::tls::pinned_client_config(cfg.mediator_pin)?;
    let stats = Arc::new(LoadStats::default());
    let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..cfg.sessions {
        let relay_id = format!("{}{i}", cfg.relay_prefix);
        tasks.spawn(session_loop(
            cfg.clone(),
            relay_id,
            tls.clone(),
            stats.clone(),
            gate.clone(),
        ));
    }
    Ok(Load { stats, tasks })
}

async fn session_loop(
    cfg: LoadConfig,
    relay_id: String,
    tls: Arc<ClientConfig>,
    stats: Arc<LoadStats>,
    gate: Arc<Semaphore>,
) {
    loop {
        if let Err(e) = one_session(&cfg, &relay_id, &tls, &stats, &gate).await {
            log::debug!("load {relay_id}: {e}");
            stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Decrements the online count when a logged-in session ends.
struct Online<'a>(&'a LoadStats);

impl Drop for Online<'_> {
    fn drop(&mut self) {
        self.0.online.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn one_session(
    cfg: &LoadConfig,
    relay_id: &str,
    tls: &Arc<ClientConfig>,
    stats: &LoadStats,
    gate: &Semaphore,
) -> Result<(), SimError> {
    let (mut conn, hb, quiet) = {
        let _permit = gate
            .acquire()
            .await
            .map_err(|_| SimError::Unexpected("load stopped".into()))?;
        let mut conn = connect_control(cfg.mediator, tls.clone()).await?;
        match login(&mut conn, relay_id, &cfg.secret, &[]).await? {
            MediatorToRelay::Welcome {
                heartbeat_ms,
                heartbeat_timeout_ms,
                ..
            } => (
                conn,
                Duration::from_millis(u64::from(heartbeat_ms.max(1))),
                Duration::from_millis(u64::from(heartbeat_timeout_ms)),
            ),
            other => return Err(SimError::Unexpected(format!("{other:?}"))),
        }
    };
    stats.logins.fetch_add(1, Ordering::Relaxed);
    stats.online.fetch_add(1, Ordering::Relaxed);
    let _online = Online(stats);
    // Spread the first pings over one interval.
    let offset = Duration::from_millis(crate::util::random_u64() % (hb.as_millis() as u64).max(1));
    let mut ping = tokio::time::interval_at(Instant::now() + offset, hb);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deadline = Instant::now() + quiet;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                seq += 1;
                conn.send(&RelayToMediator::Ping { seq }).await?;
                stats.pings.fetch_add(1, Ordering::Relaxed);
            }
            msg = conn.recv() => {
                deadline = Instant::now() + quiet;
                match msg? {
                    MediatorToRelay::Pong { .. } => { stats.pongs.fetch_add(1, Ordering::Relaxed); }
                    other => return Err(SimError::Unexpected(format!("{other:?}"))),
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Err(SimError::Unexpected("mediator silent".into())),
        }
    }
}
