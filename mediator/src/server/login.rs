//! The login of a control session (`docs/tunnel-protocol.md#rules`): TLS, `Hello` (the
//! version, 426), a fresh `Challenge`, `Login` checked against the registry (unknown relay
//! or wrong proof 401, devices 400/403). Every refusal is answered `Refused`, logged as
//! `login refused: relay <id>: <why> from <peer>`, and closes the connection.

use std::net::SocketAddr;

use duplex_tunnel::error_code as code;
use duplex_tunnel::{
    control_decoder, valid_id, verify_login_proof, MediatorToRelay, RelayToMediator,
    MAX_DEVICES_PER_RELAY, MAX_MESSAGE_LEN, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::session::{Conn, GOODBYE_LIMIT, READ_BUF};
use super::Mediator;
use crate::util::random_bytes;
use crate::wire::{Framed, WireError};

/// Cuts `text` to [`MAX_MESSAGE_LEN`] bytes, on a character boundary.
pub fn message(text: impl Into<String>) -> String {
    let mut s = text.into();
    if s.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Sends `Refused` and closes; logs why.
async fn refuse(mut conn: Conn, relay: &str, peer: SocketAddr, code: u16, why: &str) {
    log::warn!("login refused: relay {relay}: {why} from {peer}");
    let _ = conn
        .send_within(
            &MediatorToRelay::Refused {
                code,
                message: message(why),
            },
            GOODBYE_LIMIT,
        )
        .await;
    conn.shutdown(GOODBYE_LIMIT).await;
}

/// Refuses a frame that could not be read before login, if the relay caused it.
async fn refuse_bad_frame(conn: Conn, relay: &str, peer: SocketAddr, e: WireError) {
    match e.code() {
        Some(c) => refuse(conn, relay, peer, c, &e.to_string()).await,
        None => log::info!("login abandoned: relay {relay}: {e} from {peer}"),
    }
}

/// TLS, `Hello`, `Challenge`, `Login`: the relay id and its announced devices, or `None`
/// once refused.
pub async fn login(
    m: &Mediator,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(Conn, String, Vec<String>)> {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            log::info!("TLS handshake with {peer} failed: {e}");
            return None;
        }
    };
    let mut conn = Framed::new(tls, control_decoder(), READ_BUF);
    let (version, relay_id) = match conn.recv().await {
        Ok(RelayToMediator::Hello { version, relay_id }) => (version, relay_id),
        Ok(_) => {
            refuse(
                conn,
                "?",
                peer,
                code::MALFORMED,
                "the first frame must be Hello",
            )
            .await;
            return None;
        }
        Err(e) => {
            refuse_bad_frame(conn, "?", peer, e).await;
            return None;
        }
    };
    let shown = if valid_id(&relay_id) {
        relay_id.as_str()
    } else {
        "?"
    };
    if version != PROTOCOL_VERSION {
        let why = format!(
            "protocol version {version} is not supported (this server speaks {PROTOCOL_VERSION})"
        );
        refuse(conn, shown, peer, code::UNSUPPORTED_VERSION, &why).await;
        return None;
    }
    if !valid_id(&relay_id) {
        refuse(conn, shown, peer, code::MALFORMED, "invalid relay id").await;
        return None;
    }
    let nonce = random_bytes::<32>();
    if conn
        .send(&MediatorToRelay::Challenge { nonce })
        .await
        .is_err()
    {
        return None;
    }
    let (proof, devices) = match conn.recv().await {
        Ok(RelayToMediator::Login { proof, devices }) => (proof, devices),
        Ok(_) => {
            refuse(
                conn,
                &relay_id,
                peer,
                code::MALFORMED,
                "the second frame must be Login",
            )
            .await;
            return None;
        }
        Err(e) => {
            refuse_bad_frame(conn, &relay_id, peer, e).await;
            return None;
        }
    };
    let Some(entry) = m.relay(&relay_id) else {
        refuse(
            conn,
            &relay_id,
            peer,
            code::BAD_CREDENTIALS,
            "unknown relay",
        )
        .await;
        return None;
    };
    if !verify_login_proof(&entry.secret, &relay_id, &nonce, &proof) {
        refuse(
            conn,
            &relay_id,
            peer,
            code::BAD_CREDENTIALS,
            "wrong login proof",
        )
        .await;
        return None;
    }
    if devices.len() > MAX_DEVICES_PER_RELAY {
        let why = format!(
            "{} devices announced, at most {MAX_DEVICES_PER_RELAY}",
            devices.len()
        );
        refuse(conn, &relay_id, peer, code::MALFORMED, &why).await;
        return None;
    }
    if let Some(bad) = devices.iter().find(|d| !valid_id(d)) {
        let why = format!(
            "invalid device id {:?}",
            bad.chars().take(80).collect::<String>()
        );
        refuse(conn, &relay_id, peer, code::MALFORMED, &why).await;
        return None;
    }
    if let Some(d) = devices.iter().find(|d| !entry.devices.contains(d)) {
        let why = format!("device_not_served: {d} is not listed for this relay");
        refuse(conn, &relay_id, peer, code::DEVICE_NOT_SERVED, &why).await;
        return None;
    }
    let mut unique = Vec::with_capacity(devices.len());
    for d in devices {
        if !unique.contains(&d) {
            unique.push(d);
        }
    }
    Some((conn, relay_id, unique))
}
