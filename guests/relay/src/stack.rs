//! The relay's network side: smoltcp over the virtio-net card, and one TCP socket with a
//! pinned-key TLS session ([`TlsSession`]) per connection the logic asked for.
//!
//! [`Stack::poll`] runs smoltcp, moves ciphertext between each socket and its TLS session,
//! runs the sessions, and reports what the logic must hear ([`NetEvent`]). A connection
//! the logic closed is kept until its last bytes and the TLS `close_notify` are out and the
//! socket has closed (at most [`CLOSE_GRACE_MS`]); one that failed is aborted (a reset) and
//! dropped shortly after. [`Stack::reset`] drops everything — sockets, ARP cache, routes — and builds the
//! interface again: what a restore from a snapshot and a wake from sleep need, since no
//! peer remembers these connections any more. [`Stack::send_magic`] broadcasts a
//! Wake-on-LAN magic packet (UDP) for the substitute role.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use duplex_relay::entropy::RdRand;
use duplex_relay::tls::TlsSession;
use duplex_relay::{ConnId, NetConfig};
use duplex_runtime::time::raw_tsc;
use duplex_tunnel::{magic_packet, Endpoint, WAKE_UDP_PORT};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use crate::netdev::NetDevice;
use crate::profile::{since, CardTicks, Profile};

/// Receive buffer of a tunnel's TCP socket: 256 KiB, so the window the relay offers
/// (scaled: RFC 7323, which smoltcp negotiates for buffers over 64 KiB) covers what the
/// card holds (128 frames, 190 KiB) while the relay decrypts. (512 KiB measured slower: the
/// sender then never waits, the card is refilled frame by frame as the relay gives buffers
/// back, and every batch given back costs an exit.)
pub const TUNNEL_RX_BUFFER: usize = 256 * 1024;
/// Receive buffer of the control session's socket (small frames only).
pub const SESSION_RX_BUFFER: usize = 64 * 1024;
/// Send buffer of each TCP socket.
pub const SOCKET_TX_BUFFER: usize = 64 * 1024;
/// How long a closed connection may take to send its last bytes and close.
pub const CLOSE_GRACE_MS: u64 = 2_000;
/// How long an aborted socket stays, so that its reset goes out.
const ABORT_LINGER_MS: u64 = 200;
/// Local TCP ports: the IANA dynamic range.
const PORT_FIRST: u16 = 49152;
/// Rounds of "smoltcp, then sessions" per poll while something moves.
const MAX_ROUNDS: usize = 16;

/// What the logic must hear about a connection.
pub enum NetEvent {
    /// The TLS handshake is done and the server proved the pinned key.
    Connected(ConnId),
    /// Decrypted bytes.
    Data(ConnId, Vec<u8>),
    /// The connection failed or the peer closed it; why.
    Closed(ConnId, String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// In use by the logic; `reported` once `Connected` was sent.
    Active { reported: bool },
    /// Closed by the logic: flush, close, then drop (by the deadline at the latest).
    Closing { deadline: u64, fin_sent: bool },
    /// Aborted: dropped at the deadline (after the reset went out).
    Dying { deadline: u64 },
}

struct Slot {
    id: ConnId,
    handle: SocketHandle,
    tls: TlsSession,
    state: SlotState,
    /// The TCP connection was established at some point.
    established: bool,
    /// The connection could not even start (reported as `Closed`).
    failed: Option<String>,
}

/// smoltcp, its sockets, and the connections' TLS sessions.
pub struct Stack {
    device: NetDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<Slot>,
    cfg: NetConfig,
    next_port: u16,
    rng: RdRand,
}

fn instant(now_ms: u64) -> Instant {
    Instant::from_millis(i64::try_from(now_ms).unwrap_or(i64::MAX))
}

fn ipv4(b: [u8; 4]) -> Ipv4Address {
    Ipv4Address::new(b[0], b[1], b[2], b[3])
}

/// The interface: the card's MAC, the configured address and default route.
fn build_iface(device: &mut NetDevice, cfg: &NetConfig, seed: u64, now_ms: u64) -> Interface {
    let mac = EthernetAddress(device.mac());
    let mut config = Config::new(HardwareAddress::Ethernet(mac));
    config.random_seed = seed;
    let mut iface = Interface::new(config, device, instant(now_ms));
    iface.update_ip_addrs(|addrs| {
        // A fresh interface has no address; one always fits.
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ipv4(cfg.ip)), cfg.prefix_len));
    });
    if let Some(gw) = cfg.gateway {
        // A fresh route table always has room for the default route.
        let _ = iface.routes_mut().add_default_ipv4_route(ipv4(gw));
    }
    iface
}

impl Stack {
    pub fn new(mut device: NetDevice, cfg: NetConfig, mut rng: RdRand, now_ms: u64) -> Self {
        let iface = build_iface(&mut device, &cfg, rng.random(), now_ms);
        let next_port = PORT_FIRST + (rng.random() % 8192) as u16;
        Stack {
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
            slots: Vec::new(),
            cfg,
            next_port,
            rng,
        }
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.device.mac()
    }

    /// Drops every connection and the interface's state (ARP cache, sockets), silently.
    pub fn reset(&mut self, now_ms: u64) {
        self.slots.clear();
        self.sockets = SocketSet::new(Vec::new());
        let seed = self.rng.random();
        self.iface = build_iface(&mut self.device, &self.cfg, seed, now_ms);
        self.next_port = PORT_FIRST + (self.rng.random() % 8192) as u16;
    }

    /// Connections still held (in use, or closing / aborted and not yet dropped).
    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    /// Broadcasts the Wake-on-LAN magic packet for `mac` as one UDP datagram to
    /// 255.255.255.255 port [`WAKE_UDP_PORT`] (smoltcp sends the limited broadcast to
    /// `ff:ff:ff:ff:ff:ff` without ARP), from a fresh local port; `Ok` once the card took
    /// the frame.
    pub fn send_magic(&mut self, mac: [u8; 6], now_ms: u64) -> Result<(), String> {
        let packet = magic_packet(mac);
        let mut socket = udp::Socket::new(
            // Nothing is received on it.
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 1], Vec::new()),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 1], vec![0; packet.len()]),
        );
        let port = self.port();
        socket
            .bind(port)
            .map_err(|e| format!("cannot bind UDP port {port}: {e}"))?;
        let to = (IpAddress::Ipv4(Ipv4Address::BROADCAST), WAKE_UDP_PORT);
        socket
            .send_slice(&packet, to)
            .map_err(|e| format!("cannot queue the datagram: {e}"))?;
        let handle = self.sockets.add(socket);
        // Sends it (and whatever else is due; the sockets' news is read by the next poll).
        self.iface
            .poll(instant(now_ms), &mut self.device, &mut self.sockets);
        let left = self.sockets.get::<udp::Socket>(handle).send_queue();
        self.sockets.remove(handle);
        if left == 0 {
            Ok(())
        } else {
            Err("the network card did not take the frame".into())
        }
    }

    fn port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if p == u16::MAX { PORT_FIRST } else { p + 1 };
        p
    }

    /// Opens connection `id` to `to`, with a TLS session pinning `pin` and a receive buffer
    /// of `rx_buffer` bytes. A failure to even start is reported by the next
    /// [`Stack::poll`] as `Closed`.
    pub fn dial(&mut self, id: ConnId, to: Endpoint, pin: [u8; 32], rx_buffer: usize) {
        let mut socket = Socket::new(
            SocketBuffer::new(vec![0u8; rx_buffer]),
            SocketBuffer::new(vec![0u8; SOCKET_TX_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        let port = self.port();
        let remote = (IpAddress::Ipv4(ipv4(to.ip)), to.port);
        let started = socket.connect(self.iface.context(), remote, port);
        let handle = self.sockets.add(socket);
        self.slots.push(Slot {
            id,
            handle,
            tls: TlsSession::client(pin, self.rng),
            state: SlotState::Active { reported: false },
            established: false,
            // Reported by the next poll, so the logic hears it after this action.
            failed: started.err().map(|e| format!("cannot connect: {e}")),
        });
    }

    /// Queues bytes on connection `id`.
    pub fn send(&mut self, id: ConnId, bytes: &[u8]) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == id) {
            s.tls.write(bytes);
        }
    }

    /// Closes connection `id` once what is queued has gone out.
    pub fn close(&mut self, id: ConnId, now_ms: u64) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == id) {
            if let SlotState::Active { .. } = s.state {
                s.tls.close();
                s.state = SlotState::Closing {
                    deadline: now_ms.saturating_add(CLOSE_GRACE_MS),
                    fin_sent: false,
                };
            }
        }
    }

    /// The card's time counters.
    pub fn card_ticks(&self) -> &CardTicks {
        self.device.ticks()
    }

    /// Whether a frame is waiting on the card.
    pub fn has_frame(&self) -> bool {
        self.device.has_frame()
    }

    /// Runs the network until nothing moves; returns what the logic must hear, and
    /// whether anything moved at all.
    /// Time goes to `profile` (`smoltcp`, `tls`).
    pub fn poll(&mut self, now_ms: u64, profile: &mut Profile) -> (Vec<NetEvent>, bool) {
        let mut events = Vec::new();
        let mut any = false;
        for _ in 0..MAX_ROUNDS {
            let t0 = raw_tsc();
            let mut moved = self
                .iface
                .poll(instant(now_ms), &mut self.device, &mut self.sockets)
                == smoltcp::iface::PollResult::SocketStateChanged;
            let t1 = raw_tsc();
            profile.smoltcp += t1.saturating_sub(t0);
            moved |= self.service(now_ms, &mut events);
            profile.tls += since(t1);
            any |= moved;
            if !moved {
                break;
            }
        }
        (events, any)
    }

    /// Moves bytes between sockets and sessions once; true if anything moved.
    fn service(&mut self, now_ms: u64, events: &mut Vec<NetEvent>) -> bool {
        let mut moved = false;
        let mut i = 0;
        while i < self.slots.len() {
            let slot = &mut self.slots[i];
            let socket = self.sockets.get_mut::<Socket>(slot.handle);
            if matches!(socket.state(), State::Established) {
                slot.established = true;
            }
            moved |= pump(socket, &mut slot.tls);
            let remove = match slot.state {
                SlotState::Active { reported } => {
                    let closed_tcp = matches!(socket.state(), State::Closed | State::TimeWait);
                    if !reported && slot.tls.is_open() {
                        slot.state = SlotState::Active { reported: true };
                        events.push(NetEvent::Connected(slot.id));
                        moved = true;
                    }
                    let data = slot.tls.take_plaintext();
                    if !data.is_empty() {
                        events.push(NetEvent::Data(slot.id, data));
                        moved = true;
                    }
                    let why = slot
                        .failed
                        .take()
                        .or_else(|| slot.tls.ended().map(ToString::to_string))
                        .or_else(|| {
                            closed_tcp.then(|| {
                                if slot.established {
                                    "TCP connection closed".to_string()
                                } else {
                                    "TCP connection refused or unreachable".to_string()
                                }
                            })
                        });
                    if let Some(why) = why {
                        socket.abort();
                        events.push(NetEvent::Closed(slot.id, why));
                        slot.state = SlotState::Dying {
                            deadline: now_ms.saturating_add(ABORT_LINGER_MS),
                        };
                        moved = true;
                    }
                    false
                }
                SlotState::Closing { deadline, fin_sent } => {
                    // The session has sent `close_notify` (or ended otherwise) and the
                    // socket has taken every byte.
                    let flushed = slot.tls.ended().is_some() && slot.tls.ciphertext_pending() == 0;
                    if flushed && !fin_sent && slot.established {
                        socket.close();
                        slot.state = SlotState::Closing {
                            deadline,
                            fin_sent: true,
                        };
                        moved = true;
                    }
                    let done = matches!(socket.state(), State::Closed | State::TimeWait)
                        || !slot.established;
                    if now_ms >= deadline || (done && (fin_sent || !slot.established)) {
                        socket.abort();
                        true
                    } else {
                        false
                    }
                }
                SlotState::Dying { deadline } => now_ms >= deadline,
            };
            if remove {
                let handle = slot.handle;
                self.sockets.remove(handle);
                self.slots.remove(i);
                continue;
            }
            i += 1;
        }
        moved
    }

    /// When smoltcp or a closing connection next needs a poll (absolute ms).
    pub fn deadline(&mut self, now_ms: u64) -> Option<u64> {
        let smol = self
            .iface
            .poll_delay(instant(now_ms), &self.sockets)
            .map(|d| now_ms.saturating_add(d.total_millis()));
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Closing { deadline, .. } | SlotState::Dying { deadline } => {
                    Some(deadline)
                }
                SlotState::Active { .. } => None,
            })
            .chain(smol)
            .min()
    }
}

/// Runs one TLS session against its socket: ciphertext in, the session, ciphertext out.
/// Returns whether any byte moved.
fn pump(socket: &mut Socket<'static>, tls: &mut TlsSession) -> bool {
    let mut moved = false;
    while socket.can_recv() {
        let got = socket.recv(|buf| {
            tls.push_ciphertext(buf);
            (buf.len(), buf.len())
        });
        match got {
            Ok(n) if n > 0 => moved = true,
            _ => break,
        }
    }
    if !socket.may_recv() && matches!(socket.state(), State::CloseWait | State::LastAck) {
        tls.peer_closed();
    }
    let before = tls.ciphertext_pending();
    tls.poll();
    if socket.can_send() {
        tls.drain_ciphertext(|bytes| socket.send_slice(bytes).unwrap_or(0));
    }
    moved | (tls.ciphertext_pending() != before)
}
