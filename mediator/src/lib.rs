//! `duplex-mediator`: the host side of the Duplex tunnel protocol
//! (`docs/tunnel-protocol.md`; running it: `docs/mediator.md`).
//!
//! * [`server`]: the **mediation server** relays keep a control session to, with the HTTP
//!   API cloud servers ask for tunnels with, and its [`store`] of leases and tunnel records.
//! * [`cloud`]: a reference **cloud print service** that asks for tunnels, accepts relays'
//!   dial-backs with one-time tickets and sends print jobs through them.
//! * [`sim`]: a **simulated relay**, the relay firmware's own logic (`duplex-relay`) with
//!   the device's controller and engine logic in process, so both servers are tested end
//!   to end without KVM (and a load mode holding thousands of sessions).
//! * Plumbing: [`tls`] (TLS 1.3, key pinning), [`pin`] (keys and pins), [`wire`] (frames
//!   over async streams), [`http`] (a tiny JSON client), [`util`].

pub mod cloud;
pub mod http;
pub mod pin;
pub mod server;
pub mod sim;
pub mod store;
pub mod tls;
pub mod util;
pub mod wire;
