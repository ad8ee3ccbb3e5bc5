//! The relay side of a connection, low level: dial a server over TLS pinned to its key,
//! log in, dial a cloud server with a ticket. The load mode is built on these, the
//! simulated relay's connections on [`tls_connect`], and tests use them to break the
//! protocol on purpose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duplex_tunnel::{
    control_decoder, login_proof, tunnel_decoder, CloudToRelay, MediatorToRelay, RelayToCloud,
    RelayToMediator, Ticket, KEY_LEN, PROTOCOL_VERSION,
};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::wire::{Framed, WireError};

/// A control session, relay side.
pub type ControlConn = Framed<TlsStream<TcpStream>, MediatorToRelay>;
/// A tunnel, relay side.
pub type TunnelConn = Framed<TlsStream<TcpStream>, CloudToRelay>;

/// Read buffer of a simulated control session.
const CONTROL_READ_BUF: usize = 512;
/// Read buffer of a simulated tunnel.
const TUNNEL_READ_BUF: usize = 16 * 1024;
/// Longest a TCP connect and TLS handshake may take.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Why a relay-side connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] crate::tls::TlsError),
    #[error("cannot start the simulated relay: {0}")]
    Setup(String),
}

/// TCP and TLS to `addr`, trusting the key `config` pins, within [`CONNECT_LIMIT`].
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, SimError> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| SimError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(addr.ip().into());
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| SimError::Tls { addr, source })
    };
    tokio::time::timeout(CONNECT_LIMIT, fut)
        .await
        .map_err(|_| SimError::Timeout(addr))?
}

/// A control connection to the mediator at `addr`.
pub async fn connect_control(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<ControlConn, SimError> {
    Ok(Framed::new(
        tls_connect(addr, config).await?,
        control_decoder(),
        CONTROL_READ_BUF,
    ))
}

/// A tunnel connection to the cloud server at `addr`.
pub async fn connect_tunnel(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<TunnelConn, SimError> {
    Ok(Framed::new(
        tls_connect(addr, config).await?,
        tunnel_decoder(),
        TUNNEL_READ_BUF,
    ))
}

/// `Hello`, `Challenge`, `Login`: returns the server's answer (`Welcome` or `Refused`).
pub async fn login(
    conn: &mut ControlConn,
    relay_id: &str,
    secret: &[u8; KEY_LEN],
    devices: &[String],
) -> Result<MediatorToRelay, SimError> {
    conn.send(&RelayToMediator::Hello {
        version: PROTOCOL_VERSION,
        relay_id: relay_id.to_string(),
    })
    .await?;
    let nonce = match conn.recv_within(CONNECT_LIMIT).await? {
        MediatorToRelay::Challenge { nonce } => nonce,
        refused @ MediatorToRelay::Refused { .. } => return Ok(refused),
        other => return Err(SimError::Unexpected(format!("{other:?}"))),
    };
    conn.send(&RelayToMediator::Login {
        proof: login_proof(secret, relay_id, &nonce),
        devices: devices.to_vec(),
    })
    .await?;
    Ok(conn.recv_within(CONNECT_LIMIT).await?)
}

/// Dials a cloud server with `ticket`: its answer (`DialOk` or `DialRefused`) and the
/// connection.
pub async fn dial(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    ticket: &Ticket,
) -> Result<(CloudToRelay, TunnelConn), SimError> {
    let mut conn = connect_tunnel(addr, config).await?;
    conn.send(&RelayToCloud::Dial {
        version: PROTOCOL_VERSION,
        ticket: ticket.clone(),
    })
    .await?;
    let answer = conn.recv_within(CONNECT_LIMIT).await?;
    Ok((answer, conn))
}
