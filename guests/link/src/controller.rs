//! The controller's job table and engine link logic, without I/O: the firmware reports
//! what happened on its connections and carries out the returned [`Action`]s, in order.
//! See `docs/print-pipeline.md` and `docs/link-protocol.md`.
//!
//! * Host clients submit jobs; each gets an id (1, 2, ...). Jobs print in id order.
//! * Pages go to the engine one [`WINDOW`] at a time, each rendered by
//!   [`page_raster`]; a job is `done` when every page came back `PageDone` (checksums in
//!   page order), `failed` on a `PageFailed` or when the engine link resets while the job
//!   is printing. Queued jobs wait through resets and jams.
//! * After a `PageFailed`, and after each `Ready`, the controller asks the engine for its
//!   status and sends no page until the answer says the engine is not in `error`.
//! * Every host request gets exactly one reply, in request order per client, even when
//!   some answers wait for the engine.
//! * Coordinated snapshot: `PrepareSnapshot` from a host (the monitor) goes to the engine
//!   behind the pages already sent; the engine's approval (`SnapshotReady`) or denial
//!   (`Error` 409 with its reason) is the reply. Nothing is held: pages keep going out, and
//!   what is in flight when the monitor pauses the partitions is part of the snapshot set.
//!   `RequestSnapshot` from a host makes the firmware raise the request itself
//!   ([`Action::RequestSnapshot`]).
//! * `SubmitKeyedJob` is idempotent: a key the controller still remembers is answered with
//!   its job, nothing is queued again (the job table is in `controller_jobs.rs`).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::frame::{FrameError, MAX_FRAME};
use crate::msg::{
    error_code, EngineInfo, EngineState, FromEngine, HostReply, HostRequest, JobInfo, JobState,
    ToEngine, MAX_ACTIVE_JOBS, MAX_FINISHED_JOBS, MAX_JOB_KEY_LEN, MAX_JOB_PAGES, MAX_PAGE_PIXELS,
};
use crate::print::page_raster;

/// Pages sent to the engine and not answered yet, at most.
pub const WINDOW: usize = 2;
/// The reason of jobs failed by a link reset.
pub const ENGINE_RESET: &str = "engine connection reset";
/// The `error` of the engine status the controller reports while the link is down.
pub const ENGINE_NOT_CONNECTED: &str = "engine not connected";

/// A host client connection, as the firmware numbers them.
pub type ClientId = u64;

/// What the firmware must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a reply to a host client.
    Reply(ClientId, HostReply),
    /// Close the client's connection once what was queued for it has gone out.
    Close(ClientId),
    /// Send a message to the engine.
    Engine(ToEngine),
    /// The engine said `Ready` (the firmware prints its `READY` line on the first one).
    EngineReady,
    /// A line worth printing on the console.
    Log(String),
    /// Ask the monitor for a coordinated snapshot (the guest ABI's `SNAPSHOT_REQUEST`
    /// register); with `reboot`, the device restarts from the set once it is written.
    RequestSnapshot {
        /// Restart from the snapshot set.
        reboot: bool,
    },
}

/// The engine link as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Not connected.
    Down,
    /// Connected, `Ready` not received yet.
    Connected,
    /// Connected and the engine said `Ready`.
    Ready,
}

#[derive(Clone, Debug)]
struct Job {
    pages: u32,
    seed: u64,
    width: u16,
    height: u16,
    state: JobState,
    /// Pages sent to the engine so far.
    sent: u32,
    checksums: Vec<u32>,
    error: Option<String>,
    /// The `SubmitKeyedJob` key, if it came with one.
    key: Option<String>,
}

/// A request to the engine waiting for its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    Page {
        job: u64,
        page: u32,
    },
    /// `Status`, `Jam` or `ClearJam`; the answer fills a client's reply slot, if any.
    Status {
        reply: Option<(ClientId, u64)>,
    },
    /// `PrepareSnapshot`; the approval or denial fills a client's reply slot, if any.
    Snapshot {
        reply: Option<(ClientId, u64)>,
    },
    /// `ScanPage` (`controller_box.rs`).
    Scan {
        scan: u64,
        page: u32,
    },
}

impl Waiting {
    /// The client reply slot this request fills, if any.
    fn reply_mut(&mut self) -> Option<&mut Option<(ClientId, u64)>> {
        match self {
            Waiting::Page { .. } | Waiting::Scan { .. } => None,
            Waiting::Status { reply } | Waiting::Snapshot { reply } => Some(reply),
        }
    }
}

/// Replies of one client, kept in request order.
#[derive(Debug, Default)]
struct Client {
    /// Sequence number of `slots[0]`.
    first: u64,
    slots: VecDeque<Option<HostReply>>,
}

/// The controller.
#[derive(Debug)]
pub struct Controller {
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
    /// Ids of queued and printing jobs, in order.
    active: VecDeque<u64>,
    /// Ids of finished jobs, oldest first.
    finished: VecDeque<u64>,
    /// Job keys of remembered jobs (`SubmitKeyedJob`), to their job ids.
    keys: BTreeMap<String, u64>,
    link: Link,
    /// Requests to the engine, oldest first.
    waiting: VecDeque<Waiting>,
    /// No pages go out until a status answer arrives.
    hold: bool,
    /// The engine's last reported status.
    engine: EngineInfo,
    clients: BTreeMap<ClientId, Client>,
    /// Document requests for the firmware, and scans (`controller_box.rs`).
    docs: docs::Docs,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    /// A controller with no jobs and no engine link.
    pub fn new() -> Self {
        Controller {
            jobs: BTreeMap::new(),
            next_id: 1,
            active: VecDeque::new(),
            finished: VecDeque::new(),
            keys: BTreeMap::new(),
            link: Link::Down,
            waiting: VecDeque::new(),
            hold: false,
            engine: EngineInfo {
                state: EngineState::WarmingUp,
                pages_printed: 0,
                toner_pct: 100,
                error: Some(ENGINE_NOT_CONNECTED.to_string()),
            },
            clients: BTreeMap::new(),
            docs: docs::Docs::default(),
        }
    }

    /// The engine link state.
    pub fn link(&self) -> Link {
        self.link
    }

    /// The engine status the controller would report now without asking the engine.
    ///
    /// While the link is down: `warming_up` (the engine is starting, or unreachable) with
    /// the last known counters and the error [`ENGINE_NOT_CONNECTED`].
    pub fn engine_info(&self) -> EngineInfo {
        let mut info = self.engine.clone();
        if self.link == Link::Down {
            info.state = EngineState::WarmingUp;
            info.error = Some(ENGINE_NOT_CONNECTED.to_string());
        }
        info
    }

    /// One job's status.
    pub fn job(&self, id: u64) -> Option<JobInfo> {
        self.jobs.get(&id).map(|j| job_info(id, j))
    }

    /// Jobs queued or printing.
    pub fn active_jobs(&self) -> usize {
        self.active.len()
    }

    /// Pages (printed or scanned) sent to the engine and not answered.
    pub fn pages_in_flight(&self) -> usize {
        self.waiting
            .iter()
            .filter(|w| matches!(w, Waiting::Page { .. } | Waiting::Scan { .. }))
            .count()
    }

    /// Whether some request to the engine waits for its answer (a firmware that hears
    /// nothing from the engine for long while this is true should treat the link as dead).
    pub fn awaiting_engine(&self) -> bool {
        !self.waiting.is_empty()
    }

    // ---- host side ------------------------------------------------------------------

    /// A request from host client `client`.
    pub fn on_host(&mut self, client: ClientId, req: HostRequest) -> Vec<Action> {
        let mut out = Vec::new();
        let seq = self.open_slot(client);
        match req {
            HostRequest::SubmitJob {
                pages,
                seed,
                width,
                height,
            } => {
                let reply = self.submit(pages, seed, width, height, None, &mut out);
                self.fill(client, seq, reply, &mut out);
            }
            HostRequest::SubmitKeyedJob {
                key,
                pages,
                seed,
                width,
                height,
            } => {
                let reply = self.submit_keyed(key, pages, seed, width, height, &mut out);
                self.fill(client, seq, reply, &mut out);
            }
            HostRequest::JobStatus { id: Some(id) } => {
                let reply = match self.job(id) {
                    Some(info) => HostReply::Jobs(vec![info]),
                    None => error(error_code::UNKNOWN_JOB, format!("no job {id}")),
                };
                self.fill(client, seq, reply, &mut out);
            }
            HostRequest::JobStatus { id: None } => {
                let reply = HostReply::Jobs(self.all_jobs());
                self.fill(client, seq, reply, &mut out);
            }
            HostRequest::EngineStatus => {
                if self.link == Link::Down {
                    let reply = HostReply::Engine(self.engine_info());
                    self.fill(client, seq, reply, &mut out);
                } else {
                    self.ask_engine(ToEngine::Status, Some((client, seq)), &mut out);
                }
            }
            HostRequest::InjectCrash => {
                let reply = if self.link == Link::Down {
                    error(error_code::ENGINE_UNAVAILABLE, ENGINE_NOT_CONNECTED.into())
                } else {
                    out.push(Action::Log("forwarding Crash to the engine".into()));
                    out.push(Action::Engine(ToEngine::Crash));
                    HostReply::Engine(self.engine_info())
                };
                self.fill(client, seq, reply, &mut out);
            }
            HostRequest::PrepareSnapshot => {
                if self.link == Link::Down {
                    let reply = error(error_code::ENGINE_UNAVAILABLE, ENGINE_NOT_CONNECTED.into());
                    self.fill(client, seq, reply, &mut out);
                } else {
                    out.push(Action::Log("snapshot: asking the engine to prepare".into()));
                    self.waiting.push_back(Waiting::Snapshot {
                        reply: Some((client, seq)),
                    });
                    out.push(Action::Engine(ToEngine::PrepareSnapshot));
                }
            }
            HostRequest::RequestSnapshot { reboot } => {
                let reply = if self.link == Link::Down {
                    error(error_code::ENGINE_UNAVAILABLE, ENGINE_NOT_CONNECTED.into())
                } else {
                    out.push(Action::RequestSnapshot { reboot });
                    HostReply::Engine(self.engine_info())
                };
                self.fill(client, seq, reply, &mut out);
            }
            HostRequest::InjectJam | HostRequest::ClearJam => {
                if self.link == Link::Down {
                    let reply = error(error_code::ENGINE_UNAVAILABLE, ENGINE_NOT_CONNECTED.into());
                    self.fill(client, seq, reply, &mut out);
                } else {
                    let msg = if req == HostRequest::InjectJam {
                        ToEngine::Jam
                    } else {
                        ToEngine::ClearJam
                    };
                    out.push(Action::Log(format!("forwarding {msg:?} to the engine")));
                    self.ask_engine(msg, Some((client, seq)), &mut out);
                }
            }
            HostRequest::Box { account, op } => self.queue_box(client, seq, account, op),
            share => self.queue_share(client, seq, share),
        }
        self.pump(&mut out);
        out
    }

    /// Host client `client` sent a malformed frame: it gets an error and is closed;
    /// answers it was still waiting for are dropped.
    pub fn on_host_malformed(&mut self, client: ClientId, err: &FrameError) -> Vec<Action> {
        self.on_host_closed(client);
        vec![
            Action::Reply(
                client,
                error(
                    error_code::MALFORMED_FRAME,
                    format!("malformed frame: {err}"),
                ),
            ),
            Action::Close(client),
        ]
    }

    /// Host client `client`'s connection is gone.
    pub fn on_host_closed(&mut self, client: ClientId) {
        self.clients.remove(&client);
        for w in self.waiting.iter_mut() {
            if let Some(reply) = w.reply_mut() {
                if reply.is_some_and(|(c, _)| c == client) {
                    *reply = None;
                }
            }
        }
    }

    // ---- engine side ----------------------------------------------------------------

    /// The connection to the engine is established.
    pub fn on_engine_connected(&mut self) -> Vec<Action> {
        self.link = Link::Connected;
        self.waiting.clear();
        self.hold = false;
        vec![Action::Log("engine link connected".into())]
    }

    /// The engine link went down (reset, closed, or unusable): jobs printing fail, queued
    /// jobs stay, requests waiting for the engine get an error.
    pub fn on_engine_reset(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.link == Link::Down {
            return out;
        }
        self.link = Link::Down;
        self.hold = false;
        self.engine.error = Some(ENGINE_NOT_CONNECTED.to_string());
        for mut w in core::mem::take(&mut self.waiting) {
            if let Some(Some((client, seq))) = w.reply_mut().map(|r| r.take()) {
                let reply = error(error_code::ENGINE_UNAVAILABLE, ENGINE_RESET.into());
                self.fill(client, seq, reply, &mut out);
            }
        }
        let printing: Vec<u64> = self
            .active
            .iter()
            .copied()
            .filter(|id| {
                self.jobs
                    .get(id)
                    .is_some_and(|j| j.state == JobState::Printing)
            })
            .collect();
        for id in printing {
            self.finish(id, Some(ENGINE_RESET.into()), &mut out);
        }
        self.fail_all_scans(ENGINE_RESET, &mut out);
        out.push(Action::Log("engine link down".into()));
        out
    }

    /// A message from the engine.
    pub fn on_engine(&mut self, msg: FromEngine) -> Vec<Action> {
        let mut out = Vec::new();
        match msg {
            FromEngine::Ready => {
                if self.link == Link::Down {
                    return out;
                }
                self.link = Link::Ready;
                out.push(Action::EngineReady);
                // Learn whether it is jammed before sending pages.
                self.hold = true;
                self.ask_engine(ToEngine::Status, None, &mut out);
            }
            FromEngine::PageDone {
                job,
                page,
                checksum,
            } => {
                if self.take_page(job, page, &mut out) {
                    self.page_done(job, page, checksum, &mut out);
                }
            }
            FromEngine::PageFailed { job, page, reason } => {
                if self.take_page(job, page, &mut out) {
                    out.push(Action::Log(format!(
                        "job {job} page {page} failed: {reason}"
                    )));
                    if self.jobs.get(&job).is_some_and(|j| !j.state.is_finished()) {
                        self.finish(job, Some(reason), &mut out);
                    }
                    if !self.hold {
                        self.hold = true;
                        self.ask_engine(ToEngine::Status, None, &mut out);
                    }
                }
            }
            FromEngine::Status(info) => {
                let pos = self
                    .waiting
                    .iter()
                    .position(|w| matches!(w, Waiting::Status { .. }));
                let Some(pos) = pos else {
                    out.push(Action::Log("engine sent an unrequested status".into()));
                    return out;
                };
                let Some(Waiting::Status { reply }) = self.waiting.remove(pos) else {
                    unreachable!()
                };
                self.engine = info.clone();
                self.hold = false;
                if let Some((client, seq)) = reply {
                    self.fill(client, seq, HostReply::Engine(info), &mut out);
                }
            }
            FromEngine::SnapshotApproved { pages_printed } => {
                let Some(reply) = self.take_snapshot(&mut out) else {
                    return out;
                };
                self.engine.pages_printed = pages_printed;
                let jobs_queued = u32::try_from(self.active.len()).unwrap_or(u32::MAX);
                out.push(Action::Log(format!(
                    "snapshot: engine approved at {pages_printed} pages, {jobs_queued} jobs queued"
                )));
                if let Some((client, seq)) = reply {
                    let reply = HostReply::SnapshotReady {
                        engine_pages_printed: pages_printed,
                        jobs_queued,
                    };
                    self.fill(client, seq, reply, &mut out);
                }
            }
            FromEngine::SnapshotDenied { reason } => {
                let Some(reply) = self.take_snapshot(&mut out) else {
                    return out;
                };
                out.push(Action::Log(format!("snapshot: engine denied: {reason}")));
                if let Some((client, seq)) = reply {
                    self.fill(
                        client,
                        seq,
                        error(error_code::SNAPSHOT_DENIED, reason),
                        &mut out,
                    );
                }
            }
            FromEngine::ScannedPage { scan, page, bytes } => {
                self.on_scanned(scan, page, bytes, &mut out)
            }
            FromEngine::ScanFailed { scan, page, reason } => {
                self.on_scan_failed(scan, page, reason, &mut out)
            }
        }
        self.pump(&mut out);
        out
    }

    // ---- internals ------------------------------------------------------------------

    /// Sends a status-answered request to the engine.
    fn ask_engine(&mut self, msg: ToEngine, reply: Option<(ClientId, u64)>, out: &mut Vec<Action>) {
        self.waiting.push_back(Waiting::Status { reply });
        out.push(Action::Engine(msg));
    }

    /// Removes the oldest waiting `PrepareSnapshot`; its reply slot, or `None` (and a log
    /// line) if none was sent.
    fn take_snapshot(&mut self, out: &mut Vec<Action>) -> Option<Option<(ClientId, u64)>> {
        let pos = self
            .waiting
            .iter()
            .position(|w| matches!(w, Waiting::Snapshot { .. }));
        match pos.and_then(|p| self.waiting.remove(p)) {
            Some(Waiting::Snapshot { reply }) => Some(reply),
            _ => {
                out.push(Action::Log(
                    "engine answered a snapshot request that was not sent".into(),
                ));
                None
            }
        }
    }

    /// Removes the waiting page `(job, page)`; false (and a log line) if it was not sent.
    fn take_page(&mut self, job: u64, page: u32, out: &mut Vec<Action>) -> bool {
        let want = Waiting::Page { job, page };
        match self.waiting.iter().position(|w| *w == want) {
            Some(pos) => {
                self.waiting.remove(pos);
                true
            }
            None => {
                out.push(Action::Log(format!(
                    "engine answered job {job} page {page}, which was not sent"
                )));
                false
            }
        }
    }

    /// Sends pages while the engine can take them: scan pages first, then print pages.
    fn pump(&mut self, out: &mut Vec<Action>) {
        self.pump_scans(out);
        while self.link == Link::Ready
            && !self.hold
            && self.engine.state != EngineState::Error
            && self.pages_in_flight() < WINDOW
        {
            let next = self.active.iter().copied().find(|id| {
                self.jobs
                    .get(id)
                    .is_some_and(|j| !j.state.is_finished() && j.sent < j.pages)
            });
            let Some(id) = next else {
                return;
            };
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            let page = job.sent;
            job.sent += 1;
            job.state = JobState::Printing;
            self.waiting.push_back(Waiting::Page { job: id, page });
            out.push(Action::Engine(ToEngine::Print {
                job: id,
                page,
                width: job.width,
                height: job.height,
                raster: page_raster(job.seed, page, job.width, job.height),
            }));
        }
    }

    /// Reserves the next reply slot of `client`; returns its sequence number.
    fn open_slot(&mut self, client: ClientId) -> u64 {
        let c = self.clients.entry(client).or_default();
        c.slots.push_back(None);
        c.first + c.slots.len() as u64 - 1
    }

    /// Fills reply slot `seq` of `client` and sends every reply that is now in order.
    fn fill(&mut self, client: ClientId, seq: u64, reply: HostReply, out: &mut Vec<Action>) {
        let Some(c) = self.clients.get_mut(&client) else {
            return; // the client is gone
        };
        let Some(slot) = seq
            .checked_sub(c.first)
            .and_then(|i| c.slots.get_mut(i as usize))
        else {
            return;
        };
        *slot = Some(reply);
        while let Some(Some(_)) = c.slots.front() {
            if let Some(Some(reply)) = c.slots.pop_front() {
                c.first += 1;
                out.push(Action::Reply(client, reply));
            }
        }
    }
}

#[path = "controller_jobs.rs"]
mod jobs;

#[path = "controller_box.rs"]
mod docs;

pub use docs::{BoxRequest, ReplySlot, ScanDone, ScanRequest, ShareRequest, MAX_ACTIVE_SCANS};

use jobs::{error, job_info};

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
