//! A simulated relay (`duplex-relay-sim`): the relay side of the tunnel protocol on the
//! host, over the same TLS as the relay firmware (TLS 1.3, `TLS_AES_128_GCM_SHA256`,
//! `secp256r1`, pinned server keys), with a [`device::FakeDevice`] behind it. It keeps a
//! control session to the mediator (login, heartbeats, reconnect with capped, jittered
//! backoff; an evicted relay waits the full cap), serves tunnel requests ([`tunnel`]), and
//! [`load`] holds thousands of bare sessions for the scale test. [`client`] has the low
//! level steps tests use to misbehave on purpose.

pub mod client;
pub mod device;
pub mod load;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_tunnel::error_code as code;
use duplex_tunnel::{MediatorToRelay, RelayToMediator, Ticket, KEY_LEN};
use rustls::ClientConfig;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use client::{connect_control, login, ControlConn, SimError};
use device::FakeDevice;

/// Most tunnels a relay keeps open at once (more are `TunnelFailed 429`).
pub const MAX_TUNNELS: usize = 4;

/// How a simulated relay is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub mediator: SocketAddr,
    pub mediator_pin: [u8; 32],
    pub cloud_pin: [u8; 32],
    pub relay_id: String,
    pub secret: [u8; KEY_LEN],
    pub devices: Vec<String>,
    /// Reconnect backoff: first wait and cap (the relay firmware's `backoff_base_ms=`,
    /// `backoff_max_ms=`).
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Send heartbeats (off: a relay gone quiet, for the server's timeout).
    pub heartbeat: bool,
}

impl SimConfig {
    /// A relay with the firmware's defaults.
    pub fn new(
        mediator: SocketAddr,
        mediator_pin: [u8; 32],
        cloud_pin: [u8; 32],
        relay_id: &str,
        secret: [u8; KEY_LEN],
        devices: &[&str],
    ) -> Self {
        SimConfig {
            mediator,
            mediator_pin,
            cloud_pin,
            relay_id: relay_id.to_string(),
            secret,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            backoff_base_ms: 250,
            backoff_max_ms: 30_000,
            heartbeat: true,
        }
    }
}

/// What a simulated relay saw.
#[derive(Debug, Default)]
pub struct SimStats {
    pub welcomes: AtomicU64,
    pub evictions: AtomicU64,
    pub refusals: AtomicU64,
    pub online: AtomicBool,
    pub session_id: AtomicU64,
    pub pongs: AtomicU64,
    /// Every ticket received in a `TunnelRequest`.
    pub tickets: Mutex<Vec<Ticket>>,
    /// The last `Refused`, `Error` or `Evicted`: code (409 for `Evicted`) and message.
    pub last_end: Mutex<Option<(u16, String)>>,
}

/// A running simulated relay.
pub struct RelaySim {
    pub stats: Arc<SimStats>,
    pub device: Arc<FakeDevice>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RelaySim {
    /// Starts a relay serving `device`.
    pub fn spawn(cfg: SimConfig, device: Arc<FakeDevice>) -> Result<RelaySim, SimError> {
        let tls = crate::tls::pinned_client_config(cfg.mediator_pin)?;
        let cloud_tls = crate::tls::pinned_client_config(cfg.cloud_pin)?;
        let stats = Arc::new(SimStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let relay = Relay {
            cfg,
            tls,
            cloud_tls,
            stats: stats.clone(),
            device: device.clone(),
            tunnels: JoinSet::new(),
        };
        let task = tokio::spawn(relay.run(stop_rx));
        Ok(RelaySim {
            stats,
            device,
            stop,
            task,
        })
    }

    /// Whether the relay has a logged-in session.
    pub fn online(&self) -> bool {
        self.stats.online.load(Ordering::SeqCst)
    }

    /// Ends the relay as a crash would: connections dropped, no `Bye`.
    pub async fn kill(self) {
        let _ = self.stop.send(true);
        self.task.abort();
        let _ = self.task.await;
    }
}

struct Relay {
    cfg: SimConfig,
    tls: Arc<ClientConfig>,
    cloud_tls: Arc<ClientConfig>,
    stats: Arc<SimStats>,
    device: Arc<FakeDevice>,
    tunnels: JoinSet<()>,
}

/// How a session ended, for the reconnect delay.
enum Ended {
    /// Never got `Welcome`.
    NoLogin,
    /// Had a session.
    AfterWelcome,
    Evicted,
}

impl Relay {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let (report_tx, mut report_rx) = mpsc::unbounded_channel();
        let mut attempt: u32 = 0;
        loop {
            let ended = match self.session(&report_tx, &mut report_rx).await {
                Ok(e) => e,
                Err(e) => {
                    log::info!("sim {}: session: {e}", self.cfg.relay_id);
                    Ended::NoLogin
                }
            };
            self.stats.online.store(false, Ordering::SeqCst);
            let wait = match ended {
                Ended::Evicted => Duration::from_millis(self.cfg.backoff_max_ms),
                Ended::AfterWelcome => {
                    attempt = 0;
                    backoff(&self.cfg, 0)
                }
                Ended::NoLogin => {
                    attempt = attempt.saturating_add(1);
                    backoff(&self.cfg, attempt - 1)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn session(
        &mut self,
        report_tx: &mpsc::UnboundedSender<RelayToMediator>,
        report_rx: &mut mpsc::UnboundedReceiver<RelayToMediator>,
    ) -> Result<Ended, SimError> {
        let mut conn = connect_control(self.cfg.mediator, self.tls.clone()).await?;
        let (hb, hb_timeout) = match login(
            &mut conn,
            &self.cfg.relay_id,
            &self.cfg.secret,
            &self.cfg.devices,
        )
        .await?
        {
            MediatorToRelay::Welcome {
                session_id,
                heartbeat_ms,
                heartbeat_timeout_ms,
            } => {
                self.stats.session_id.store(session_id, Ordering::SeqCst);
                (heartbeat_ms, heartbeat_timeout_ms)
            }
            MediatorToRelay::Refused { code, message } => {
                log::info!("sim {}: refused {code}: {message}", self.cfg.relay_id);
                self.stats.refusals.fetch_add(1, Ordering::SeqCst);
                *self
                    .stats
                    .last_end
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((code, message));
                return Ok(Ended::NoLogin);
            }
            other => return Err(SimError::Unexpected(format!("{other:?}"))),
        };
        self.stats.welcomes.fetch_add(1, Ordering::SeqCst);
        self.stats.online.store(true, Ordering::SeqCst);
        let mut ping = tokio::time::interval(Duration::from_millis(u64::from(hb.max(1))));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let quiet = Duration::from_millis(u64::from(hb_timeout));
        let mut deadline = Instant::now() + quiet;
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = ping.tick(), if self.cfg.heartbeat => {
                    seq += 1;
                    conn.send(&RelayToMediator::Ping { seq }).await?;
                }
                msg = conn.recv() => {
                    deadline = Instant::now() + quiet;
                    if let Some(end) = self.handle(&mut conn, msg?, report_tx).await? {
                        return Ok(end);
                    }
                }
                Some(report) = report_rx.recv() => conn.send(&report).await?,
                Some(_) = self.tunnels.join_next(), if !self.tunnels.is_empty() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    log::info!("sim {}: mediator silent for {} ms", self.cfg.relay_id, quiet.as_millis());
                    return Ok(Ended::AfterWelcome);
                }
            }
        }
    }

    async fn handle(
        &mut self,
        conn: &mut ControlConn,
        msg: MediatorToRelay,
        report_tx: &mpsc::UnboundedSender<RelayToMediator>,
    ) -> Result<Option<Ended>, SimError> {
        let set_end = |c: u16, m: String| {
            *self
                .stats
                .last_end
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((c, m));
        };
        match msg {
            MediatorToRelay::Pong { .. } => {
                self.stats.pongs.fetch_add(1, Ordering::SeqCst);
            }
            MediatorToRelay::TunnelRequest {
                tunnel_id,
                device_id,
                cloud,
                ticket,
            } => {
                self.stats
                    .tickets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ticket.clone());
                let refuse = if !self.cfg.devices.contains(&device_id) {
                    Some((
                        code::DEVICE_NOT_SERVED,
                        format!("device {device_id} is not served here"),
                    ))
                } else if self.tunnels.len() >= MAX_TUNNELS {
                    Some((code::TOO_MANY, format!("{MAX_TUNNELS} tunnels open")))
                } else {
                    None
                };
                if let Some((code, message)) = refuse {
                    conn.send(&RelayToMediator::TunnelFailed {
                        tunnel_id,
                        code,
                        message,
                    })
                    .await?;
                    return Ok(None);
                }
                self.tunnels.spawn(tunnel::run(tunnel::TunnelJob {
                    tunnel_id,
                    device_id,
                    cloud: SocketAddr::from((cloud.ip, cloud.port)),
                    ticket,
                    cloud_tls: self.cloud_tls.clone(),
                    device: self.device.clone(),
                    reports: report_tx.clone(),
                }));
            }
            MediatorToRelay::Evicted { message } => {
                log::info!("sim {}: evicted: {message}", self.cfg.relay_id);
                self.stats.evictions.fetch_add(1, Ordering::SeqCst);
                set_end(code::EVICTED, message);
                return Ok(Some(Ended::Evicted));
            }
            MediatorToRelay::Error { code, message } => {
                log::info!("sim {}: error {code}: {message}", self.cfg.relay_id);
                set_end(code, message);
                return Ok(Some(Ended::AfterWelcome));
            }
            other => return Err(SimError::Unexpected(format!("{other:?}"))),
        }
        Ok(None)
    }
}

/// Attempt `n`'s wait: `min(cap, base * 2^n)` times a random factor in [0.5, 1.0).
pub fn backoff(cfg: &SimConfig, n: u32) -> Duration {
    let full = cfg
        .backoff_base_ms
        .saturating_mul(1u64 << n.min(20))
        .min(cfg.backoff_max_ms);
    let frac = crate::util::random_u64() % 1000;
    Duration::from_millis(full / 2 + full * frac / 2000)
}
