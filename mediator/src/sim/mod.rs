//! A simulated relay (`duplex-relay-sim`): the relay firmware's own logic
//! ([`duplex_relay::Relay`]) run on the host by [`driver`], over the same TLS as the
//! firmware (TLS 1.3, `TLS_AES_128_GCM_SHA256`, `secp256r1`, pinned server keys, here
//! rustls), with the device's own controller and engine logic in process behind it
//! ([`device::FakeDevice`]). So the mediator's and the cloud's tests run against the code
//! the relay runs: its control session (login, heartbeats, reconnect with capped, jittered
//! backoff; an evicted relay waits the full cap), its tunnels and its jobs, its sleep (a
//! UDP socket stands in for the card's Wake-on-LAN filter: the magic packet for its MAC
//! wakes it) and its wakes of other relays as a substitute (magic packets sent over UDP,
//! loopback standing in for the LAN broadcast). [`load`] holds
//! thousands of bare sessions for the scale test; [`client`] has the low level steps tests
//! use to misbehave on purpose.

pub mod client;
pub mod device;
mod driver;
pub mod load;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use duplex_relay::config::{
    DEFAULT_CONTROLLER_CID, DEFAULT_HEARTBEAT_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS,
    DEFAULT_LOGIN_TIMEOUT_MS,
};
use duplex_relay::RelayConfig;
use duplex_tunnel::{Endpoint, Ticket, KEY_LEN};
use tokio::sync::watch;

use client::SimError;
use device::FakeDevice;

pub use duplex_relay::MAX_TUNNELS;

/// How a simulated relay is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The mediator (IPv4, as the firmware dials).
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
    /// The card's MAC (needed to sleep and to be woken).
    pub mac: Option<[u8; 6]>,
    /// The LAN segment (`segment=`): needed to sleep and to be a substitute.
    pub segment: Option<String>,
    /// Sleep after this long without tunnel work (`sleep_idle_ms=`).
    pub sleep_idle_ms: Option<u64>,
    /// The UDP address watched while asleep: the magic packet for `mac` wakes the relay.
    pub wake_listen: Option<SocketAddr>,
    /// Where magic packets go (`Action::SendMagic`); default the LAN broadcast
    /// `255.255.255.255:9`.
    pub wake_to: Option<SocketAddr>,
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
            backoff_base_ms: duplex_relay::backoff::DEFAULT_BASE_MS,
            backoff_max_ms: duplex_relay::backoff::DEFAULT_CAP_MS,
            mac: None,
            segment: None,
            sleep_idle_ms: None,
            wake_listen: None,
            wake_to: None,
        }
    }

    /// The relay logic's configuration (the firmware's defaults for the rest).
    fn relay_config(&self) -> Result<RelayConfig, SimError> {
        let SocketAddr::V4(mediator) = self.mediator else {
            return Err(SimError::Setup(format!(
                "the mediator must be an IPv4 address, not {}",
                self.mediator
            )));
        };
        if self.backoff_base_ms == 0 || self.backoff_max_ms < self.backoff_base_ms {
            return Err(SimError::Setup(format!(
                "backoff: base {} ms must be at least 1 and at most the cap {} ms",
                self.backoff_base_ms, self.backoff_max_ms
            )));
        }
        Ok(RelayConfig {
            relay_id: self.relay_id.clone(),
            secret: self.secret,
            devices: self.devices.clone(),
            mediator: Endpoint {
                ip: mediator.ip().octets(),
                port: mediator.port(),
            },
            mediator_pin: self.mediator_pin,
            cloud_pin: self.cloud_pin,
            controller_cid: DEFAULT_CONTROLLER_CID,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_ms: self.backoff_max_ms,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
            login_timeout_ms: DEFAULT_LOGIN_TIMEOUT_MS,
            segment: self.segment.clone(),
            sleep_idle_ms: self.sleep_idle_ms,
            mac: self.mac,
        })
    }
}

/// What a simulated relay saw (read from the mediator's frames).
#[derive(Debug, Default)]
pub struct SimStats {
    pub welcomes: AtomicU64,
    pub evictions: AtomicU64,
    pub refusals: AtomicU64,
    /// Whether the relay logic has a session up.
    pub online: AtomicBool,
    pub session_id: AtomicU64,
    pub pongs: AtomicU64,
    /// Every ticket received in a `TunnelRequest`.
    pub tickets: Mutex<Vec<Ticket>>,
    /// The last `Refused`, `Error` or `Evicted`: code (409 for `Evicted`) and message.
    pub last_end: Mutex<Option<(u16, String)>>,
    /// `SleepGranted` and `SleepRefused` received; the last refusal's code and message.
    pub sleep_grants: AtomicU64,
    pub sleep_refusals: AtomicU64,
    pub last_sleep_refusal: Mutex<Option<(u16, String)>>,
    /// `WakeRelay` received (as a substitute).
    pub wake_requests: AtomicU64,
    /// Times the relay went to sleep (`Action::Sleep`), and was woken by a magic packet.
    pub sleeps: AtomicU64,
    pub wakes: AtomicU64,
    /// Whether the relay is asleep now.
    pub asleep: AtomicBool,
    /// Magic packets sent (as a substitute), and send failures.
    pub magic_sent: AtomicU64,
    pub magic_failed: AtomicU64,
    /// Datagrams on the wake socket that woke nothing (not the magic packet for this MAC,
    /// or the relay was awake).
    pub magic_dropped: AtomicU64,
    /// TCP connections the relay asked for while asleep (there must be none).
    pub dials_asleep: AtomicU64,
}

/// A running simulated relay: the relay logic on a thread of its own (a single-threaded
/// tokio runtime: the logic is not `Send`), with its connections.
pub struct RelaySim {
    pub stats: Arc<SimStats>,
    pub device: Arc<FakeDevice>,
    /// The bound wake socket (`wake_listen`, its port resolved).
    pub wake_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl RelaySim {
    /// Starts a relay serving `device`.
    pub fn spawn(cfg: SimConfig, device: Arc<FakeDevice>) -> Result<RelaySim, SimError> {
        let stats = Arc::new(SimStats::default());
        let wake_socket = match cfg.wake_listen {
            Some(addr) => {
                let sock = UdpSocket::bind(addr)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|e| SimError::Setup(format!("wake socket {addr}: {e}")))?;
                Some(sock)
            }
            None => None,
        };
        let wake_addr = wake_socket.as_ref().and_then(|s| s.local_addr().ok());
        let setup = driver::Setup {
            wake_socket,
            wake_to: cfg.wake_to,
            mac: cfg.mac,
            cfg: cfg.relay_config()?,
            mediator_tls: crate::tls::pinned_client_config(cfg.mediator_pin)?,
            cloud_tls: crate::tls::pinned_client_config(cfg.cloud_pin)?,
            stats: stats.clone(),
            device: device.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SimError::Setup(format!("tokio runtime: {e}")))?;
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("relay-sim".into())
            .spawn(move || {
                rt.block_on(driver::run(setup, stop_rx));
                // Dropping the runtime drops the connections still open.
                drop(rt);
            })
            .map_err(|e| SimError::Setup(format!("thread: {e}")))?;
        Ok(RelaySim {
            stats,
            device,
            wake_addr,
            stop,
            thread,
        })
    }

    /// Whether the relay has a logged-in session.
    pub fn online(&self) -> bool {
        self.stats.online.load(Ordering::SeqCst)
    }

    /// Whether the relay is asleep.
    pub fn asleep(&self) -> bool {
        self.stats.asleep.load(Ordering::SeqCst)
    }

    /// Ends the relay as a crash would: connections dropped, no `Bye`. Returns once they
    /// are.
    pub async fn kill(self) {
        let _ = self.stop.send(true);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}
