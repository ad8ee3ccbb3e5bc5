//! The local API's routes of shared documents (`docs/shared-data.md`, "HTTP API of the
//! cloud"):
//!
//! * `POST /v1/devices/{id}/sync` (body optional, `{"timeout_s": N}`): syncs the device
//!   now and answers its [`SyncReport`] (200, `state` `done` or `failed`).
//! * `GET /v1/shared/documents`: the documents the caller (`Authorization: Bearer
//!   <users[].token>`) may read now, across every share.
//! * `GET /v1/shared/documents/{id}`: its bytes (`application/octet-stream`); 403
//!   `forbidden` when the caller may not read it now (a right revoked, an account
//!   unpaired), 404 `unknown_document`, 409 `incomplete` while its bytes arrive.
//!
//! Without a token, or with one no user has: 401 `unauthorized`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiError;
use super::share::ReadError;
use super::sync::{sync_device, SyncReport, DEFAULT_SYNC_TIMEOUT_S};
use super::Cloud;

/// `POST /v1/devices/{id}/sync` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequestBody {
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// The routes (merged into [`super::api::router`]).
pub fn routes() -> Router<Arc<Cloud>> {
    Router::new()
        .route("/v1/devices/{device_id}/sync", post(sync))
        .route("/v1/shared/documents", get(list))
        .route("/v1/shared/documents/{doc_id}", get(read))
}

async fn sync(
    State(cloud): State<Arc<Cloud>>,
    Path(device): Path<String>,
    body: Bytes,
) -> Result<Json<SyncReport>, ApiError> {
    let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, "bad_request", why);
    if !duplex_tunnel::valid_id(&device) {
        return Err(bad("device id: 1-64 of A-Z a-z 0-9 - _ . : @".into()));
    }
    let req: SyncRequestBody = if body.iter().all(u8::is_ascii_whitespace) {
        SyncRequestBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("body: {e}")))?
    };
    let timeout = req
        .timeout_s
        .unwrap_or(DEFAULT_SYNC_TIMEOUT_S)
        .clamp(1, 3600);
    Ok(Json(
        sync_device(&cloud, &device, Duration::from_secs(timeout)).await,
    ))
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The user the request's bearer token belongs to.
fn caller(cloud: &Cloud, headers: &HeaderMap) -> Result<String, ApiError> {
    let unauthorized = |why: &str| ApiError(StatusCode::UNAUTHORIZED, "unauthorized", why.into());
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("an Authorization: Bearer token of a cloud user is needed"))?
        .trim();
    let mut found = None;
    for (t, user) in &cloud.cfg.user_tokens {
        if same(t.as_bytes(), token.as_bytes()) {
            found = Some(user.clone());
        }
    }
    found.ok_or_else(|| unauthorized("the token is no cloud user's"))
}

async fn list(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let user = caller(&cloud, &headers)?;
    let docs = cloud.shares.visible(&user);
    Ok(Json(json!({ "user": user, "documents": docs })))
}

async fn read(
    State(cloud): State<Arc<Cloud>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = caller(&cloud, &headers)?;
    match cloud.shares.read(&user, &doc) {
        Ok(bytes) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response()),
        Err(e @ ReadError::Unknown(_)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_document",
            e.to_string(),
        )),
        Err(e @ ReadError::Forbidden(_)) => {
            log::info!("shared document {doc} refused to {user}: {e}");
            Err(ApiError(StatusCode::FORBIDDEN, "forbidden", e.to_string()))
        }
        Err(e @ ReadError::Incomplete(_)) => {
            Err(ApiError(StatusCode::CONFLICT, "incomplete", e.to_string()))
        }
    }
}
