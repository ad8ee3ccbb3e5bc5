//! Relays' dial-backs (`docs/tunnel-protocol.md#tunnel-relay--cloud-server`): TLS, then
//! `Dial` with a ticket, checked for its version (426), MAC (412), expiry (410), that the
//! cloud asked for this tunnel for this device (412), and that no dial used it before
//! (412). A good dial is answered `DialOk` and handed to the job worker waiting for it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use duplex_tunnel::error_code as code;
use duplex_tunnel::{
    tunnel_decoder, CloudToRelay, RelayToCloud, Ticket, TicketError, PROTOCOL_VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{Cloud, TunnelSeen};
use crate::server::login::message;
use crate::util::now_ms;
use crate::wire::Framed;

/// How long a relay has for TLS and its `Dial`.
const DIAL_LIMIT: Duration = Duration::from_secs(10);
/// How long a dial for an unknown tunnel id waits for a request under way to the mediator
/// (the relay can be faster than the mediator's answer).
const ASK_RACE_LIMIT: Duration = Duration::from_secs(3);
/// Read buffer of a tunnel.
const READ_BUF: usize = 16 * 1024;

/// A tunnel's connection.
pub type TunnelConn = Framed<TlsStream<TcpStream>, RelayToCloud>;

/// An open tunnel (after `DialOk`).
pub struct Tunnel {
    pub id: u64,
    pub device_id: String,
    pub conn: TunnelConn,
}

/// Accepts dial-backs until the task is dropped.
pub async fn accept_loop(cloud: Arc<Cloud>, listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let cloud = cloud.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(DIAL_LIMIT, accept(cloud, acceptor, tcp, peer))
                        .await
                        .is_err()
                    {
                        log::info!(
                            "dial refused: no Dial from {peer} within {} s",
                            DIAL_LIMIT.as_secs()
                        );
                    }
                });
            }
            Err(e) => {
                log::warn!("tunnel listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a ticket is refused: code and reason.
pub struct Refusal(pub u16, pub String);

/// Checks a `Dial` in the protocol's order; on success the tunnel id is marked used and
/// the waiting worker's channel is returned.
pub async fn check_dial(
    cloud: &Cloud,
    version: u16,
    ticket: &Ticket,
) -> Result<super::Asked, Refusal> {
    let id = ticket.body.tunnel_id;
    if version != PROTOCOL_VERSION {
        return Err(Refusal(
            code::UNSUPPORTED_VERSION,
            format!("protocol version {version} is not supported (this server speaks {PROTOCOL_VERSION})"),
        ));
    }
    let now = now_ms();
    match ticket.verify(&cloud.cfg.ticket_key, now) {
        Ok(()) => {}
        Err(TicketError::BadMac) => {
            return Err(Refusal(
                code::TICKET_REJECTED,
                format!("tunnel {id}: ticket MAC does not match"),
            ))
        }
        Err(TicketError::Expired) => {
            return Err(Refusal(
                code::TICKET_EXPIRED,
                format!(
                    "tunnel {id}: ticket expired {} ms ago",
                    now.saturating_sub(ticket.body.expires_ms)
                ),
            ))
        }
    }
    let started = tokio::time::Instant::now();
    loop {
        {
            let mut used = cloud.used();
            if used.contains_key(&id) {
                return Err(Refusal(
                    code::TICKET_REJECTED,
                    format!("tunnel {id}: ticket was used before"),
                ));
            }
            let mut asked = cloud.asked();
            if let Some(a) = asked.get(&id) {
                if a.device_id != ticket.body.device_id {
                    return Err(Refusal(
                        code::TICKET_REJECTED,
                        format!(
                            "tunnel {id}: asked for device {}, ticket names {}",
                            a.device_id, ticket.body.device_id
                        ),
                    ));
                }
                used.retain(|_, expires| *expires > now);
                used.insert(id, ticket.body.expires_ms);
                if let Some(a) = asked.remove(&id) {
                    return Ok(a);
                }
            }
        }
        if cloud.asking.load(Ordering::SeqCst) == 0 || started.elapsed() > ASK_RACE_LIMIT {
            return Err(Refusal(
                code::TICKET_REJECTED,
                format!("tunnel {id} was not asked for"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn accept(cloud: Arc<Cloud>, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            log::info!("dial refused: TLS handshake with {peer} failed: {e}");
            return;
        }
    };
    let mut conn: TunnelConn = Framed::new(tls, tunnel_decoder(), READ_BUF);
    let (version, ticket) = match conn.recv().await {
        Ok(RelayToCloud::Dial { version, ticket }) => (version, ticket),
        Ok(_) => {
            return refuse(
                conn,
                peer,
                Refusal(code::MALFORMED, "the first frame must be Dial".into()),
            )
            .await
        }
        Err(e) => match e.code() {
            Some(c) => return refuse(conn, peer, Refusal(c, e.to_string())).await,
            None => {
                log::info!("dial abandoned by {peer}: {e}");
                return;
            }
        },
    };
    let asked = match check_dial(&cloud, version, &ticket).await {
        Ok(a) => a,
        Err(r) => return refuse(conn, peer, r).await,
    };
    let id = ticket.body.tunnel_id;
    if conn
        .send(&CloudToRelay::DialOk { tunnel_id: id })
        .await
        .is_err()
    {
        log::info!("tunnel {id}: relay {peer} left before DialOk");
        return;
    }
    log::info!(
        "tunnel {id} open: relay {} device {} from {peer}",
        ticket.body.relay_id,
        ticket.body.device_id
    );
    cloud.tunnels().insert(
        id,
        TunnelSeen {
            tunnel_id: id,
            device_id: ticket.body.device_id.clone(),
            peer: peer.to_string(),
            opened_ms: now_ms(),
            closed_ms: None,
            jobs: Vec::new(),
            closed_by: None,
        },
    );
    let tunnel = Tunnel {
        id,
        device_id: ticket.body.device_id,
        conn,
    };
    if let Err(tunnel) = asked.waiter.send(tunnel) {
        // The worker gave up a moment ago: nothing to send.
        close(&cloud, tunnel).await;
    }
}

async fn refuse(mut conn: TunnelConn, peer: SocketAddr, Refusal(code, why): Refusal) {
    log::warn!("dial refused: {why} ({code}) from {peer}");
    let msg = CloudToRelay::DialRefused {
        code,
        message: message(why),
    };
    let _ = conn.send_within(&msg, Duration::from_secs(2)).await;
    conn.shutdown(Duration::from_secs(2)).await;
}

/// Sends `Close`, waits (10 s at most) for `Closed`, and records the end.
pub async fn close(cloud: &Cloud, mut tunnel: Tunnel) {
    let id = tunnel.id;
    let by = async {
        tunnel.conn.send(&CloudToRelay::Close).await.ok()?;
        loop {
            match tunnel.conn.recv().await {
                Ok(RelayToCloud::Closed { jobs }) => return Some(jobs),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), by).await {
        Ok(Some(jobs)) => {
            log::info!("tunnel {id}: relay answered Closed ({jobs} jobs)");
            cloud.tunnel_ended(id, "cloud");
        }
        _ => cloud.tunnel_ended(id, "lost"),
    }
    tunnel.conn.shutdown(Duration::from_secs(1)).await;
}
