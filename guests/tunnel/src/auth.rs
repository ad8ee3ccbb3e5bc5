//! Authentication: the relay's login proof and the one-time tunnel ticket, both
//! HMAC-SHA256 (`docs/tunnel-protocol.md#authentication`).
//!
//! Every MAC is over a domain-separation label and the postcard encoding of the fields it
//! covers, so a tag made for one purpose is never valid for another. Tags are compared in
//! constant time (`Mac::verify_slice`).

use alloc::string::String;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::msg::{CHALLENGE_LEN, KEY_LEN, TICKET_NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Label of the login proof's MAC.
const LOGIN_LABEL: &[u8] = b"duplex-tunnel/v1/login";
/// Label of a ticket's MAC.
const TICKET_LABEL: &[u8] = b"duplex-tunnel/v1/ticket";

fn mac_over(key: &[u8; KEY_LEN], label: &[u8], fields: &impl Serialize) -> HmacSha256 {
    // HMAC takes keys of any length; a 32-byte key cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 accepts a 32-byte key"),
    };
    mac.update(label);
    // The fields are small, fixed-shape structures: encoding cannot fail.
    let bytes = postcard::to_allocvec(fields).unwrap_or_default();
    mac.update(&bytes);
    mac
}

#[derive(Serialize)]
struct LoginFields<'a> {
    relay_id: &'a str,
    challenge: &'a [u8; CHALLENGE_LEN],
}

/// The relay's answer to a challenge: HMAC-SHA256 under its secret of
/// `"duplex-tunnel/v1/login"` ‖ postcard(`relay_id`, `challenge`).
pub fn login_proof(
    secret: &[u8; KEY_LEN],
    relay_id: &str,
    challenge: &[u8; CHALLENGE_LEN],
) -> [u8; KEY_LEN] {
    mac_over(
        secret,
        LOGIN_LABEL,
        &LoginFields {
            relay_id,
            challenge,
        },
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Whether `proof` is [`login_proof`] of these inputs (compared in constant time).
pub fn verify_login_proof(
    secret: &[u8; KEY_LEN],
    relay_id: &str,
    challenge: &[u8; CHALLENGE_LEN],
    proof: &[u8; KEY_LEN],
) -> bool {
    mac_over(
        secret,
        LOGIN_LABEL,
        &LoginFields {
            relay_id,
            challenge,
        },
    )
    .verify_slice(proof)
    .is_ok()
}

/// What a ticket says: which tunnel, for which relay and device, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketBody {
    pub tunnel_id: u64,
    pub relay_id: String,
    pub device_id: String,
    /// Random, fresh per ticket.
    pub nonce: [u8; TICKET_NONCE_LEN],
    /// Expiry, in milliseconds since the Unix epoch (the servers' clock).
    pub expires_ms: u64,
}

/// A one-time, expiring permission for one relay to dial one cloud server for one tunnel:
/// the body and its HMAC-SHA256 under the ticket key the mediation server shares with
/// that cloud server. The relay cannot make or change one; it only carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub body: TicketBody,
    pub mac: [u8; KEY_LEN],
}

/// Why a ticket is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketError {
    /// The MAC does not match (forged, altered, or another key).
    BadMac,
    /// `expires_ms` is past.
    Expired,
}

impl core::fmt::Display for TicketError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TicketError::BadMac => "ticket MAC does not match",
            TicketError::Expired => "ticket expired",
        })
    }
}

impl Ticket {
    /// Signs `body` with `key`.
    pub fn sign(key: &[u8; KEY_LEN], body: TicketBody) -> Ticket {
        let mac = mac_over(key, TICKET_LABEL, &body)
            .finalize()
            .into_bytes()
            .into();
        Ticket { body, mac }
    }

    /// Checks the MAC under `key` (constant time), then the expiry against `now_ms`.
    /// Whether it was used before is the verifier's to remember (one use per tunnel id).
    pub fn verify(&self, key: &[u8; KEY_LEN], now_ms: u64) -> Result<(), TicketError> {
        mac_over(key, TICKET_LABEL, &self.body)
            .verify_slice(&self.mac)
            .map_err(|_| TicketError::BadMac)?;
        if now_ms >= self.body.expires_ms {
            return Err(TicketError::Expired);
        }
        Ok(())
    }
}

/// Parses 64 hex digits (either case) as a 32-byte key; `None` for anything else.
pub fn parse_key(hex: &str) -> Option<[u8; KEY_LEN]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 2 * KEY_LEN {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        key[i] = (hi * 16 + lo) as u8;
    }
    Some(key)
}
