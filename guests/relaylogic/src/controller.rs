//! The link to the controller partition (vsock, job port 1024, `docs/link-protocol.md`)
//! and the jobs on it: each job a tunnel received is submitted keyed by its cloud job id
//! (`SubmitKeyedJob`), then polled (`JobStatus`) until it finishes; its result goes back
//! on the tunnel.
//!
//! Replies come one per request, in order, so the relay keeps its requests in a queue
//! ([`Pending`]). When the link drops, requests in flight are forgotten and sent again on
//! the next connection: a `SubmitKeyedJob` sent twice is harmless (the controller answers
//! the first job's id, `duplicate: true`), and a poll is a read.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use duplex_link::{HostReply, HostRequest};
use duplex_tunnel::{JobOutcome, RelayToCloud};

use crate::action::Action;
use crate::relay::{Relay, CONTROLLER_RETRY_MS, JOB_POLL_FIRST_MS, JOB_POLL_MS};

/// How long a vsock connection request to the controller may go unanswered.
const CONTROLLER_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// Where a job is between the relay and the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JobPhase {
    /// Its document is arriving.
    Receiving,
    /// To be submitted (`sent`: the request is out).
    Submit { sent: bool },
    /// Accepted by the controller as `device_job`; polled at `next_at`, then `wait` ms after
    /// the answer (doubling up to [`JOB_POLL_MS`]).
    Poll {
        device_job: u64,
        duplicate: bool,
        sent: bool,
        next_at: u64,
        wait: u64,
    },
}

/// The controller connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CtlState {
    /// Not connected; next attempt at `retry_at`.
    Down {
        retry_at: u64,
    },
    /// Connection requested; given up at `deadline`.
    Connecting {
        deadline: u64,
    },
    Up,
}

/// What a request in flight was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PendingKind {
    Submit,
    Status,
    /// A share request (`share.rs`) of the tunnel.
    Share,
}

/// A request in flight: for which tunnel's job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    pub tunnel: u64,
    pub job_id: String,
    pub kind: PendingKind,
}

impl Relay {
    pub(crate) fn controller_deadline(&self) -> Option<u64> {
        match self.ctl {
            CtlState::Down { retry_at } => Some(retry_at),
            CtlState::Connecting { deadline } => Some(deadline),
            CtlState::Up => self
                .tunnels
                .iter()
                .filter_map(|t| match t.job.as_ref()?.phase {
                    JobPhase::Poll {
                        sent: false,
                        next_at,
                        ..
                    } => Some(next_at),
                    JobPhase::Submit { sent: false } => Some(0),
                    _ => None,
                })
                .min(),
        }
    }

    /// Connects, gives up on a stale attempt, and sends the requests that are due.
    pub(crate) fn controller_tick(&mut self, now: u64) {
        match self.ctl {
            CtlState::Down { retry_at } if now >= retry_at => {
                self.ctl = CtlState::Connecting {
                    deadline: now.saturating_add(CONTROLLER_CONNECT_TIMEOUT_MS),
                };
                self.push(Action::ControllerConnect);
                return;
            }
            CtlState::Connecting { deadline } if now >= deadline => {
                self.push(Action::ControllerClose);
                self.controller_failed(now, "no answer");
                return;
            }
            CtlState::Up => {}
            _ => return,
        }
        let mut requests = Vec::new();
        for t in self.tunnels.iter_mut() {
            let Some(job) = t.job.as_mut() else {
                continue;
            };
            let kind = match &mut job.phase {
                JobPhase::Submit { sent } if !*sent => {
                    *sent = true;
                    requests.push(HostRequest::SubmitKeyedJob {
                        key: job.job_id.clone(),
                        pages: job.pages,
                        seed: job.seed,
                        width: job.width,
                        height: job.height,
                    });
                    PendingKind::Submit
                }
                JobPhase::Poll {
                    device_job,
                    sent,
                    next_at,
                    ..
                } if !*sent && now >= *next_at => {
                    *sent = true;
                    requests.push(HostRequest::JobStatus {
                        id: Some(*device_job),
                    });
                    PendingKind::Status
                }
                _ => continue,
            };
            self.pending.push_back(Pending {
                tunnel: t.id,
                job_id: job.job_id.clone(),
                kind,
            });
        }
        for r in requests {
            self.push(Action::ControllerSend(r));
        }
    }

    pub(crate) fn controller_connected(&mut self, now: u64) {
        if !matches!(self.ctl, CtlState::Connecting { .. }) {
            return;
        }
        self.ctl = CtlState::Up;
        self.ctl_failures = 0;
        let cid = self.cfg.controller_cid;
        self.log(format!("controller connected (cid {cid})"));
        self.controller_tick(now);
    }

    pub(crate) fn controller_closed(&mut self, now: u64) {
        match self.ctl {
            CtlState::Connecting { .. } => self.controller_failed(now, "refused"),
            CtlState::Up => {
                self.log("controller connection lost; reconnecting".into());
                self.controller_down(now);
            }
            CtlState::Down { .. } => {}
        }
    }

    fn controller_failed(&mut self, now: u64, why: &str) {
        if self.ctl_failures.is_multiple_of(100) {
            let cid = self.cfg.controller_cid;
            self.log(format!(
                "controller at cid {cid}: {why}; retrying every {CONTROLLER_RETRY_MS} ms"
            ));
        }
        self.ctl_failures += 1;
        self.controller_down(now);
    }

    /// The link is gone: requests in flight are sent again on the next connection.
    pub(crate) fn controller_down(&mut self, now: u64) {
        self.ctl = CtlState::Down {
            retry_at: now.saturating_add(CONTROLLER_RETRY_MS),
        };
        self.pending.clear();
        self.shares_lost();
        for t in self.tunnels.iter_mut() {
            if let Some(job) = t.job.as_mut() {
                match &mut job.phase {
                    JobPhase::Submit { sent } | JobPhase::Poll { sent, .. } => *sent = false,
                    JobPhase::Receiving => {}
                }
            }
        }
    }

    pub(crate) fn controller_reply(&mut self, reply: HostReply, now: u64) {
        let Some(p) = self.pending.pop_front() else {
            self.on_controller_malformed("a reply to no request", now);
            return;
        };
        if p.kind == PendingKind::Share {
            self.share_reply(p.tunnel, reply, now);
            return;
        }
        // The tunnel and job may be gone (closed, restored): the reply is then dropped.
        let i = self
            .tunnels
            .iter()
            .position(|t| t.id == p.tunnel && t.job.as_ref().is_some_and(|j| j.job_id == p.job_id));
        match (p.kind, reply) {
            (PendingKind::Submit, HostReply::KeyedJobAccepted { id, duplicate }) => {
                let Some(i) = i else { return };
                let t = &mut self.tunnels[i];
                let conn = t.conn;
                let Some(job) = t.job.as_mut() else { return };
                job.phase = JobPhase::Poll {
                    device_job: id,
                    duplicate,
                    sent: false,
                    next_at: now.saturating_add(JOB_POLL_FIRST_MS),
                    wait: JOB_POLL_FIRST_MS,
                };
                let accepted = RelayToCloud::JobAccepted {
                    job_id: job.job_id.clone(),
                    device_job: id,
                    duplicate,
                };
                self.send_frame(conn, &accepted);
            }
            (PendingKind::Status, HostReply::Jobs(list)) => {
                let Some(i) = i else { return };
                self.job_status(i, list, now);
            }
            (_, HostReply::Error { code, message }) => {
                let Some(i) = i else { return };
                let (job_id, device_job) = self.job_ids(i);
                let error = format!("{code} {message}");
                self.log(format!("job {job_id} failed ({device_job}): {error}"));
                self.job_result(i, JobOutcome::Failed, Vec::new(), Some(error), now);
            }
            (kind, other) => {
                let why = format!("unexpected reply {other:?} to a {kind:?} request");
                self.on_controller_malformed(&why, now);
            }
        }
    }

    /// The job's cloud id, and its device job as `device job N` (or `not accepted`).
    fn job_ids(&self, i: usize) -> (String, String) {
        match self.tunnels[i].job.as_ref() {
            Some(j) => {
                let device = match j.phase {
                    JobPhase::Poll { device_job, .. } => format!("device job {device_job}"),
                    _ => "not accepted".into(),
                };
                (j.job_id.clone(), device)
            }
            None => (String::new(), String::new()),
        }
    }

    fn job_status(&mut self, i: usize, list: Vec<duplex_link::JobInfo>, now: u64) {
        let Some(job) = self.tunnels[i].job.as_mut() else {
            return;
        };
        let JobPhase::Poll {
            device_job,
            duplicate,
            sent,
            next_at,
            wait,
        } = &mut job.phase
        else {
            return;
        };
        let (device_job, duplicate) = (*device_job, *duplicate);
        let Some(info) = list.into_iter().find(|j| j.id == device_job) else {
            let job_id = job.job_id.clone();
            let error = format!("404 device job {device_job} not in the controller's answer");
            self.log(format!(
                "job {job_id} failed (device job {device_job}): {error}"
            ));
            self.job_result(i, JobOutcome::Failed, Vec::new(), Some(error), now);
            return;
        };
        if !info.state.is_finished() {
            *sent = false;
            *wait = wait.saturating_mul(2).min(JOB_POLL_MS);
            *next_at = now.saturating_add(*wait);
            return;
        }
        let job_id = job.job_id.clone();
        let outcome = if info.state == duplex_link::JobState::Done {
            self.log(format!(
                "job {job_id} done (device job {device_job}, duplicate={duplicate})"
            ));
            JobOutcome::Done
        } else {
            let why = info.error.clone().unwrap_or_default();
            self.log(format!(
                "job {job_id} failed (device job {device_job}, duplicate={duplicate}): {why}"
            ));
            JobOutcome::Failed
        };
        self.job_result(i, outcome, info.checksums, info.error, now);
    }
}
