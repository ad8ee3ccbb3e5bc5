//! The cloud service's local API (`docs/mediator.md#duplex-cloud`): submit a job and wait
//! for its report, read a job, list the tunnels seen.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::jobs::{JobEntry, JobReport, JobSpec, JobState};
use super::Cloud;
use duplex_link::{DEFAULT_PAGE_HEIGHT, DEFAULT_PAGE_WIDTH, MAX_JOB_PAGES, MAX_PAGE_PIXELS};
use duplex_tunnel::{valid_id, MAX_DOCUMENT_LEN};

/// A job request (`POST /v1/jobs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub device_id: String,
    pub pages: u32,
    pub seed: u64,
    #[serde(default)]
    pub width: Option<u16>,
    #[serde(default)]
    pub height: Option<u16>,
    #[serde(default)]
    pub document_bytes: u64,
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub user: Option<String>,
    /// Answer when the job ends (default) or at once (`202`).
    #[serde(default)]
    pub wait: Option<bool>,
}

/// `GET /scim/v2/Users` query (RFC 7644 §3.4.2.4: `startIndex` 1-based, default 1;
/// `count` default and at most [`duplex_docs::MAX_SCIM_PAGE`]).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimQuery {
    #[serde(default)]
    pub start_index: Option<u32>,
    #[serde(default)]
    pub count: Option<u32>,
}

/// Default deadline of a job.
pub const DEFAULT_TIMEOUT_S: u64 = 60;

pub(crate) struct ApiError(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

/// The routes.
pub fn router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{job_id}", get(get_job))
        .route("/v1/tunnels", get(tunnels))
        .route("/scim/v2/Users", get(scim_users))
        .merge(super::shared_api::routes())
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .with_state(cloud)
}

/// Serves the API until the task is dropped.
pub async fn serve(cloud: Arc<Cloud>, listener: TcpListener) {
    if let Err(e) = axum::serve(listener, router(cloud)).await {
        log::error!("local API stopped: {e}");
    }
}

/// Checks a request and makes its job spec.
pub fn job_spec(req: JobRequest, default_user: &str) -> Result<JobSpec, String> {
    if !valid_id(&req.device_id) {
        return Err("device_id: 1-64 of A-Z a-z 0-9 - _ . : @".into());
    }
    if req.pages == 0 || req.pages > MAX_JOB_PAGES {
        return Err(format!(
            "pages: {} is not in 1..={MAX_JOB_PAGES}",
            req.pages
        ));
    }
    let width = req.width.unwrap_or(DEFAULT_PAGE_WIDTH);
    let height = req.height.unwrap_or(DEFAULT_PAGE_HEIGHT);
    if width == 0 || height == 0 || u64::from(width) * u64::from(height) > MAX_PAGE_PIXELS as u64 {
        return Err(format!(
            "width x height: {width}x{height} is not 1..={MAX_PAGE_PIXELS} pixels"
        ));
    }
    if req.document_bytes > MAX_DOCUMENT_LEN {
        return Err(format!("document_bytes: over {MAX_DOCUMENT_LEN}"));
    }
    let job_id = match req.job_id {
        Some(id) if valid_id(&id) => id,
        Some(_) => return Err("job_id: 1-64 of A-Z a-z 0-9 - _ . : @".into()),
        None => format!(
            "job-{}",
            crate::util::hex(&crate::util::random_bytes::<8>())
        ),
    };
    let user = req.user.unwrap_or_else(|| default_user.to_string());
    if !valid_id(&user) {
        return Err("user: 1-64 of A-Z a-z 0-9 - _ . : @".into());
    }
    let timeout = req
        .timeout_s
        .unwrap_or(DEFAULT_TIMEOUT_S)
        .clamp(1, 24 * 3600);
    Ok(JobSpec {
        job_id,
        device_id: req.device_id,
        user,
        pages: req.pages,
        seed: req.seed,
        width,
        height,
        document_len: req.document_bytes,
        deadline: Instant::now() + Duration::from_secs(timeout),
    })
}

async fn submit(
    State(cloud): State<Arc<Cloud>>,
    body: Bytes,
) -> Result<(StatusCode, Json<JobReport>), ApiError> {
    let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, "bad_request", why);
    let req: JobRequest = serde_json::from_slice(&body).map_err(|e| bad(format!("body: {e}")))?;
    let wait = req.wait.unwrap_or(true);
    let spec = job_spec(req, &cloud.cfg.user).map_err(bad)?;
    let deadline = spec.deadline;
    // A job id already running is waited for; one that ended is sent again (same id).
    let entry = {
        let mut jobs = cloud.jobs();
        match jobs.get(&spec.job_id) {
            Some(e) if !e.report.borrow().is_final() => e.clone(),
            _ => {
                let e = JobEntry::new(spec);
                jobs.insert(e.spec.job_id.clone(), e.clone());
                cloud.enqueue(e.clone());
                e
            }
        }
    };
    log::info!(
        "job {} submitted for device {}",
        entry.spec.job_id,
        entry.spec.device_id
    );
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(entry.report.borrow().clone())));
    }
    let mut rx = entry.report.subscribe();
    let limit = deadline + Duration::from_secs(5);
    let report = match tokio::time::timeout_at(limit, rx.wait_for(JobReport::is_final)).await {
        Ok(Ok(r)) => r.clone(),
        _ => {
            let mut r = entry.report.borrow().clone();
            r.state = JobState::Timeout;
            r.error = Some("the job did not end before its deadline".into());
            r
        }
    };
    Ok((StatusCode::OK, Json(report)))
}

async fn get_job(
    State(cloud): State<Arc<Cloud>>,
    Path(job_id): Path<String>,
) -> Result<Json<JobReport>, ApiError> {
    let entry = cloud.jobs().get(&job_id).cloned();
    match entry {
        Some(e) => Ok(Json(e.report.borrow().clone())),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_job",
            format!("no job {job_id}"),
        )),
    }
}

async fn tunnels(State(cloud): State<Arc<Cloud>>) -> Json<Value> {
    let list: Vec<_> = cloud.tunnels().values().cloned().collect();
    Json(json!({ "tunnels": list }))
}

/// `GET /scim/v2/Users?startIndex=S&count=N`: a page of the cloud's users, as SCIM.
async fn scim_users(
    State(cloud): State<Arc<Cloud>>,
    axum::extract::Query(q): axum::extract::Query<ScimQuery>,
) -> Json<duplex_docs::ScimListResponse> {
    Json(scim_page(&cloud.cfg.users, q.start_index, q.count))
}

/// The page of `users` from `start_index` (1-based; 0 counts as 1) of at most `count`
/// (capped at [`duplex_docs::MAX_SCIM_PAGE`]).
pub fn scim_page(
    users: &[duplex_docs::CloudUser],
    start_index: Option<u32>,
    count: Option<u32>,
) -> duplex_docs::ScimListResponse {
    let start = start_index.unwrap_or(1).max(1);
    let count = count
        .unwrap_or(duplex_docs::MAX_SCIM_PAGE)
        .min(duplex_docs::MAX_SCIM_PAGE);
    let from = usize::try_from(start - 1).unwrap_or(usize::MAX);
    let page: Vec<_> = users
        .iter()
        .skip(from)
        .take(count as usize)
        .cloned()
        .map(|mut u| {
            u.schemas = vec![duplex_docs::SCIM_USER_SCHEMA.to_string()];
            u
        })
        .collect();
    duplex_docs::ScimListResponse {
        schemas: vec![duplex_docs::SCIM_LIST_RESPONSE_SCHEMA.to_string()],
        total_results: u32::try_from(users.len()).unwrap_or(u32::MAX),
        start_index: start,
        items_per_page: u32::try_from(page.len()).unwrap_or(u32::MAX),
        resources: page,
    }
}

#[cfg(test)]
mod scim_tests {
    use super::*;

    fn user(i: u32) -> duplex_docs::CloudUser {
        serde_json::from_value(json!({
            "id": format!("u{i}"),
            "displayName": format!("User {i}"),
            "emails": [{"value": format!("u{i}@example.com"), "verified": true}]
        }))
        .expect("user")
    }

    #[test]
    fn users_are_listed_page_by_page_as_scim() {
        let users: Vec<_> = (1..=5).map(user).collect();
        let p1 = scim_page(&users, Some(1), Some(2));
        assert_eq!(
            (p1.total_results, p1.start_index, p1.items_per_page),
            (5, 1, 2)
        );
        assert_eq!(p1.resources[0].id, "u1");
        assert_eq!(p1.next_start_index(), Some(3));
        let p3 = scim_page(&users, Some(5), Some(2));
        assert_eq!(p3.resources.len(), 1);
        assert_eq!(p3.next_start_index(), None);
        assert!(scim_page(&users, Some(9), None).resources.is_empty());
        // The JSON is SCIM's: Resources, totalResults, the list response schema.
        let v = serde_json::to_value(scim_page(&users, None, Some(1000))).expect("json");
        assert_eq!(v["totalResults"], 5);
        assert_eq!(v["itemsPerPage"], 5);
        assert_eq!(v["Resources"][4]["emails"][0]["verified"], true);
        assert_eq!(v["schemas"][0], duplex_docs::SCIM_LIST_RESPONSE_SCHEMA);
    }
}
