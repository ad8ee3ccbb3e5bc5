//! `duplex-cloud`: a reference cloud print service (`docs/mediator.md#duplex-cloud`).
//!
//! A job submitted to its local API ([`api`]) goes to its device's worker ([`jobs`]),
//! which asks the mediator for a tunnel ([`ask`]; a request the mediator fails because
//! the device's relay sleeps and cannot be woken fails the job with the mediator's code),
//! waits for the relay's dial-back ([`dial`]:
//! ticket checks, codes 426/412/410), sends the job and its document, checks the result
//! against the expected checksums ([`document`]) and closes the tunnel when no other job
//! for that device is queued. A tunnel lost before the result means a new tunnel and the
//! same job id again: the device prints it once.
//!
//! Shared documents (`docs/shared-data.md`): a sync ([`sync`]) opens a tunnel the same
//! way, sends `SyncOpen` and answers the device's share messages (its users for pairing,
//! its shares' revisions into [`share::Shares`], kept in SQLite by [`share_db`]); the
//! cloud's users read the documents their paired accounts may read ([`shared_api`]).

pub mod api;
pub mod ask;
pub mod config;
pub mod dial;
pub mod document;
pub mod jobs;
pub mod share;
pub mod share_db;
pub mod shared_api;
pub mod sync;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::server::{bind, ServerError};
use config::CloudConfig;
use dial::Tunnel;
use jobs::JobEntry;

/// A tunnel id the cloud asked the mediator for, until a relay dials it or the cloud
/// gives up.
pub struct Asked {
    pub device_id: String,
    /// The job worker waiting for the dial.
    pub waiter: oneshot::Sender<Tunnel>,
}

/// A tunnel as the cloud saw it (`GET /v1/tunnels`).
#[derive(Clone, Debug, Serialize)]
pub struct TunnelSeen {
    pub tunnel_id: u64,
    pub device_id: String,
    pub peer: String,
    pub opened_ms: u64,
    pub closed_ms: Option<u64>,
    pub jobs: Vec<String>,
    /// `cloud` (it sent `Close` and got `Closed`), `relay` (the relay closed first),
    /// `lost` (an error or a timeout).
    pub closed_by: Option<String>,
}

/// The service's shared state.
pub struct Cloud {
    pub cfg: CloudConfig,
    /// The address relays are told to dial.
    pub dial_addr: SocketAddrV4,
    asked: Mutex<HashMap<u64, Asked>>,
    /// Tunnel ids dialled once, with their tickets' expiry.
    used: Mutex<HashMap<u64, u64>>,
    /// Requests to the mediator under way (a dial may arrive before the answer).
    pub asking: AtomicUsize,
    tunnels: Mutex<BTreeMap<u64, TunnelSeen>>,
    jobs: Mutex<HashMap<String, Arc<JobEntry>>>,
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<Arc<JobEntry>>>>,
    /// The shares received from devices.
    pub shares: share::Shares,
    /// One sync per device at a time.
    pub sync_locks: sync::SyncLocks,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cloud {
    /// Tunnel ids asked for and not yet dialled.
    pub fn asked(&self) -> MutexGuard<'_, HashMap<u64, Asked>> {
        lock(&self.asked)
    }

    /// Tunnel ids dialled (one use each).
    pub fn used(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        lock(&self.used)
    }

    /// Tunnels seen.
    pub fn tunnels(&self) -> MutexGuard<'_, BTreeMap<u64, TunnelSeen>> {
        lock(&self.tunnels)
    }

    /// Jobs by job id.
    pub fn jobs(&self) -> MutexGuard<'_, HashMap<String, Arc<JobEntry>>> {
        lock(&self.jobs)
    }

    /// Records that a tunnel ended.
    pub fn tunnel_ended(&self, tunnel_id: u64, closed_by: &str) {
        if let Some(t) = self.tunnels().get_mut(&tunnel_id) {
            if t.closed_ms.is_none() {
                t.closed_ms = Some(crate::util::now_ms());
                t.closed_by = Some(closed_by.to_string());
            }
        }
        log::info!("tunnel {tunnel_id} closed ({closed_by})");
    }

    /// Queues `job` on its device's worker (started on first use).
    pub fn enqueue(self: &Arc<Self>, job: Arc<JobEntry>) {
        let mut workers = lock(&self.workers);
        let device = job.spec.device_id.clone();
        let tx = workers.entry(device.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(jobs::device_worker(self.clone(), device, rx));
            tx
        });
        if let Err(e) = tx.send(job) {
            // The worker never ends while the sender lives; report rather than lose the job.
            e.0.finish_failed("device worker is gone");
        }
    }
}

/// A started service.
pub struct RunningCloud {
    pub tunnel_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub pin: String,
    pub cloud: Arc<Cloud>,
    pub tasks: JoinSet<()>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("{0}")]
    Server(#[from] ServerError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("config: dial: the listen address {0} cannot be dialled; set \"dial\" to an IPv4 address:port")]
    NoDialAddress(SocketAddr),
    #[error("{0}")]
    ShareDb(#[from] share_db::ShareDbError),
}

/// Binds the tunnel and API listeners and starts serving.
pub async fn start(cfg: CloudConfig) -> Result<RunningCloud, CloudError> {
    let (tls, pin) = crate::tls::server_config(&cfg.cert, &cfg.key)?;
    let (listener, tunnel_addr) = bind(cfg.listen)?;
    let (api_listener, api_addr) = bind(cfg.api_listen)?;
    let dial_addr = match (cfg.dial, tunnel_addr) {
        (Some(d), _) => d,
        (None, SocketAddr::V4(a)) if !a.ip().is_unspecified() => a,
        (None, other) => return Err(CloudError::NoDialAddress(other)),
    };
    let shares = share::Shares::open(share_db::ShareDb::open(&cfg.share_db)?)?;
    let cloud = Arc::new(Cloud {
        cfg,
        dial_addr,
        asked: Mutex::new(HashMap::new()),
        used: Mutex::new(HashMap::new()),
        asking: AtomicUsize::new(0),
        tunnels: Mutex::new(BTreeMap::new()),
        jobs: Mutex::new(HashMap::new()),
        workers: Mutex::new(HashMap::new()),
        shares,
        sync_locks: sync::SyncLocks::default(),
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(dial::accept_loop(
        cloud.clone(),
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
    ));
    tasks.spawn(api::serve(cloud.clone(), api_listener));
    if !cloud.cfg.share_devices.is_empty() {
        tasks.spawn(sync::periodic(cloud.clone()));
    }
    Ok(RunningCloud {
        tunnel_addr,
        api_addr,
        pin,
        cloud,
        tasks,
    })
}
