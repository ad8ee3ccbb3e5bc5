//! `duplex-relay`: the relay partition's logic, without I/O (`docs/relay.md`,
//! `docs/tunnel-protocol.md`).
//!
//! * [`Relay`]: the state machine of a relay. It keeps the **control session** to the
//!   mediation server (dial → `Hello` → `Challenge` → `Login` → `Welcome`, heartbeats,
//!   reconnect forever with capped exponential backoff and equal jitter), opens a **tunnel**
//!   to a cloud server for each `TunnelRequest` (at most [`MAX_TUNNELS`]), receives jobs on
//!   it, submits each to the controller partition keyed by its job id, polls it to the end
//!   and returns the result, and starts afresh after a restore from a snapshot. With
//!   `sleep_idle_ms=` it asks the mediator for a sleep lease when idle and sleeps
//!   ([`Action::Sleep`], [`Relay::on_woken`]); with `segment=` it is a substitute that
//!   wakes sleeping relays of its LAN ([`Action::SendMagic`]). Time comes
//!   in as milliseconds, randomness as a closure; what the relay wants done comes out as
//!   [`Action`]s (dial, send, close, controller requests, console lines).
//! * [`config`]: the relay's command line (`relay_id=`, `secret=`, `devices=`, ...).
//! * [`backoff`]: the reconnect delay rule.
//! * [`tls`]: a TLS 1.3 client session (embedded-tls) driven without blocking, whose server
//!   key is **pinned**: the SHA-256 of the certificate's `SubjectPublicKeyInfo` must equal
//!   the configured pin, and the `CertificateVerify` signature must verify under that key.
//! * [`entropy`]: RDRAND, for the TLS random numbers and the reconnect jitter.
//!
//! `#![no_std]` with `alloc`; the firmware (`guests/relay`) moves bytes between these and
//! its network stack and vsock, and the tests run on the host.

#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod action;
pub mod backoff;
pub mod config;
mod controller;
pub mod entropy;
mod relay;
mod session;
mod share;
mod sleep;
pub mod tls;
mod tunnel;

pub use action::{Action, ConnId, Peer};
pub use backoff::Backoff;
pub use config::{ConfigError, NetConfig, RelayConfig};
pub use relay::{
    Relay, CONTROLLER_RETRY_MS, DIAL_TIMEOUT_MS, JOB_POLL_FIRST_MS, JOB_POLL_MS, MAX_TUNNELS,
};
pub use relay::{MAX_REPORTED_JOBS, TUNNEL_IDLE_MS};
pub use share::SHARE_DONE_BODY;
pub use sleep::mac_string;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_share;
#[cfg(test)]
mod tests_sleep;
#[cfg(test)]
mod tests_tunnel;
