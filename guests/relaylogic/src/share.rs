//! Share tunnels (`docs/shared-data.md`, "Transport"; `docs/relay.md`): a cloud server
//! that sent `SyncOpen {device_id}` on an open tunnel talks to the controller's share
//! service through the relay. The relay is a bridge, strictly alternating, one request in
//! flight:
//!
//! * `SyncOpen` → `HostRequest::ShareOpen {device_id}` to the controller;
//! * each `HostReply::ShareSend {bytes}` → `RelayToCloud::Share {bytes}` to the cloud;
//! * the cloud's `CloudToRelay::Share {bytes}` → `HostRequest::ShareAnswer {bytes}`;
//! * `HostReply::ShareDone` → `RelayToCloud::Share` with the body of
//!   `duplex_docs::DeviceToCloud::Done` ([`SHARE_DONE_BODY`]); the cloud then sends
//!   `Close`, answered `Closed` as for jobs.
//!
//! Refused (`Error`, then the tunnel closes): `SyncOpen` for a device the relay does not
//! serve or that is not the ticket's (403), a second share tunnel while one is under way
//! (429), a share while the controller link is down or when it drops (503), a `Share`
//! frame out of turn (before `SyncOpen`, while the controller has the turn, after
//! `Done`: 400), a `Job` on a share tunnel (400). A controller `Error` ends the tunnel
//! with the controller's code and message.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use duplex_link::{HostReply, HostRequest};
use duplex_tunnel::{error_code, RelayToCloud};

use crate::action::Action;
use crate::controller::{CtlState, Pending, PendingKind};
use crate::relay::Relay;

/// The postcard body of `duplex_docs::DeviceToCloud::Done` (variant 2), sent when the
/// controller answers `ShareDone`.
pub const SHARE_DONE_BODY: &[u8] = &[2];

/// Where a share tunnel's exchange is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SharePhase {
    /// A request (`ShareOpen` or `ShareAnswer`) is at the controller.
    Controller,
    /// The controller's message went to the cloud; its `Share` answer is awaited.
    Cloud,
    /// `Done` went to the cloud; its `Close` is awaited.
    Done,
}

/// A protocol error on a tunnel: code and message of the `Error` sent before closing.
type Broken = (u16, String);

impl Relay {
    /// `SyncOpen {device_id}` on open tunnel `i`.
    pub(crate) fn sync_open(&mut self, i: usize, device_id: String) -> Result<(), Broken> {
        let t = &self.tunnels[i];
        if t.job.is_some() || t.share.is_some() {
            return Err((
                error_code::MALFORMED,
                "SyncOpen on a tunnel that is busy".to_string(),
            ));
        }
        if !self.cfg.devices.contains(&device_id) || device_id != t.ticket_device() {
            return Err((
                error_code::DEVICE_NOT_SERVED,
                format!(
                    "device {device_id} is not served on this tunnel (relay {}, ticket for {})",
                    self.cfg.relay_id,
                    t.ticket_device()
                ),
            ));
        }
        if self.tunnels.iter().any(|t| t.share.is_some()) {
            return Err((
                error_code::TOO_MANY,
                "another share tunnel is under way".to_string(),
            ));
        }
        let id = t.id;
        self.log(format!("tunnel {id}: share sync for {device_id}"));
        self.share_request(i, HostRequest::ShareOpen { device_id })
    }

    /// The cloud's `Share {bytes}` on open tunnel `i`.
    pub(crate) fn share_from_cloud(&mut self, i: usize, bytes: Vec<u8>) -> Result<(), Broken> {
        match self.tunnels[i].share {
            Some(SharePhase::Cloud) => self.share_request(i, HostRequest::ShareAnswer { bytes }),
            phase => Err((
                error_code::MALFORMED,
                format!("Share frame out of turn ({phase:?})"),
            )),
        }
    }

    /// Sends `req` for tunnel `i` to the controller (503 if the link is down).
    fn share_request(&mut self, i: usize, req: HostRequest) -> Result<(), Broken> {
        if self.ctl != CtlState::Up {
            return Err((
                error_code::DEVICE_UNAVAILABLE,
                "the controller is not connected".to_string(),
            ));
        }
        let t = &mut self.tunnels[i];
        t.share = Some(SharePhase::Controller);
        self.pending.push_back(Pending {
            tunnel: t.id,
            job_id: String::new(),
            kind: PendingKind::Share,
        });
        self.push(Action::ControllerSend(req));
        Ok(())
    }

    /// The controller's reply to a share request of tunnel `tunnel`.
    pub(crate) fn share_reply(&mut self, tunnel: u64, reply: HostReply, now: u64) {
        let Some(i) = self
            .tunnels
            .iter()
            .position(|t| t.id == tunnel && t.share == Some(SharePhase::Controller))
        else {
            // The tunnel closed meanwhile: the reply is dropped (the controller starts
            // afresh on the next `ShareOpen`).
            if !matches!(
                reply,
                HostReply::ShareSend { .. } | HostReply::ShareDone | HostReply::Error { .. }
            ) {
                self.on_controller_malformed("an unexpected reply to a share request", now);
            }
            return;
        };
        let conn = self.tunnels[i].conn;
        self.tunnels[i].heard = now;
        match reply {
            HostReply::ShareSend { bytes } => {
                self.tunnels[i].share = Some(SharePhase::Cloud);
                self.send_frame(conn, &RelayToCloud::Share { bytes });
            }
            HostReply::ShareDone => {
                self.tunnels[i].share = Some(SharePhase::Done);
                self.log(format!("tunnel {tunnel}: share sync done"));
                let bytes = SHARE_DONE_BODY.to_vec();
                self.send_frame(conn, &RelayToCloud::Share { bytes });
            }
            HostReply::Error { code, message } => {
                self.log(format!(
                    "tunnel {tunnel}: share refused by the controller: {code} {message}"
                ));
                self.tunnel_broken(conn, code, format!("controller: {message}"));
            }
            other => {
                let why = format!("unexpected reply {other:?} to a share request");
                self.on_controller_malformed(&why, now);
            }
        }
    }

    /// The controller link is gone: share tunnels not done end with 503.
    pub(crate) fn shares_lost(&mut self) {
        let conns: Vec<_> = self
            .tunnels
            .iter()
            .filter(|t| matches!(t.share, Some(SharePhase::Controller | SharePhase::Cloud)))
            .map(|t| t.conn)
            .collect();
        for conn in conns {
            self.tunnel_broken(
                conn,
                error_code::DEVICE_UNAVAILABLE,
                "the controller link was lost".to_string(),
            );
        }
    }
}
