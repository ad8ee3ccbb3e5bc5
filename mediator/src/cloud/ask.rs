//! Asking the mediator for a tunnel (`POST /v1/devices/{id}/tunnels`, with backoff while
//! it is unreachable or busy) and waiting for the relay's dial-back, polling the record. A
//! record the mediator failed with a code of [`FATAL_TUNNEL_CODES`] (the device's relay is
//! asleep and cannot be woken) ends the job; other failures mean asking again.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::dial::Tunnel;
use super::jobs::{TunnelError, FATAL_TUNNEL_CODES};
use super::{Asked, Cloud};
use crate::http;

/// Why no tunnel could be had.
pub enum OpenError {
    Deadline(String),
    Fatal(String),
    /// The mediator failed the request with a code in [`FATAL_TUNNEL_CODES`].
    Record {
        error: TunnelError,
        wake: Option<Value>,
    },
}

/// A record's `wake`, unless null.
fn record_wake(rec: &Value) -> Option<Value> {
    rec.get("wake").filter(|w| !w.is_null()).cloned()
}

/// The record's error if it ends the job (a failed record with a fatal code).
fn fatal_record(id: u64, rec: &Value) -> Option<OpenError> {
    if rec.get("state").and_then(Value::as_str) != Some("failed") {
        return None;
    }
    let err = rec.get("error")?;
    let code = err.get("code").and_then(Value::as_str)?;
    FATAL_TUNNEL_CODES
        .contains(&code)
        .then(|| OpenError::Record {
            error: TunnelError {
                tunnel_id: id,
                code: code.to_string(),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            },
            wake: record_wake(rec),
        })
}

/// Tunnel `id`'s record at the mediator (`GET /v1/tunnels/{id}`), or `None` when the
/// mediator cannot be asked.
pub async fn fetch_record(cloud: &Cloud, id: u64) -> Option<Value> {
    let cfg = &cloud.cfg;
    let path = format!("/v1/tunnels/{id}");
    let r = http::request(
        &cfg.mediator,
        "GET",
        &path,
        Some(&cfg.token),
        None,
        Duration::from_secs(2),
    )
    .await
    .ok()?;
    Some(r.body)
}

/// The `wake` of tunnel `id`'s record at the mediator, if it has one.
async fn fetch_wake(cloud: &Cloud, id: u64) -> Option<Value> {
    record_wake(&fetch_record(cloud, id).await?)
}

/// Counts a request to the mediator under way (see [`super::dial::check_dial`]).
struct Asking<'a>(&'a Cloud);

impl<'a> Asking<'a> {
    fn new(cloud: &'a Cloud) -> Self {
        cloud
            .asking
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Asking(cloud)
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0
            .asking
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Asks the mediator for a tunnel to `device` and waits for the relay's dial, again and
/// again (with backoff) until one opens or the deadline passes; returns it with its
/// record's `wake` (when the relay had to be woken).
pub async fn open_tunnel(
    cloud: &Cloud,
    device: &str,
    deadline: Instant,
) -> Result<(Tunnel, Option<Value>), OpenError> {
    let cfg = &cloud.cfg;
    let mut backoff = Duration::from_millis(cfg.retry_base_ms);
    let mut last = String::from("no tunnel before the deadline");
    let path = format!("/v1/devices/{device}/tunnels");
    let body = json!({ "dial": cloud.dial_addr.to_string() });
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(OpenError::Deadline(last));
        }
        let asking = Asking::new(cloud);
        let limit = left.min(Duration::from_secs(5));
        match http::request(
            &cfg.mediator,
            "POST",
            &path,
            Some(&cfg.token),
            Some(&body),
            limit,
        )
        .await
        {
            Ok(r) if r.status == 201 => match r.body.get("tunnel_id").and_then(|v| v.as_u64()) {
                Some(id) => {
                    if let Some(fatal) = fatal_record(id, &r.body) {
                        return Err(fatal);
                    }
                    let (tx, rx) = oneshot::channel();
                    cloud.asked().insert(
                        id,
                        Asked {
                            device_id: device.to_string(),
                            waiter: tx,
                        },
                    );
                    drop(asking);
                    log::info!("asked for tunnel {id} to device {device}");
                    match wait_for_dial(cloud, id, rx, deadline).await {
                        Ok((t, wake)) => {
                            let wake = match wake {
                                Some(w) => Some(w),
                                None => fetch_wake(cloud, id).await,
                            };
                            return Ok((t, wake));
                        }
                        Err(Waited::Fatal(fatal)) => {
                            cloud.asked().remove(&id);
                            return Err(fatal);
                        }
                        Err(Waited::Again(why)) => {
                            cloud.asked().remove(&id);
                            log::warn!("tunnel {id}: {why}");
                            last = why;
                        }
                    }
                }
                None => last = "mediator answered 201 without a tunnel_id".into(),
            },
            Ok(r) if r.status == 429 || r.status >= 500 => {
                last = format!("mediator answered {}: {}", r.status, r.body);
                log::warn!("{last}; retrying in {} ms", backoff.as_millis());
            }
            Ok(r) => {
                return Err(OpenError::Fatal(format!(
                    "mediator refused the tunnel: {} {}",
                    r.status, r.body
                )))
            }
            Err(e) => {
                last = format!("mediator unreachable: {e}");
                log::warn!("{last}; retrying in {} ms", backoff.as_millis());
            }
        }
        let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_millis(cfg.retry_max_ms));
    }
}

/// Why no dial came.
enum Waited {
    /// Ask for another tunnel (the record failed, expired or closed; or the deadline).
    Again(String),
    /// The job cannot get a tunnel now ([`FATAL_TUNNEL_CODES`]).
    Fatal(OpenError),
}

/// Waits for the dial of tunnel `id`, polling its record: `Err` when the record failed or
/// expired, or at the deadline. With the dial, the record's `wake` if a poll saw one.
async fn wait_for_dial(
    cloud: &Cloud,
    id: u64,
    mut rx: oneshot::Receiver<Tunnel>,
    deadline: Instant,
) -> Result<(Tunnel, Option<Value>), Waited> {
    let mut wake = None;
    let cfg = &cloud.cfg;
    let mut poll = tokio::time::interval(Duration::from_millis(cfg.poll_ms));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = format!("/v1/tunnels/{id}");
    loop {
        tokio::select! {
            biased;
            t = &mut rx => return t
                .map(|t| (t, wake))
                .map_err(|_| Waited::Again("the dial's hand-over failed".to_string())),
            _ = tokio::time::sleep_until(deadline) => return Err(Waited::Again(format!("no dial for tunnel {id} before the deadline"))),
            _ = poll.tick() => {
                let r = http::request(&cfg.mediator, "GET", &path, Some(&cfg.token), None, Duration::from_secs(2)).await;
                if let Ok(r) = r {
                    if let Some(fatal) = fatal_record(id, &r.body) {
                        return Err(Waited::Fatal(fatal));
                    }
                    if let Some(w) = record_wake(&r.body) {
                        wake = Some(w);
                    }
                    let state = r.body.get("state").and_then(|s| s.as_str()).unwrap_or("");
                    if r.status == 404 || matches!(state, "failed" | "expired" | "closed") {
                        return Err(Waited::Again(format!("tunnel record is {} ({})", if state.is_empty() { "gone" } else { state }, r.body.get("error").unwrap_or(&Value::Null))));
                    }
                }
            }
        }
    }
}
