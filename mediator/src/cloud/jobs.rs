//! Print jobs: one worker per device runs its jobs in order, each on a tunnel it asks the
//! mediator for (retrying with backoff while the mediator is unreachable, up to the job's
//! deadline). A tunnel lost before the result means a new tunnel and the same job id
//! again. The tunnel is closed when no other job for the device is queued. A request the
//! mediator fails because the device's relay sleeps and cannot be woken (`no_substitute`,
//! `wake_timeout`) fails the job, with the mediator's code and message and the wake.

use std::sync::Arc;
use std::time::Duration;

use duplex_tunnel::{CloudToRelay, JobOutcome, RelayToCloud, MAX_DOCUMENT_CHUNK};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ask::{fetch_record, open_tunnel, OpenError};
use super::dial::{close, Tunnel};
use super::document::{expected_checksums, Document};
use super::Cloud;
use crate::wire::WireError;

/// What to print.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub job_id: String,
    pub device_id: String,
    pub user: String,
    pub pages: u32,
    pub seed: u64,
    pub width: u16,
    pub height: u16,
    pub document_len: u64,
    pub deadline: Instant,
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Timeout,
}

/// Milliseconds of a job's phases.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    /// From the start of the job to its first tunnel being open (0 on a reused tunnel).
    pub tunnel_up: Option<u64>,
    /// From `Job` sent to `JobResult` received, on the attempt that finished.
    pub job: Option<u64>,
    /// From the start of the job to its end.
    pub total: Option<u64>,
}

/// The mediator's error on a tunnel record that ended the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelError {
    pub tunnel_id: u64,
    /// `no_substitute`, `wake_timeout`.
    pub code: String,
    pub message: String,
}

/// Mediator error codes that end a job rather than ask for another tunnel: the device's
/// relay is asleep and cannot be woken (asking again at once would fail the same way).
pub const FATAL_TUNNEL_CODES: [&str; 2] = ["no_substitute", "wake_timeout"];

/// A job's report: what `duplex-cloud submit` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobReport {
    pub state: JobState,
    pub job_id: String,
    pub device_id: String,
    pub device_job: Option<u64>,
    pub duplicate: Option<bool>,
    pub checksums: Vec<u32>,
    /// The page checksums and the document CRC are those expected.
    pub checksums_ok: bool,
    pub document_crc32: Option<u32>,
    pub tunnel_id: Option<u64>,
    pub tunnels_opened: u32,
    pub timings_ms: Timings,
    pub error: Option<String>,
    /// The tunnel record's error when the mediator failed the request (`no_substitute`,
    /// `wake_timeout`).
    #[serde(default)]
    pub tunnel_error: Option<TunnelError>,
    /// The last tunnel record's `wake` (its relay was asleep: who woke it, when).
    #[serde(default)]
    pub wake: Option<Value>,
}

impl JobReport {
    /// A report of a job not started.
    pub fn queued(spec: &JobSpec) -> Self {
        Self::new(JobState::Queued, &spec.job_id, &spec.device_id)
    }

    /// An empty report in `state`.
    pub fn new(state: JobState, job_id: &str, device_id: &str) -> Self {
        JobReport {
            state,
            job_id: job_id.to_string(),
            device_id: device_id.to_string(),
            device_job: None,
            duplicate: None,
            checksums: Vec::new(),
            checksums_ok: false,
            document_crc32: None,
            tunnel_id: None,
            tunnels_opened: 0,
            timings_ms: Timings::default(),
            error: None,
            tunnel_error: None,
            wake: None,
        }
    }

    /// Done, failed or timed out.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state,
            JobState::Done | JobState::Failed | JobState::Timeout
        )
    }
}

/// A job and its report, watched by whoever waits for it.
pub struct JobEntry {
    pub spec: JobSpec,
    pub report: watch::Sender<JobReport>,
}

impl JobEntry {
    /// A queued job.
    pub fn new(spec: JobSpec) -> Arc<Self> {
        let (report, _) = watch::channel(JobReport::queued(&spec));
        Arc::new(JobEntry { spec, report })
    }

    /// Ends the job as failed with `why`.
    pub fn finish_failed(&self, why: &str) {
        self.report.send_modify(|r| {
            r.state = JobState::Failed;
            r.error = Some(why.to_string());
        });
    }
}

/// Runs the jobs of `device` in order.
pub async fn device_worker(
    cloud: Arc<Cloud>,
    device: String,
    mut rx: mpsc::UnboundedReceiver<Arc<JobEntry>>,
) {
    let mut tunnel: Option<Tunnel> = None;
    while let Some(job) = rx.recv().await {
        let report = run_job(&cloud, &job, &mut tunnel).await;
        log::info!(
            "job {} on {device}: {:?} (tunnel {:?}, {} tunnels){}",
            report.job_id,
            report.state,
            report.tunnel_id,
            report.tunnels_opened,
            report
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        job.report.send_replace(report);
        if rx.is_empty() {
            if let Some(t) = tunnel.take() {
                close(&cloud, t).await;
            }
        }
    }
}

/// Why a tunnel attempt ended without a result.
enum Attempt {
    /// The tunnel broke: try again on a new one.
    Lost(String),
    /// The job cannot succeed (the relay answered `failed`).
    Failed(String),
}

async fn run_job(cloud: &Arc<Cloud>, job: &JobEntry, slot: &mut Option<Tunnel>) -> JobReport {
    let spec = &job.spec;
    let start = Instant::now();
    let mut report = JobReport::queued(spec);
    report.state = JobState::Running;
    job.report.send_replace(report.clone());
    let (seed, pages, w, h) = (spec.seed, spec.pages, spec.width, spec.height);
    let expected = tokio::task::spawn_blocking(move || expected_checksums(seed, pages, w, h));
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let end = |mut r: JobReport, state: JobState, error: Option<String>| {
        r.state = state;
        r.error = error;
        r.timings_ms.total = Some(ms(start.elapsed()));
        r
    };
    loop {
        if Instant::now() >= spec.deadline {
            return end(
                report,
                JobState::Timeout,
                Some("deadline passed before the job was done".into()),
            );
        }
        let mut tunnel = match slot.take() {
            Some(t) => {
                report.timings_ms.tunnel_up.get_or_insert(0);
                t
            }
            None => match open_tunnel(cloud, &spec.device_id, spec.deadline).await {
                Ok((t, wake)) => {
                    if wake.is_some() {
                        report.wake = wake;
                    }
                    report.tunnels_opened += 1;
                    report
                        .timings_ms
                        .tunnel_up
                        .get_or_insert(ms(start.elapsed()));
                    t
                }
                Err(OpenError::Deadline(why)) => return end(report, JobState::Timeout, Some(why)),
                Err(OpenError::Fatal(why)) => return end(report, JobState::Failed, Some(why)),
                Err(OpenError::Record { error, wake }) => {
                    let why = format!(
                        "tunnel {} failed at the mediator: {}: {}",
                        error.tunnel_id, error.code, error.message
                    );
                    report.tunnel_id = Some(error.tunnel_id);
                    report.tunnel_error = Some(error);
                    if wake.is_some() {
                        report.wake = wake;
                    }
                    return end(report, JobState::Failed, Some(why));
                }
            },
        };
        report.tunnel_id = Some(tunnel.id);
        let sent = Instant::now();
        match tokio::time::timeout_at(
            spec.deadline,
            send_job(cloud, &mut tunnel, spec, &mut report),
        )
        .await
        {
            Ok(Ok(doc_crc)) => {
                *slot = Some(tunnel);
                report.timings_ms.job = Some(ms(sent.elapsed()));
                let want = expected.await.unwrap_or_default();
                report.checksums_ok =
                    report.checksums == want && report.document_crc32 == Some(doc_crc);
                let error = (!report.checksums_ok).then(|| {
                    format!(
                        "result does not match: checksums {:x?} (want {want:x?}), document CRC {:x?} (want {doc_crc:x})",
                        report.checksums, report.document_crc32
                    )
                });
                return end(report, JobState::Done, error);
            }
            Ok(Err(Attempt::Failed(why))) => {
                *slot = Some(tunnel);
                return end(report, JobState::Failed, Some(why));
            }
            Ok(Err(Attempt::Lost(why))) => {
                log::warn!(
                    "job {}: tunnel {} lost ({why}); asking for a new tunnel",
                    spec.job_id,
                    tunnel.id
                );
                cloud.tunnel_ended(tunnel.id, "lost");
            }
            Err(_) => {
                cloud.tunnel_ended(tunnel.id, "lost");
                return end(
                    report,
                    JobState::Timeout,
                    Some("no result before the deadline".into()),
                );
            }
        }
    }
}

/// Sends the job and its document on `tunnel` and reads until its `JobResult`; returns the
/// document's CRC as sent.
async fn send_job(
    cloud: &Cloud,
    tunnel: &mut Tunnel,
    spec: &JobSpec,
    report: &mut JobReport,
) -> Result<u32, Attempt> {
    let lost = |e: WireError| Attempt::Lost(e.to_string());
    if let Some(t) = cloud.tunnels().get_mut(&tunnel.id) {
        t.jobs.push(spec.job_id.clone());
    }
    let job = CloudToRelay::Job {
        job_id: spec.job_id.clone(),
        device_id: spec.device_id.clone(),
        user: spec.user.clone(),
        pages: spec.pages,
        seed: spec.seed,
        width: spec.width,
        height: spec.height,
        document_len: spec.document_len,
    };
    tunnel.conn.send(&job).await.map_err(lost)?;
    let mut doc = Document::new(spec.seed, spec.document_len);
    while let Some(bytes) = doc.next_chunk(MAX_DOCUMENT_CHUNK) {
        let data = CloudToRelay::JobData {
            job_id: spec.job_id.clone(),
            bytes,
        };
        tunnel.conn.send(&data).await.map_err(lost)?;
    }
    let doc_crc = doc.crc32();
    // A relay restored from a snapshot has forgotten this connection without a word on it
    // (nothing comes back, ever); it tells the mediator instead, so the record is watched.
    let mut check = tokio::time::interval(Duration::from_millis(cloud.cfg.poll_ms));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        let msg = tokio::select! {
            biased;
            msg = tunnel.conn.recv() => msg.map_err(lost)?,
            _ = check.tick() => {
                if let Some(why) = ended_at_relay(cloud, tunnel.id).await {
                    return Err(Attempt::Lost(why));
                }
                continue;
            }
        };
        match msg {
            RelayToCloud::JobAccepted {
                job_id,
                device_job,
                duplicate,
            } if job_id == spec.job_id => {
                report.device_job = Some(device_job);
                report.duplicate = Some(duplicate);
            }
            RelayToCloud::JobResult {
                job_id,
                outcome,
                checksums,
                document_crc32,
                error,
            } if job_id == spec.job_id => {
                report.checksums = checksums;
                report.document_crc32 = Some(document_crc32);
                return match outcome {
                    JobOutcome::Done => Ok(doc_crc),
                    JobOutcome::Failed => Err(Attempt::Failed(format!(
                        "device: {}",
                        error.unwrap_or_else(|| "failed".into())
                    ))),
                };
            }
            RelayToCloud::Error { code, message } => {
                return Err(Attempt::Lost(format!("relay sent Error {code}: {message}")))
            }
            RelayToCloud::Closed { .. } => {
                return Err(Attempt::Lost("relay closed the tunnel".into()))
            }
            other => log::warn!("tunnel {}: ignored {other:?}", tunnel.id),
        }
    }
}

/// `Some(why)` when the mediator's record of tunnel `id` says the relay ended it (`closed`
/// or `failed`): a result can no longer come on it. `None` while it is open, or when the
/// mediator cannot be asked (the connection itself then decides).
pub(crate) async fn ended_at_relay(cloud: &Cloud, id: u64) -> Option<String> {
    let record = fetch_record(cloud, id).await?;
    let state = record.get("state").and_then(|s| s.as_str())?;
    matches!(state, "closed" | "failed")
        .then(|| format!("the relay reported the tunnel {state} before the job's result"))
}
