//! `duplex-tunnel`: the tunnel protocol of the Duplex relay (`docs/tunnel-protocol.md`).
//!
//! * [`msg`]: the messages of the two connections a relay makes — the **control session**
//!   to the mediation server ([`RelayToMediator`], [`MediatorToRelay`]) and a **tunnel** to
//!   a cloud server ([`RelayToCloud`], [`CloudToRelay`]) — with their limits, ports and
//!   error codes.
//! * [`auth`]: the relay's login proof (HMAC-SHA256 of the server's challenge under the
//!   relay's secret) and the one-time tunnel [`Ticket`] (HMAC-SHA256 under the key the
//!   mediation server shares with a cloud server).
//! * Framing is the print link's (`duplex_link::frame`: a `u32` little-endian length and a
//!   postcard body), with smaller limits: [`MAX_CONTROL_FRAME`], [`MAX_TUNNEL_FRAME`].
//!   [`control_decoder`] and [`tunnel_decoder`] make decoders with those limits.
//!
//! `#![no_std]` with `alloc`, so the relay firmware and the host servers share one
//! definition; tests run on the host.

#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod auth;
pub mod msg;
pub mod pin;

pub use auth::{login_proof, parse_key, verify_login_proof, Ticket, TicketBody, TicketError};
pub use duplex_link::{decode_body, encode, try_encode, FrameDecoder, FrameError};
pub use msg::*;
pub use pin::{certificate_pin, certificate_spki, spki_pin};

/// A decoder for frames a mediation server or relay reads on a control session.
pub fn control_decoder<T: serde::de::DeserializeOwned>() -> FrameDecoder<T> {
    FrameDecoder::with_limit(MAX_CONTROL_FRAME)
}

/// A decoder for frames a cloud server or relay reads on a tunnel.
pub fn tunnel_decoder<T: serde::de::DeserializeOwned>() -> FrameDecoder<T> {
    FrameDecoder::with_limit(MAX_TUNNEL_FRAME)
}

#[cfg(test)]
mod tests;
