//! The simulated relay's driver: what the relay firmware does around its logic, on the
//! host. The relay logic ([`duplex_relay::Relay`], sans-IO) decides everything; this
//! carries out its actions: a `Dial` becomes a tokio TCP connection with a rustls TLS
//! session pinned to the mediator's or the cloud servers' key
//! ([`crate::tls::pinned_client_config`]), `Send` and `Close` go to that connection's task,
//! the controller requests go to the in-process [`FakeDevice`], and the logic's timers run
//! at its [`Relay::next_deadline`]. Console lines go to the log as `sim <relay>: <line>`.
//! `Sleep` puts the relay to sleep: no timers, no connections, only the wake socket
//! watched, where the magic packet for its MAC calls [`Relay::on_woken`]; `SendMagic`
//! sends that packet over UDP to `wake_to` (default the LAN broadcast).
//!
//! The frames the mediator sends are also decoded here, read-only, for [`SimStats`].

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use duplex_link::controller::ClientId;
use duplex_link::{FrameDecoder, HostReply};
use duplex_relay::{Action, ConnId, Peer, Relay, RelayConfig};
use duplex_tunnel::error_code as code;
use duplex_tunnel::{control_decoder, magic_packet, MediatorToRelay, WAKE_UDP_PORT};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::client::tls_connect;
use super::device::FakeDevice;
use super::SimStats;

/// Read buffer of a connection.
const READ_BUF: usize = 16 * 1024;
/// Longest a close (the last bytes, then TLS `close_notify`) may take.
const CLOSE_LIMIT: Duration = Duration::from_secs(1);

/// What the driver needs to run a relay.
pub(crate) struct Setup {
    pub cfg: RelayConfig,
    pub mediator_tls: Arc<ClientConfig>,
    pub cloud_tls: Arc<ClientConfig>,
    pub stats: Arc<SimStats>,
    pub device: Arc<FakeDevice>,
    /// Watched while asleep (bound by the caller, non-blocking).
    pub wake_socket: Option<std::net::UdpSocket>,
    /// Where magic packets go.
    pub wake_to: Option<SocketAddr>,
    pub mac: Option<[u8; 6]>,
}

/// Largest datagram read from the wake socket (a magic packet is 102 bytes).
const WAKE_BUF: usize = 1500;

/// What a connection task reports.
enum Event {
    Connected(ConnId),
    Data(ConnId, Vec<u8>),
    Closed(ConnId, String),
}

/// What the driver asks of a connection task.
enum Cmd {
    Send(Vec<u8>),
    Close,
}

struct Driver {
    relay: Relay,
    relay_id: String,
    mediator_tls: Arc<ClientConfig>,
    cloud_tls: Arc<ClientConfig>,
    stats: Arc<SimStats>,
    device: Arc<FakeDevice>,
    start: Instant,
    events: mpsc::UnboundedSender<Event>,
    conns: HashMap<ConnId, mpsc::UnboundedSender<Cmd>>,
    /// The mediator's frames, decoded for the statistics.
    observed: HashMap<ConnId, FrameDecoder<MediatorToRelay>>,
    /// The controller connection (a client of the device).
    controller: Option<ClientId>,
    replies: VecDeque<HostReply>,
    wake_to: SocketAddr,
    mac: Option<[u8; 6]>,
}

/// Runs the relay until `stop` says so (or its sender is gone). Connections still open
/// are then dropped without a word, as in a crash, when the caller drops the runtime.
pub(crate) async fn run(setup: Setup, mut stop: watch::Receiver<bool>) {
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let relay_id = setup.cfg.relay_id.clone();
    let wake_socket = setup
        .wake_socket
        .and_then(|s| match UdpSocket::from_std(s) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("sim {relay_id}: wake socket: {e}");
                None
            }
        });
    let mut wake_buf = vec![0u8; WAKE_BUF];
    let mut d = Driver {
        relay: Relay::new(setup.cfg, Box::new(crate::util::random_u64), 0),
        relay_id,
        mediator_tls: setup.mediator_tls,
        cloud_tls: setup.cloud_tls,
        stats: setup.stats,
        device: setup.device,
        start: Instant::now(),
        events,
        conns: HashMap::new(),
        observed: HashMap::new(),
        controller: None,
        replies: VecDeque::new(),
        wake_to: setup
            .wake_to
            .unwrap_or(SocketAddr::from((Ipv4Addr::BROADCAST, WAKE_UDP_PORT))),
        mac: setup.mac,
    };
    loop {
        d.drain();
        let online = d.relay.session_id().is_some();
        d.stats.online.store(online, Ordering::SeqCst);
        let deadline = d
            .relay
            .next_deadline()
            .map(|ms| d.start + Duration::from_millis(ms));
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            Some(ev) = event_rx.recv() => d.on_event(ev),
            got = recv_wake(wake_socket.as_ref(), &mut wake_buf) => {
                if let Some(n) = got {
                    d.on_datagram(&wake_buf[..n]);
                }
            }
            _ = sleep_until(deadline) => {
                let now = d.now();
                d.relay.on_tick(now);
            }
        }
    }
    if let Some(c) = d.controller.take() {
        d.device.disconnect(c);
    }
    d.stats.online.store(false, Ordering::SeqCst);
}

/// A datagram's length from the wake socket, or forever without one (`None` after an
/// error).
async fn recv_wake(sock: Option<&UdpSocket>, buf: &mut [u8]) -> Option<usize> {
    match sock {
        Some(s) => s.recv_from(buf).await.ok().map(|(n, _)| n),
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// The relay's clock: milliseconds since the driver started.
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A datagram on the wake socket: the magic packet for this relay's MAC wakes it while
    /// asleep; anything else is dropped and counted.
    fn on_datagram(&mut self, bytes: &[u8]) {
        let magic = self.mac.is_some_and(|mac| bytes == magic_packet(mac));
        if magic && self.relay.is_sleeping() {
            log::info!("sim {}: magic packet received: waking", self.relay_id);
            self.stats.asleep.store(false, Ordering::SeqCst);
            self.stats.wakes.fetch_add(1, Ordering::SeqCst);
            let now = self.now();
            self.relay.on_woken("magic packet", now);
        } else {
            self.stats.magic_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Sends the magic packet for `mac` to `wake_to`.
    fn send_magic(&self, mac: [u8; 6]) -> Result<(), String> {
        let sock = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .map_err(|e| format!("UDP socket: {e}"))?;
        sock.set_broadcast(true)
            .map_err(|e| format!("SO_BROADCAST: {e}"))?;
        sock.send_to(&magic_packet(mac), self.wake_to)
            .map_err(|e| format!("send to {}: {e}", self.wake_to))?;
        Ok(())
    }

    fn on_event(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::Connected(conn) => {
                if self.conns.contains_key(&conn) {
                    self.relay.on_connected(conn, now);
                }
            }
            Event::Data(conn, bytes) => {
                if !self.conns.contains_key(&conn) {
                    return;
                }
                self.observe(conn, &bytes);
                self.relay.on_data(conn, &bytes, now);
            }
            Event::Closed(conn, why) => {
                self.observed.remove(&conn);
                if self.conns.remove(&conn).is_some() {
                    self.relay.on_closed(conn, &why, now);
                }
            }
        }
    }

    /// Carries out the relay's actions, and feeds it the controller's replies one at a
    /// time, until it has nothing more to do.
    fn drain(&mut self) {
        loop {
            let actions = self.relay.take_actions();
            if actions.is_empty() {
                let Some(reply) = self.replies.pop_front() else {
                    return;
                };
                let now = self.now();
                self.relay.on_controller_reply(reply, now);
                continue;
            }
            for a in actions {
                self.act(a);
            }
        }
    }

    fn act(&mut self, a: Action) {
        let now = self.now();
        match a {
            Action::Dial {
                conn,
                endpoint,
                peer,
            } => {
                if self.relay.is_sleeping() {
                    self.stats.dials_asleep.fetch_add(1, Ordering::SeqCst);
                }
                let addr = SocketAddr::from((endpoint.ip, endpoint.port));
                let tls = match peer {
                    Peer::Mediator => {
                        self.observed.insert(conn, control_decoder());
                        self.mediator_tls.clone()
                    }
                    Peer::Cloud => self.cloud_tls.clone(),
                };
                let (tx, rx) = mpsc::unbounded_channel();
                self.conns.insert(conn, tx);
                tokio::spawn(connection(conn, addr, tls, self.events.clone(), rx));
            }
            Action::Send { conn, bytes } => {
                if let Some(c) = self.conns.get(&conn) {
                    let _ = c.send(Cmd::Send(bytes));
                }
            }
            Action::Close { conn } => {
                self.observed.remove(&conn);
                if let Some(c) = self.conns.remove(&conn) {
                    let _ = c.send(Cmd::Close);
                }
            }
            Action::ControllerConnect => {
                if let Some(old) = self.controller.take() {
                    self.device.disconnect(old);
                }
                self.replies.clear();
                self.controller = Some(self.device.connect());
                self.relay.on_controller_connected(now);
            }
            Action::ControllerSend(req) => {
                let Some(client) = self.controller else {
                    return;
                };
                match self.device.request(client, req) {
                    Some(replies) => self.replies.extend(replies),
                    None => {
                        self.controller = None;
                        self.replies.clear();
                        self.relay.on_controller_closed(now);
                    }
                }
            }
            Action::ControllerClose => {
                if let Some(c) = self.controller.take() {
                    self.device.disconnect(c);
                }
                self.replies.clear();
            }
            Action::Log(line) => log::info!("sim {}: {line}", self.relay_id),
            Action::Sleep => {
                log::info!("sim {}: asleep", self.relay_id);
                self.stats.sleeps.fetch_add(1, Ordering::SeqCst);
                self.stats.asleep.store(true, Ordering::SeqCst);
            }
            Action::SendMagic { wake_id, mac } => {
                let result = self.send_magic(mac);
                match &result {
                    Ok(()) => self.stats.magic_sent.fetch_add(1, Ordering::SeqCst),
                    Err(_) => self.stats.magic_failed.fetch_add(1, Ordering::SeqCst),
                };
                self.relay.on_magic_sent(wake_id, result, now);
            }
        }
    }

    /// Counts what the mediator said on `conn`, if it is a control session.
    fn observe(&mut self, conn: ConnId, bytes: &[u8]) {
        let Some(dec) = self.observed.get_mut(&conn) else {
            return;
        };
        dec.push(bytes);
        let mut ended = false;
        while let Some(Ok(msg)) = dec.next_message() {
            let s = &self.stats;
            let set_end = |c: u16, m: String| {
                *s.last_end.lock().unwrap_or_else(|e| e.into_inner()) = Some((c, m));
            };
            match msg {
                MediatorToRelay::Welcome { session_id, .. } => {
                    s.session_id.store(session_id, Ordering::SeqCst);
                    s.welcomes.fetch_add(1, Ordering::SeqCst);
                }
                MediatorToRelay::Pong { .. } => {
                    s.pongs.fetch_add(1, Ordering::SeqCst);
                }
                MediatorToRelay::TunnelRequest { ticket, .. } => {
                    s.tickets
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ticket);
                }
                MediatorToRelay::Refused { code, message } => {
                    s.refusals.fetch_add(1, Ordering::SeqCst);
                    set_end(code, message);
                    ended = true;
                }
                MediatorToRelay::Evicted { message } => {
                    s.evictions.fetch_add(1, Ordering::SeqCst);
                    set_end(code::EVICTED, message);
                    ended = true;
                }
                MediatorToRelay::Error { code, message } => {
                    set_end(code, message);
                    ended = true;
                }
                MediatorToRelay::SleepGranted => {
                    s.sleep_grants.fetch_add(1, Ordering::SeqCst);
                }
                MediatorToRelay::SleepRefused { code, message } => {
                    s.sleep_refusals.fetch_add(1, Ordering::SeqCst);
                    *s.last_sleep_refusal
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some((code, message));
                }
                MediatorToRelay::WakeRelay { .. } => {
                    s.wake_requests.fetch_add(1, Ordering::SeqCst);
                }
                MediatorToRelay::Challenge { .. } => {}
            }
            if ended {
                break;
            }
        }
        if ended {
            self.observed.remove(&conn);
        }
    }
}

/// One connection: TCP and TLS to `addr`, then bytes both ways until either side closes.
async fn connection(
    conn: ConnId,
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    events: mpsc::UnboundedSender<Event>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut stream = match tls_connect(addr, tls).await {
        Ok(s) => s,
        Err(e) => {
            let _ = events.send(Event::Closed(conn, e.to_string()));
            return;
        }
    };
    if events.send(Event::Connected(conn)).is_err() {
        return;
    }
    let mut buf = vec![0u8; READ_BUF];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                let ev = match read {
                    Ok(0) => Event::Closed(conn, "closed by the peer".into()),
                    Ok(n) => Event::Data(conn, buf[..n].to_vec()),
                    Err(e) => Event::Closed(conn, e.to_string()),
                };
                let closed = matches!(ev, Event::Closed(..));
                if events.send(ev).is_err() || closed {
                    return;
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else {
                    // The relay is gone: the connection drops as in a crash.
                    return;
                };
                match write(&mut stream, cmd, &mut cmds).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let _ = tokio::time::timeout(CLOSE_LIMIT, stream.shutdown()).await;
                        return;
                    }
                    Err(e) => {
                        let _ = events.send(Event::Closed(conn, e.to_string()));
                        return;
                    }
                }
            }
        }
    }
}

/// Writes `first` and every command already queued, then flushes. `Ok(false)`: a `Close`
/// came (the bytes before it are written).
async fn write(
    stream: &mut TlsStream<TcpStream>,
    first: Cmd,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
) -> std::io::Result<bool> {
    let mut next = Some(first);
    while let Some(cmd) = next {
        match cmd {
            Cmd::Send(bytes) => stream.write_all(&bytes).await?,
            Cmd::Close => {
                stream.flush().await?;
                return Ok(false);
            }
        }
        next = cmds.try_recv().ok();
    }
    stream.flush().await?;
    Ok(true)
}
