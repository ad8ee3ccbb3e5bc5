//! The simulated relay's tunnels: dial the cloud server named in a `TunnelRequest`,
//! present the ticket, take jobs to the fake device and answer their results, until
//! `Close` (answered `Closed`), 60 s of silence, or a lost connection. Every outcome is
//! reported to the mediator through the relay's report channel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duplex_link::print::Crc32;
use duplex_tunnel::error_code as code;
use duplex_tunnel::{CloudToRelay, JobOutcome, RelayToCloud, RelayToMediator, Ticket};
use rustls::ClientConfig;
use tokio::sync::mpsc;

use super::client::{dial, SimError, TunnelConn};
use super::device::FakeDevice;
use crate::wire::WireError;

/// A tunnel on which nothing arrives for this long is closed by the relay.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// One tunnel request to serve.
pub struct TunnelJob {
    pub tunnel_id: u64,
    pub device_id: String,
    pub cloud: SocketAddr,
    pub ticket: Ticket,
    pub cloud_tls: Arc<ClientConfig>,
    pub device: Arc<FakeDevice>,
    pub reports: mpsc::UnboundedSender<RelayToMediator>,
}

/// Serves one tunnel request from dial to close.
pub async fn run(t: TunnelJob) {
    let id = t.tunnel_id;
    let report = |m: RelayToMediator| {
        let _ = t.reports.send(m);
    };
    let mut conn = match dial(t.cloud, t.cloud_tls.clone(), &t.ticket).await {
        Ok((CloudToRelay::DialOk { .. }, conn)) => conn,
        Ok((CloudToRelay::DialRefused { code, message }, _)) => {
            log::info!("sim: tunnel {id} refused by the cloud: {code} {message}");
            report(RelayToMediator::TunnelFailed {
                tunnel_id: id,
                code,
                message,
            });
            return;
        }
        Ok((other, _)) => {
            let message = format!("unexpected answer to Dial: {other:?}");
            report(RelayToMediator::TunnelFailed {
                tunnel_id: id,
                code: code::DIAL_FAILED,
                message,
            });
            return;
        }
        Err(e) => {
            log::info!("sim: tunnel {id}: {e}");
            report(RelayToMediator::TunnelFailed {
                tunnel_id: id,
                code: code::DIAL_FAILED,
                message: crate::server::login::message(e.to_string()),
            });
            return;
        }
    };
    report(RelayToMediator::TunnelAccepted { tunnel_id: id });
    let mut jobs = Vec::new();
    let end = serve(&mut conn, &t, &mut jobs).await;
    log::info!("sim: tunnel {id} ends: {end}");
    conn.shutdown(Duration::from_secs(1)).await;
    report(RelayToMediator::TunnelClosed {
        tunnel_id: id,
        jobs,
    });
}

async fn serve(conn: &mut TunnelConn, t: &TunnelJob, jobs: &mut Vec<String>) -> String {
    loop {
        let msg = match conn.recv_within(IDLE_LIMIT).await {
            Ok(m) => m,
            Err(WireError::Timeout) => return "idle".into(),
            Err(e) => {
                if let Some(c) = e.code() {
                    let _ = conn
                        .send(&RelayToCloud::Error {
                            code: c,
                            message: e.to_string(),
                        })
                        .await;
                }
                return e.to_string();
            }
        };
        match msg {
            CloudToRelay::Close => {
                let n = u32::try_from(jobs.len()).unwrap_or(u32::MAX);
                let _ = conn.send(&RelayToCloud::Closed { jobs: n }).await;
                return "closed by the cloud".into();
            }
            CloudToRelay::Job {
                job_id,
                device_id,
                pages,
                seed,
                width,
                height,
                document_len,
                ..
            } => {
                if !jobs.contains(&job_id) {
                    jobs.push(job_id.clone());
                }
                match job(
                    conn,
                    t,
                    &job_id,
                    &device_id,
                    (pages, seed, width, height),
                    document_len,
                )
                .await
                {
                    Ok(()) => {}
                    Err(e) => return e.to_string(),
                }
            }
            other => {
                let message = format!("unexpected {other:?}");
                let _ = conn
                    .send(&RelayToCloud::Error {
                        code: code::MALFORMED,
                        message,
                    })
                    .await;
                return "protocol error".into();
            }
        }
    }
}

/// Receives a job's document, has the device print it, answers `JobAccepted` and
/// `JobResult`.
async fn job(
    conn: &mut TunnelConn,
    t: &TunnelJob,
    job_id: &str,
    device_id: &str,
    (pages, seed, width, height): (u32, u64, u16, u16),
    document_len: u64,
) -> Result<(), SimError> {
    let mut crc = Crc32::new();
    let mut got = 0u64;
    while got < document_len {
        match conn.recv_within(IDLE_LIMIT).await? {
            CloudToRelay::JobData { job_id: j, bytes }
                if j == job_id && got + bytes.len() as u64 <= document_len =>
            {
                got += bytes.len() as u64;
                crc.update(&bytes);
            }
            other => {
                let message = format!(
                    "expected {} more document bytes of {job_id}, got {other:?}",
                    document_len - got
                );
                let message = crate::server::login::message(message);
                conn.send(&RelayToCloud::Error {
                    code: code::MALFORMED,
                    message,
                })
                .await?;
                return Err(SimError::Unexpected("bad JobData".into()));
            }
        }
    }
    let document_crc32 = crc.finish();
    if device_id != t.device_id {
        let result = RelayToCloud::JobResult {
            job_id: job_id.to_string(),
            outcome: JobOutcome::Failed,
            checksums: Vec::new(),
            document_crc32,
            error: Some(format!(
                "{}: device {device_id} is not this tunnel's",
                code::DEVICE_NOT_SERVED
            )),
        };
        conn.send(&result).await?;
        return Ok(());
    }
    let taken = t.device.submit(job_id, pages, seed, width, height);
    conn.send(&RelayToCloud::JobAccepted {
        job_id: job_id.to_string(),
        device_job: taken.device_job,
        duplicate: taken.duplicate,
    })
    .await?;
    let (outcome, checksums, error) = match taken.result().await {
        Some(sums) => (JobOutcome::Done, sums, None),
        None => (
            JobOutcome::Failed,
            Vec::new(),
            Some(format!("{}: print failed", code::DEVICE_UNAVAILABLE)),
        ),
    };
    conn.send(&RelayToCloud::JobResult {
        job_id: job_id.to_string(),
        outcome,
        checksums,
        document_crc32,
        error,
    })
    .await?;
    Ok(())
}
