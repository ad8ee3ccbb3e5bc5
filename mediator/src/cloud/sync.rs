//! Syncing a device's shares over a tunnel (`docs/shared-data.md`, "Transport"): the
//! cloud asks the mediator for a tunnel as for a job ([`super::ask::open_tunnel`]), sends
//! `SyncOpen {device_id}` on the dial, then answers the device's `Share` frames in order,
//! one answer each: `ListUsers` with a page of its users (as `GET /scim/v2/Users`),
//! `Sync` with the reply of the device's replica ([`super::share::Shares::apply`]), an
//! undecodable body with `Error 400` (the tunnel goes on); `Done` ends it (`Close`).
//! One sync per device at a time; `serve` can sync a list of devices periodically.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use duplex_docs::{CloudToDevice, DeviceToCloud};
use duplex_tunnel::{CloudToRelay, RelayToCloud};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::api::scim_page;
use super::ask::{open_tunnel, OpenError};
use super::dial::{close, Tunnel};
use super::jobs::ended_at_relay;
use super::share::ShareRevision;
use super::Cloud;

/// Default deadline of a sync, in seconds.
pub const DEFAULT_SYNC_TIMEOUT_S: u64 = 60;

/// How a sync ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// The device said `Done`; the tunnel was closed.
    Done,
    /// No tunnel, or it ended before `Done` (`error` says why).
    Failed,
}

/// What a sync did (`duplex-cloud sync`, `POST /v1/devices/{id}/sync`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncReport {
    pub device_id: String,
    pub state: SyncState,
    pub tunnel_id: Option<u64>,
    /// Cloud users sent (over all `ListUsers` pages).
    pub users_sent: u64,
    /// `ListUsers` requests answered.
    pub pages: u64,
    /// `Sync` messages answered.
    pub syncs: u64,
    /// `Error` answers (undecodable requests, a database that failed).
    pub errors: u64,
    /// The device's shares at the cloud and their revisions, after the sync.
    pub shares: Vec<ShareRevisionReport>,
    pub error: Option<String>,
    pub ms: u64,
}

/// A share's revision in a [`SyncReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRevisionReport {
    pub share_id: String,
    pub revision: u64,
}

impl From<ShareRevision> for ShareRevisionReport {
    fn from(r: ShareRevision) -> Self {
        ShareRevisionReport {
            share_id: r.share_id,
            revision: r.revision,
        }
    }
}

impl SyncReport {
    /// A failed sync of `device` with `error`.
    pub fn failed(device: &str, error: String) -> Self {
        SyncReport {
            device_id: device.to_string(),
            state: SyncState::Failed,
            tunnel_id: None,
            users_sent: 0,
            pages: 0,
            syncs: 0,
            errors: 0,
            shares: Vec::new(),
            error: Some(error),
            ms: 0,
        }
    }
}

/// One sync at a time per device.
#[derive(Default)]
pub struct SyncLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl SyncLocks {
    fn of(&self, device: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(device.to_string()).or_default().clone()
    }
}

/// Syncs `device` (waiting for a sync of it under way) within `timeout`.
pub async fn sync_device(cloud: &Arc<Cloud>, device: &str, timeout: Duration) -> SyncReport {
    let start = Instant::now();
    let deadline = start + timeout;
    let lock = cloud.sync_locks.of(device);
    let mut report = SyncReport::failed(device, String::new());
    let result = match tokio::time::timeout_at(deadline, lock.lock()).await {
        Err(_) => Err("another sync of the device did not end before the deadline".into()),
        Ok(_guard) => run(cloud, device, deadline, &mut report).await,
    };
    match result {
        Ok(()) => {
            report.state = SyncState::Done;
            report.error = None;
        }
        Err(why) => {
            log::warn!("sync of {device}: {why}");
            report.state = SyncState::Failed;
            report.error = Some(why);
        }
    }
    report.shares = cloud
        .shares
        .revisions(device)
        .into_iter()
        .map(Into::into)
        .collect();
    report.ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    log::info!(
        "sync of {device}: {:?}, {} users sent, {} syncs, shares {:?}",
        report.state,
        report.users_sent,
        report.syncs,
        report.shares
    );
    report
}

async fn run(
    cloud: &Arc<Cloud>,
    device: &str,
    deadline: Instant,
    report: &mut SyncReport,
) -> Result<(), String> {
    let mut tunnel = match open_tunnel(cloud, device, deadline).await {
        Ok((t, _wake)) => t,
        Err(OpenError::Deadline(why) | OpenError::Fatal(why)) => return Err(why),
        Err(OpenError::Record { error, .. }) => {
            report.tunnel_id = Some(error.tunnel_id);
            return Err(format!(
                "tunnel {} failed at the mediator: {}: {}",
                error.tunnel_id, error.code, error.message
            ));
        }
    };
    report.tunnel_id = Some(tunnel.id);
    if let Some(t) = cloud.tunnels().get_mut(&tunnel.id) {
        t.jobs.push("sync".into());
    }
    match tokio::time::timeout_at(deadline, serve(cloud, &mut tunnel, report)).await {
        Ok(Ok(())) => {
            close(cloud, tunnel).await;
            Ok(())
        }
        Ok(Err(why)) => {
            cloud.tunnel_ended(tunnel.id, "lost");
            tunnel.conn.shutdown(Duration::from_secs(1)).await;
            Err(why)
        }
        Err(_) => {
            cloud.tunnel_ended(tunnel.id, "lost");
            tunnel.conn.shutdown(Duration::from_secs(1)).await;
            Err("the device did not say Done before the deadline".into())
        }
    }
}

/// Encodes one answer as a `Share` frame's body.
fn body(msg: &CloudToDevice) -> Result<Vec<u8>, String> {
    let frame =
        duplex_link::try_encode(msg).map_err(|e| format!("cannot encode an answer: {e}"))?;
    Ok(frame
        .get(duplex_link::HEADER_LEN..)
        .unwrap_or_default()
        .to_vec())
}

/// Sends `SyncOpen` and answers the device until its `Done`.
async fn serve(cloud: &Cloud, tunnel: &mut Tunnel, report: &mut SyncReport) -> Result<(), String> {
    let lost = |e: crate::wire::WireError| format!("tunnel lost: {e}");
    let device = tunnel.device_id.clone();
    tunnel
        .conn
        .send(&CloudToRelay::SyncOpen {
            device_id: device.clone(),
        })
        .await
        .map_err(lost)?;
    let mut check = tokio::time::interval(Duration::from_millis(cloud.cfg.poll_ms));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        let msg = tokio::select! {
            biased;
            msg = tunnel.conn.recv() => msg.map_err(lost)?,
            _ = check.tick() => {
                if let Some(why) = ended_at_relay(cloud, tunnel.id).await {
                    return Err(why);
                }
                continue;
            }
        };
        let bytes = match msg {
            RelayToCloud::Share { bytes } => bytes,
            RelayToCloud::Error { code, message } => {
                return Err(format!("relay sent Error {code}: {message}"))
            }
            RelayToCloud::Closed { .. } => return Err("relay closed the tunnel before Done".into()),
            other => {
                log::warn!("tunnel {}: ignored {other:?}", tunnel.id);
                continue;
            }
        };
        let answer = match duplex_link::decode_body::<DeviceToCloud>(&bytes) {
            Err(_) => {
                report.errors += 1;
                CloudToDevice::Error {
                    code: duplex_docs::error_code::MALFORMED,
                    message: "not a DeviceToCloud message".into(),
                }
            }
            Ok(DeviceToCloud::Done) => return Ok(()),
            Ok(DeviceToCloud::ListUsers { start_index, count }) => {
                let page = scim_page(&cloud.cfg.users, Some(start_index), Some(count));
                report.pages += 1;
                report.users_sent += page.resources.len() as u64;
                CloudToDevice::Users(page)
            }
            Ok(DeviceToCloud::Sync(req)) => match cloud.shares.apply(&device, &req) {
                Ok(reply) => {
                    report.syncs += 1;
                    CloudToDevice::Sync(reply)
                }
                Err(e) => {
                    log::error!("sync of {device}: {e}");
                    report.errors += 1;
                    CloudToDevice::Error {
                        code: 500,
                        message: "the cloud cannot store the share now".into(),
                    }
                }
            },
        };
        let bytes = body(&answer)?;
        tunnel
            .conn
            .send(&CloudToRelay::Share { bytes })
            .await
            .map_err(lost)?;
    }
}

/// Syncs each of `cloud.cfg.share_devices` every `share_poll_ms`, until dropped.
pub async fn periodic(cloud: Arc<Cloud>) {
    let every = Duration::from_millis(cloud.cfg.share_poll_ms);
    let mut tasks = tokio::task::JoinSet::new();
    for device in cloud.cfg.share_devices.clone() {
        let cloud = cloud.clone();
        tasks.spawn(async move {
            loop {
                let timeout = every.max(Duration::from_secs(DEFAULT_SYNC_TIMEOUT_S));
                sync_device(&cloud, &device, timeout).await;
                tokio::time::sleep(every).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
