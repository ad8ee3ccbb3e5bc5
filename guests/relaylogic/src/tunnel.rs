//! Tunnels to cloud servers (`docs/tunnel-protocol.md`, tunnel): a `TunnelRequest` is
//! answered by dialling the cloud server and presenting the ticket; jobs arrive on the
//! tunnel, their documents are counted and CRC-32'd, and each job goes to the controller
//! (`controller.rs`); `Close`, an idle minute, or a lost connection ends the tunnel, which
//! is reported to the mediator with the job ids it carried.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use duplex_link::{FrameDecoder, FrameError};
use duplex_tunnel::{
    error_code, tunnel_decoder, valid_id, CloudToRelay, Endpoint, JobOutcome, RelayToCloud,
    RelayToMediator, Ticket, MAX_DOCUMENT_CHUNK, MAX_DOCUMENT_LEN, MAX_MESSAGE_LEN,
    MAX_TUNNEL_FRAME, PROTOCOL_VERSION,
};

use crate::action::{Action, ConnId, Peer};
use crate::config::endpoint_string;
use crate::controller::JobPhase;
use crate::relay::{cut, Relay, DIAL_TIMEOUT_MS, MAX_REPORTED_JOBS, MAX_TUNNELS, TUNNEL_IDLE_MS};
use crate::share::SharePhase;

/// CRC-32/ISO-HDLC, the document checksum, slice-by-16 (a 16 KiB table; about four times
/// the byte-at-a-time table's rate, which cost the relay a tenth of a large job's time).
pub(crate) static CRC32: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);

/// Where a tunnel is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunnelState {
    /// TCP and TLS under way; given up at the deadline.
    Connecting { deadline: u64 },
    /// `Dial` sent; `DialOk` expected by the deadline.
    AwaitDialOk { deadline: u64 },
    /// `DialOk` received: jobs may come.
    Open,
}

/// The job a tunnel is carrying.
pub(crate) struct Job {
    pub job_id: String,
    pub pages: u32,
    pub seed: u64,
    pub width: u16,
    pub height: u16,
    pub document_len: u64,
    pub received: u64,
    pub crc: crc::Digest<'static, u32, crc::Table<16>>,
    /// The CRC of the whole document, once received.
    pub document_crc32: u32,
    /// Why the job is refused without going to the controller (403: another device).
    pub refused: Option<String>,
    pub phase: JobPhase,
}

/// One tunnel.
pub(crate) struct Tunnel {
    pub id: u64,
    pub conn: ConnId,
    pub cloud: Endpoint,
    ticket: Ticket,
    pub state: TunnelState,
    decoder: FrameDecoder<CloudToRelay>,
    /// Job ids carried (the first [`MAX_REPORTED_JOBS`]).
    pub jobs: Vec<String>,
    /// Jobs carried.
    pub job_count: u32,
    /// When the last frame arrived (or the tunnel opened).
    pub(crate) heard: u64,
    pub job: Option<Job>,
    /// A share tunnel's exchange (`share.rs`), after `SyncOpen`.
    pub(crate) share: Option<SharePhase>,
}

impl Tunnel {
    pub fn is_open(&self) -> bool {
        self.state == TunnelState::Open
    }

    /// Whether the relay is waiting for the cloud server (so the idle rule applies).
    fn waiting_for_cloud(&self) -> bool {
        self.is_open()
            && self.share != Some(SharePhase::Controller)
            && self
                .job
                .as_ref()
                .is_none_or(|j| matches!(j.phase, JobPhase::Receiving))
    }

    pub fn deadline(&self) -> Option<u64> {
        match self.state {
            TunnelState::Connecting { deadline } | TunnelState::AwaitDialOk { deadline } => {
                Some(deadline)
            }
            TunnelState::Open => self
                .waiting_for_cloud()
                .then(|| self.heard.saturating_add(TUNNEL_IDLE_MS)),
        }
    }

    /// The device the tunnel's ticket is for.
    pub(crate) fn ticket_device(&self) -> &str {
        &self.ticket.body.device_id
    }

    /// The `TunnelClosed` report of this tunnel.
    pub fn closed_report(&self) -> RelayToMediator {
        RelayToMediator::TunnelClosed {
            tunnel_id: self.id,
            jobs: self.jobs.clone(),
        }
    }
}

fn failed(tunnel_id: u64, code: u16, message: String) -> RelayToMediator {
    RelayToMediator::TunnelFailed {
        tunnel_id,
        code,
        message: cut(message, MAX_MESSAGE_LEN),
    }
}

fn name(msg: &CloudToRelay) -> &'static str {
    match msg {
        CloudToRelay::DialOk { .. } => "DialOk",
        CloudToRelay::DialRefused { .. } => "DialRefused",
        CloudToRelay::Job { .. } => "Job",
        CloudToRelay::JobData { .. } => "JobData",
        CloudToRelay::Close => "Close",
        CloudToRelay::SyncOpen { .. } => "SyncOpen",
        CloudToRelay::Share { .. } => "Share",
    }
}

/// A protocol error on a tunnel: the code and message of the `Error` sent before closing.
type Broken = (u16, String);

impl Relay {
    pub(crate) fn tunnel_request(
        &mut self,
        tunnel_id: u64,
        device_id: String,
        cloud: Endpoint,
        ticket: Ticket,
        now: u64,
    ) {
        if let Some(t) = self.tunnels.iter().find(|t| t.id == tunnel_id) {
            // Offered again (a new session): answer what is known; a dial under way answers
            // when it ends.
            if t.is_open() {
                self.report(RelayToMediator::TunnelAccepted { tunnel_id });
            }
            return;
        }
        if let Some((_, r)) = self.recent.iter().find(|(id, _)| *id == tunnel_id) {
            let r = r.clone();
            self.report(r);
            return;
        }
        if !self.cfg.devices.contains(&device_id) {
            let why = format!(
                "device {device_id} is not served by relay {}",
                self.cfg.relay_id
            );
            self.log(format!("tunnel {tunnel_id} refused: {why}"));
            self.finish_report(
                tunnel_id,
                failed(tunnel_id, error_code::DEVICE_NOT_SERVED, why),
            );
            return;
        }
        if self.tunnels.len() >= MAX_TUNNELS {
            let why = format!("{MAX_TUNNELS} tunnels already open");
            self.log(format!("tunnel {tunnel_id} refused: {why}"));
            self.finish_report(tunnel_id, failed(tunnel_id, error_code::TOO_MANY, why));
            return;
        }
        let conn = self.new_conn();
        self.log(format!(
            "tunnel {tunnel_id}: dialing {} for {device_id}",
            endpoint_string(&cloud)
        ));
        self.push(Action::Dial {
            conn,
            endpoint: cloud,
            peer: Peer::Cloud,
        });
        self.tunnels.push(Tunnel {
            id: tunnel_id,
            conn,
            cloud,
            ticket,
            state: TunnelState::Connecting {
                deadline: now.saturating_add(DIAL_TIMEOUT_MS),
            },
            decoder: tunnel_decoder(),
            jobs: Vec::new(),
            job_count: 0,
            heard: now,
            job: None,
            share: None,
        });
    }

    pub(crate) fn tunnel_connected(&mut self, i: usize, _now: u64) {
        let t = &mut self.tunnels[i];
        let TunnelState::Connecting { deadline } = t.state else {
            return;
        };
        t.state = TunnelState::AwaitDialOk { deadline };
        let dial = RelayToCloud::Dial {
            version: PROTOCOL_VERSION,
            ticket: t.ticket.clone(),
        };
        let conn = t.conn;
        self.send_frame(conn, &dial);
    }

    pub(crate) fn tunnel_data(&mut self, i: usize, bytes: &[u8], now: u64) {
        let conn = self.tunnels[i].conn;
        self.tunnels[i].decoder.push(bytes);
        // Each message may end the tunnel; look it up again every time.
        while let Some(i) = self.tunnel_index(conn) {
            let t = &mut self.tunnels[i];
            let Some(next) = t.decoder.next_message() else {
                return;
            };
            t.heard = now;
            let result = match next {
                Ok(msg) => self.on_cloud(i, msg, now),
                Err(FrameError::TooLong(n)) => Err((
                    error_code::FRAME_TOO_LARGE,
                    format!("frame of {n} bytes over the {MAX_TUNNEL_FRAME}-byte limit"),
                )),
                Err(_) => Err((error_code::MALFORMED, "malformed frame".to_string())),
            };
            if let Err((code, message)) = result {
                self.tunnel_broken(conn, code, message);
            }
        }
    }

    fn on_cloud(&mut self, i: usize, msg: CloudToRelay, now: u64) -> Result<(), Broken> {
        let t = &mut self.tunnels[i];
        let (id, conn) = (t.id, t.conn);
        match (t.state, msg) {
            (TunnelState::AwaitDialOk { .. }, CloudToRelay::DialOk { tunnel_id }) => {
                if tunnel_id != id {
                    return Err((
                        error_code::MALFORMED,
                        format!("DialOk for tunnel {tunnel_id}, expected {id}"),
                    ));
                }
                t.state = TunnelState::Open;
                t.heard = now;
                let to = endpoint_string(&t.cloud);
                self.log(format!("tunnel {id} open to {to}"));
                self.report(RelayToMediator::TunnelAccepted { tunnel_id: id });
            }
            (TunnelState::AwaitDialOk { .. }, CloudToRelay::DialRefused { code, message }) => {
                self.tunnels.remove(i);
                self.push(Action::Close { conn });
                self.log(format!(
                    "tunnel {id} refused by the cloud server: {code} {message}"
                ));
                self.finish_report(id, failed(id, code, message));
            }
            (TunnelState::Open, CloudToRelay::SyncOpen { device_id }) => {
                return self.sync_open(i, device_id);
            }
            (TunnelState::Open, CloudToRelay::Share { bytes }) => {
                return self.share_from_cloud(i, bytes);
            }
            (TunnelState::Open, CloudToRelay::Job { .. }) if t.share.is_some() => {
                return Err((error_code::MALFORMED, "Job on a share tunnel".to_string()));
            }
            (TunnelState::Open, CloudToRelay::Job { .. }) if t.job.is_some() => {
                return Err((
                    error_code::MALFORMED,
                    "Job before the previous job's JobResult".to_string(),
                ));
            }
            (
                TunnelState::Open,
                CloudToRelay::Job {
                    job_id,
                    device_id,
                    pages,
                    seed,
                    width,
                    height,
                    document_len,
                    ..
                },
            ) => {
                if !valid_id(&job_id) {
                    return Err((error_code::MALFORMED, "invalid job id".to_string()));
                }
                if document_len > MAX_DOCUMENT_LEN {
                    return Err((
                        error_code::MALFORMED,
                        format!("document of {document_len} bytes over the {MAX_DOCUMENT_LEN}-byte limit"),
                    ));
                }
                let refused = (device_id != t.ticket.body.device_id).then(|| {
                    format!(
                        "{} device {device_id} is not this tunnel's ({})",
                        error_code::DEVICE_NOT_SERVED,
                        t.ticket.body.device_id
                    )
                });
                t.job_count = t.job_count.saturating_add(1);
                if t.jobs.len() < MAX_REPORTED_JOBS {
                    t.jobs.push(job_id.clone());
                }
                t.job = Some(Job {
                    job_id,
                    pages,
                    seed,
                    width,
                    height,
                    document_len,
                    received: 0,
                    crc: CRC32.digest(),
                    document_crc32: 0,
                    refused,
                    phase: JobPhase::Receiving,
                });
                if document_len == 0 {
                    self.document_complete(i, now);
                }
            }
            (TunnelState::Open, CloudToRelay::JobData { job_id, bytes }) => {
                let Some(job) = t
                    .job
                    .as_mut()
                    .filter(|j| j.job_id == job_id && matches!(j.phase, JobPhase::Receiving))
                else {
                    return Err((
                        error_code::MALFORMED,
                        format!("JobData for job {job_id}, which is not being sent"),
                    ));
                };
                if bytes.len() > MAX_DOCUMENT_CHUNK {
                    return Err((
                        error_code::MALFORMED,
                        format!(
                            "JobData of {} bytes over the {MAX_DOCUMENT_CHUNK}-byte limit",
                            bytes.len()
                        ),
                    ));
                }
                let total = job.received.saturating_add(bytes.len() as u64);
                if total > job.document_len {
                    return Err((
                        error_code::MALFORMED,
                        format!(
                            "more document bytes than announced ({total} > {})",
                            job.document_len
                        ),
                    ));
                }
                job.crc.update(&bytes);
                job.received = total;
                if total == job.document_len {
                    self.document_complete(i, now);
                }
            }
            (TunnelState::Open, CloudToRelay::Close) => {
                let closed = RelayToCloud::Closed { jobs: t.job_count };
                self.send_frame(conn, &closed);
                self.push(Action::Close { conn });
                self.end_tunnel(i, "");
            }
            (state, msg) => {
                return Err((
                    error_code::MALFORMED,
                    format!("unexpected {} in state {:?}", name(&msg), state),
                ));
            }
        }
        Ok(())
    }

    /// The whole document of tunnel `i`'s job arrived: refuse it, or hand it to the
    /// controller.
    fn document_complete(&mut self, i: usize, now: u64) {
        let t = &mut self.tunnels[i];
        let Some(job) = t.job.as_mut() else {
            return;
        };
        let digest = core::mem::replace(&mut job.crc, CRC32.digest());
        job.document_crc32 = digest.finalize();
        if let Some(why) = job.refused.clone() {
            let job_id = job.job_id.clone();
            self.log(format!("job {job_id} refused: {why}"));
            self.job_result(i, JobOutcome::Failed, Vec::new(), Some(why), now);
            return;
        }
        job.phase = JobPhase::Submit { sent: false };
        self.controller_tick(now);
    }

    /// Tunnel `i` is over (the connection is closed or being closed): report it.
    fn end_tunnel(&mut self, i: usize, how: &str) {
        let t = self.tunnels.remove(i);
        self.log(format!(
            "tunnel {} closed ({} jobs){how}",
            t.id, t.job_count
        ));
        self.finish_report(t.id, t.closed_report());
    }

    /// A protocol error on the tunnel of `conn`: `Error`, close, report.
    pub(crate) fn tunnel_broken(&mut self, conn: ConnId, code: u16, message: String) {
        let Some(i) = self.tunnel_index(conn) else {
            return;
        };
        let message = cut(message, MAX_MESSAGE_LEN);
        let err = RelayToCloud::Error {
            code,
            message: message.clone(),
        };
        self.send_frame(conn, &err);
        self.push(Action::Close { conn });
        let id = self.tunnels[i].id;
        if self.tunnels[i].is_open() {
            self.end_tunnel(
                i,
                &format!(": cloud server broke the protocol: {code} {message}"),
            );
        } else {
            self.tunnels.remove(i);
            self.log(format!(
                "tunnel {id} failed: cloud server broke the protocol: {code} {message}"
            ));
            self.finish_report(id, failed(id, code, message));
        }
    }

    /// The connection of tunnel `i` failed or was closed by the cloud server.
    pub(crate) fn tunnel_lost(&mut self, i: usize, why: &str) {
        if self.tunnels[i].is_open() {
            self.end_tunnel(i, &format!(": connection lost: {why}"));
        } else {
            let t = self.tunnels.remove(i);
            let message = format!("cannot reach {}: {why}", endpoint_string(&t.cloud));
            self.log(format!("tunnel {} failed: {message}", t.id));
            self.finish_report(t.id, failed(t.id, error_code::DIAL_FAILED, message));
        }
    }

    pub(crate) fn tunnels_tick(&mut self, now: u64) {
        let mut i = 0;
        while i < self.tunnels.len() {
            let t = &self.tunnels[i];
            if t.deadline().is_some_and(|d| now >= d) {
                let (conn, open) = (t.conn, t.is_open());
                self.push(Action::Close { conn });
                if open {
                    self.end_tunnel(i, &format!(": idle for {TUNNEL_IDLE_MS} ms"));
                } else {
                    let t = self.tunnels.remove(i);
                    let message = format!(
                        "{} did not answer within {DIAL_TIMEOUT_MS} ms",
                        endpoint_string(&t.cloud)
                    );
                    self.log(format!("tunnel {} failed: {message}", t.id));
                    self.finish_report(t.id, failed(t.id, error_code::DIAL_FAILED, message));
                }
                continue;
            }
            i += 1;
        }
    }

    /// Sends tunnel `i`'s job's `JobResult` and forgets the job.
    pub(crate) fn job_result(
        &mut self,
        i: usize,
        outcome: JobOutcome,
        checksums: Vec<u32>,
        error: Option<String>,
        now: u64,
    ) {
        let t = &mut self.tunnels[i];
        let Some(job) = t.job.take() else {
            return;
        };
        // The relay waits for the cloud server again: the idle minute starts now.
        t.heard = now;
        let conn = t.conn;
        let result = RelayToCloud::JobResult {
            job_id: job.job_id,
            outcome,
            checksums,
            document_crc32: job.document_crc32,
            error: error.map(|e| cut(e, MAX_MESSAGE_LEN)),
        };
        self.send_frame(conn, &result);
    }
}
