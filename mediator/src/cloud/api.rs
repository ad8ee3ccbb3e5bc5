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

/// Default deadline of a job.
pub const DEFAULT_TIMEOUT_S: u64 = 60;

struct ApiError(StatusCode, &'static str, String);

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
