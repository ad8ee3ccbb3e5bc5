//! The mediation server's HTTP API (`docs/tunnel-protocol.md#http-api-of-the-mediation-server`):
//! cloud servers ask for tunnels and read their records; operators list relays and probe
//! readiness. JSON in and out, bearer tokens, errors as
//! `{"error": {"code": "<name>", "message": "..."}}`.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::config::CloudEntry;
use super::Mediator;
use crate::store::NewTunnel;
use crate::util::now_ms;

/// Most requests waiting (pending or offered) for one device.
pub const MAX_WAITING_PER_DEVICE: usize = 64;

/// An error answer.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.1, "message": self.2}});
        (self.0, Json(body)).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// The routes.
pub fn router(m: Arc<Mediator>) -> Router {
    Router::new()
        .route("/v1/devices/{device_id}/tunnels", post(create_tunnel))
        .route("/v1/tunnels/{tunnel_id}", get(get_tunnel))
        .route("/v1/relays", get(list_relays))
        .route("/v1/readyz", get(readyz))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .with_state(m)
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(m: Arc<Mediator>, listener: TcpListener) {
    if let Err(e) = axum::serve(listener, router(m)).await {
        log::error!("HTTP API stopped: {e}");
    }
}

/// The cloud server a request's bearer token names.
fn authorize<'a>(m: &'a Mediator, headers: &HeaderMap) -> Result<&'a CloudEntry, ApiError> {
    let unauthorized =
        |why: &str| ApiError(StatusCode::UNAUTHORIZED, "unauthorized", why.to_string());
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("Authorization is not Bearer <token>"))?;
    m.cloud_by_token(token.trim())
        .ok_or_else(|| unauthorized("unknown token"))
}

async fn create_tunnel(
    State(m): State<Arc<Mediator>>,
    Path(device_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let cloud = authorize(&m, &headers)?.name.clone();
    let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, "bad_request", why);
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| bad(format!("body is not JSON: {e}")))?;
    let dial = body
        .get("dial")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("body needs \"dial\": \"a.b.c.d:port\"".into()))?;
    let dial: SocketAddrV4 = dial
        .parse()
        .map_err(|_| bad(format!("dial {dial:?} is not an IPv4 address:port")))?;
    if !duplex_tunnel::valid_id(&device_id) {
        return Err(bad("invalid device id".into()));
    }
    let relay_id = m.cfg.device_relay.get(&device_id).cloned().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "unknown_device",
            format!("no relay serves device {device_id}"),
        )
    })?;
    let dev = device_id.clone();
    let waiting = m
        .store
        .run(move |s| s.waiting_for_device(&dev))
        .await
        .map_err(internal)?;
    if waiting >= MAX_WAITING_PER_DEVICE {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many",
            format!("{waiting} requests already wait for device {device_id}"),
        ));
    }
    let now = now_ms();
    let new = NewTunnel {
        device_id: device_id.clone(),
        relay_id: relay_id.clone(),
        cloud: cloud.clone(),
        dial,
        created_ms: now,
        expires_ms: now + m.cfg.pending_ttl_ms,
    };
    let rec = m
        .store
        .run(move |s| s.create_tunnel(&new))
        .await
        .map_err(internal)?;
    log::info!(
        "tunnel {} requested by cloud {cloud} for device {device_id} (relay {relay_id}), dial {dial}",
        rec.tunnel_id
    );
    // Offered at once if the relay is active; a sleeping relay's request gets a wake (and
    // fails at once, `no_substitute`, if no relay can wake it).
    let rec = super::wake_flow::route(&m, rec).await;
    Ok((StatusCode::CREATED, Json(rec.to_json())))
}

async fn get_tunnel(
    State(m): State<Arc<Mediator>>,
    Path(tunnel_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let cloud = authorize(&m, &headers)?.name.clone();
    let unknown = || {
        ApiError(
            StatusCode::NOT_FOUND,
            "unknown_tunnel",
            format!("no tunnel {tunnel_id}"),
        )
    };
    let id: u64 = tunnel_id.parse().map_err(|_| unknown())?;
    let rec = m.store.run(move |s| s.tunnel(id)).await.map_err(internal)?;
    match rec {
        Some(rec) if rec.cloud == cloud => Ok(Json(rec.to_json())),
        _ => Err(unknown()),
    }
}

async fn list_relays(
    State(m): State<Arc<Mediator>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&m, &headers)?;
    let leases: HashMap<String, crate::store::Lease> = m
        .store
        .run(|s| s.leases())
        .await
        .map_err(internal)?
        .into_iter()
        .map(|l| (l.relay_id.clone(), l))
        .collect();
    let book = m.book.lock().await;
    let sessions = m.sessions();
    let relays: Vec<Value> = m
        .cfg
        .relays
        .iter()
        .map(|r| {
            let session = sessions.get(&r.id);
            let mut v = if let Some(s) = session {
                json!({
                    "relay_id": r.id, "online": true, "session_id": s.session_id,
                    "devices": s.devices, "since_ms": s.since_ms,
                    "last_heard_ms": s.last_heard_ms.load(Ordering::Relaxed),
                })
            } else if let Some(l) = leases.get(&r.id) {
                json!({
                    "relay_id": r.id, "online": false, "session_id": l.session_id,
                    "devices": l.devices, "since_ms": l.since_ms, "last_heard_ms": l.last_heard_ms,
                })
            } else {
                json!({
                    "relay_id": r.id, "online": false, "session_id": null,
                    "devices": [], "since_ms": null, "last_heard_ms": null,
                })
            };
            if let Value::Object(o) = &mut v {
                o.extend(book.relay_json(&r.id, session.is_some()));
            }
            v
        })
        .collect();
    Ok(Json(json!({ "relays": relays })))
}

async fn readyz(State(m): State<Arc<Mediator>>) -> (StatusCode, Json<Value>) {
    let online = m.sessions().len();
    let body = json!({"ready": m.is_ready(), "relays_online": online, "sessions": m.connections()});
    let status = if m.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
