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

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::frame::{FrameError, MAX_FRAME};
use crate::msg::{
    error_code, EngineInfo, EngineState, FromEngine, HostReply, HostRequest, JobInfo, JobState,
    ToEngine, MAX_ACTIVE_JOBS, MAX_FINISHED_JOBS, MAX_JOB_PAGES, MAX_PAGE_PIXELS,
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
}

impl Waiting {
    /// The client reply slot this request fills, if any.
    fn reply_mut(&mut self) -> Option<&mut Option<(ClientId, u64)>> {
        match self {
            Waiting::Page { .. } => None,
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
    link: Link,
    /// Requests to the engine, oldest first.
    waiting: VecDeque<Waiting>,
    /// No pages go out until a status answer arrives.
    hold: bool,
    /// The engine's last reported status.
    engine: EngineInfo,
    clients: BTreeMap<ClientId, Client>,
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

    /// Pages sent to the engine and not answered.
    pub fn pages_in_flight(&self) -> usize {
        self.waiting
            .iter()
            .filter(|w| matches!(w, Waiting::Page { .. }))
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
                let reply = self.submit(pages, seed, width, height, &mut out);
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
        }
        self.pump(&mut out);
        out
    }

    // ---- internals ------------------------------------------------------------------

    fn submit(
        &mut self,
        pages: u32,
        seed: u64,
        width: u16,
        height: u16,
        out: &mut Vec<Action>,
    ) -> HostReply {
        if pages == 0 || pages > MAX_JOB_PAGES {
            return error(
                error_code::INVALID_JOB,
                format!("pages must be 1..={MAX_JOB_PAGES}, not {pages}"),
            );
        }
        let pixels = u32::from(width) * u32::from(height);
        if width == 0 || height == 0 || pixels > MAX_PAGE_PIXELS {
            return error(
                error_code::INVALID_JOB,
                format!("page {width}x{height} is empty or over {MAX_PAGE_PIXELS} pixels"),
            );
        }
        if self.active.len() >= MAX_ACTIVE_JOBS {
            return error(
                error_code::QUEUE_FULL,
                format!("queue full ({MAX_ACTIVE_JOBS} jobs)"),
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        self.jobs.insert(
            id,
            Job {
                pages,
                seed,
                width,
                height,
                state: JobState::Queued,
                sent: 0,
                checksums: Vec::new(),
                error: None,
            },
        );
        self.active.push_back(id);
        out.push(Action::Log(format!(
            "job {id} queued: {pages} pages {width}x{height}"
        )));
        HostReply::JobAccepted { id }
    }

    /// All remembered jobs in id order; if they do not fit one frame, the newest that do.
    fn all_jobs(&self) -> Vec<JobInfo> {
        let budget = MAX_FRAME - 64 * 1024;
        let mut used = 0;
        let mut infos = Vec::new();
        for (&id, job) in self.jobs.iter().rev() {
            let size = 48 + 5 * job.checksums.len() + job.error.as_ref().map_or(0, String::len);
            if used + size > budget {
                break;
            }
            used += size;
            infos.push(job_info(id, job));
        }
        infos.reverse();
        infos
    }

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

    fn page_done(&mut self, id: u64, page: u32, checksum: u32, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state != JobState::Printing {
            return; // already failed
        }
        if page as usize != job.checksums.len() {
            let reason = format!(
                "engine answered page {page} before page {}",
                job.checksums.len()
            );
            self.finish(id, Some(reason), out);
            return;
        }
        job.checksums.push(checksum);
        if job.checksums.len() as u32 == job.pages {
            self.finish(id, None, out);
        }
    }

    /// Ends job `id`: done (`error` None) or failed.
    fn finish(&mut self, id: u64, error: Option<String>, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match &error {
            None => {
                job.state = JobState::Done;
                out.push(Action::Log(format!("job {id} done: {} pages", job.pages)));
            }
            Some(reason) => {
                job.state = JobState::Failed;
                out.push(Action::Log(format!(
                    "job {id} failed after {} of {} pages: {reason}",
                    job.checksums.len(),
                    job.pages
                )));
            }
        }
        job.error = error;
        self.active.retain(|&a| a != id);
        self.finished.push_back(id);
        while self.finished.len() > MAX_FINISHED_JOBS {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }

    /// Sends pages while the engine can take them.
    fn pump(&mut self, out: &mut Vec<Action>) {
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

fn job_info(id: u64, j: &Job) -> JobInfo {
    JobInfo {
        id,
        state: j.state,
        pages: j.pages,
        pages_done: j.checksums.len() as u32,
        checksums: j.checksums.clone(),
        error: j.error.clone(),
    }
}

fn error(code: u16, message: String) -> HostReply {
    HostReply::Error { code, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::print::{expected_page_checksum, gamma_table};

    /// Runs the controller against a real [`Engine`] until no engine message is left;
    /// returns the host replies.
    struct Rig {
        c: Controller,
        e: Engine,
        to_engine: VecDeque<ToEngine>,
        replies: Vec<(ClientId, HostReply)>,
        closed: Vec<ClientId>,
        ready_seen: usize,
        /// `reboot` of each [`Action::RequestSnapshot`].
        snapshot_requests: Vec<bool>,
    }

    impl Rig {
        fn new() -> Self {
            let mut e = Engine::new(gamma_table());
            e.calibrated();
            Rig {
                c: Controller::new(),
                e,
                to_engine: VecDeque::new(),
                replies: Vec::new(),
                closed: Vec::new(),
                ready_seen: 0,
                snapshot_requests: Vec::new(),
            }
        }

        fn apply(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Reply(c, r) => self.replies.push((c, r)),
                    Action::Close(c) => self.closed.push(c),
                    Action::Engine(m) => self.to_engine.push_back(m),
                    Action::EngineReady => self.ready_seen += 1,
                    Action::Log(_) => {}
                    Action::RequestSnapshot { reboot } => self.snapshot_requests.push(reboot),
                }
            }
        }

        fn connect(&mut self) {
            let a = self.c.on_engine_connected();
            self.apply(a);
            let a = self.c.on_engine(FromEngine::Ready);
            self.apply(a);
        }

        /// Lets the engine answer `n` messages (all if None).
        fn run_engine(&mut self, n: Option<usize>) {
            let mut left = n.unwrap_or(usize::MAX);
            while left > 0 {
                let Some(m) = self.to_engine.pop_front() else {
                    break;
                };
                let r = self.e.handle(m, 0);
                let a = self.c.on_engine(r);
                self.apply(a);
                left -= 1;
            }
        }

        fn host(&mut self, client: ClientId, req: HostRequest) {
            let a = self.c.on_host(client, req);
            self.apply(a);
        }

        fn take_replies(&mut self) -> Vec<(ClientId, HostReply)> {
            core::mem::take(&mut self.replies)
        }
    }

    fn submit(pages: u32, seed: u64) -> HostRequest {
        HostRequest::SubmitJob {
            pages,
            seed,
            width: 32,
            height: 16,
        }
    }

    #[test]
    fn jobs_print_to_done_with_checksums_in_page_order() {
        let mut r = Rig::new();
        r.host(7, submit(3, 11));
        r.host(7, submit(2, 12));
        assert_eq!(
            r.take_replies(),
            vec![
                (7, HostReply::JobAccepted { id: 1 }),
                (7, HostReply::JobAccepted { id: 2 })
            ]
        );
        // Nothing is sent before the engine is there.
        assert!(r.to_engine.is_empty());
        assert_eq!(r.c.job(1).unwrap().state, JobState::Queued);
        r.connect();
        assert_eq!(r.ready_seen, 1);
        r.run_engine(None);
        for (id, seed, pages) in [(1, 11, 3), (2, 12, 2)] {
            let j = r.c.job(id).unwrap();
            assert_eq!(j.state, JobState::Done);
            assert_eq!(j.pages_done, pages);
            let want: Vec<u32> = (0..pages)
                .map(|p| expected_page_checksum(seed, p, 32, 16))
                .collect();
            assert_eq!(j.checksums, want);
            assert_eq!(j.error, None);
        }
        assert_eq!(r.e.pages_printed(), 5);
        assert_eq!(r.c.active_jobs(), 0);
    }

    #[test]
    fn window_limits_pages_in_flight() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(Some(1)); // the status after Ready
        r.host(1, submit(10, 1));
        assert_eq!(r.to_engine.len(), WINDOW);
        assert_eq!(r.c.pages_in_flight(), WINDOW);
        r.run_engine(Some(1));
        assert_eq!(r.to_engine.len(), WINDOW);
        assert_eq!(r.c.job(1).unwrap().state, JobState::Printing);
        assert_eq!(r.c.job(1).unwrap().pages_done, 1);
    }

    #[test]
    fn reset_fails_printing_jobs_and_keeps_queued_ones() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(Some(1));
        r.host(1, submit(5, 1)); // pages 0 and 1 go out
        r.host(1, submit(2, 2));
        r.run_engine(Some(1)); // page 0 done, page 2 goes out
        let a = r.c.on_engine_reset();
        r.apply(a);
        r.to_engine.clear();
        let j1 = r.c.job(1).unwrap();
        assert_eq!(j1.state, JobState::Failed);
        assert_eq!(j1.error.as_deref(), Some(ENGINE_RESET));
        assert_eq!(j1.checksums, vec![expected_page_checksum(1, 0, 32, 16)]);
        assert_eq!(r.c.job(2).unwrap().state, JobState::Queued);
        // Reconnect: job 2 prints.
        r.connect();
        r.run_engine(None);
        assert_eq!(r.c.job(2).unwrap().state, JobState::Done);
        assert_eq!(r.c.job(1).unwrap().state, JobState::Failed);
    }

    #[test]
    fn inject_crash_is_forwarded_without_waiting_and_refused_without_an_engine() {
        let mut r = Rig::new();
        r.host(1, HostRequest::InjectCrash);
        let replies = r.take_replies();
        let [(1, HostReply::Error { code, .. })] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(*code, error_code::ENGINE_UNAVAILABLE);
        assert!(r.to_engine.is_empty());
        r.connect();
        r.host(1, submit(3, 1));
        r.run_engine(Some(1));
        r.host(1, HostRequest::InjectCrash);
        let replies = r.take_replies();
        assert!(
            matches!(replies.last(), Some((1, HostReply::Engine(_)))),
            "answered at once: {replies:?}"
        );
        assert_eq!(r.to_engine.back(), Some(&ToEngine::Crash));
        // The engine dies: its link resets and the printing job fails.
        r.to_engine.clear();
        let a = r.c.on_engine_reset();
        r.apply(a);
        let job = r.c.job(1).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.error.as_deref(), Some(ENGINE_RESET));
    }

    #[test]
    fn jam_fails_the_job_and_holds_the_queue_until_cleared() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.host(1, HostRequest::InjectJam);
        r.run_engine(None);
        let replies = r.take_replies();
        let [(1, HostReply::Engine(info))] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(info.state, EngineState::Error);
        // A job submitted while jammed waits.
        r.host(1, submit(2, 3));
        r.run_engine(None);
        assert_eq!(r.c.job(1).unwrap().state, JobState::Queued);
        r.host(1, HostRequest::ClearJam);
        r.run_engine(None);
        assert_eq!(r.c.job(1).unwrap().state, JobState::Done);

        // A jam while printing fails that job (PageFailed), the next one waits.
        r.host(1, submit(4, 4));
        r.host(1, submit(1, 5));
        r.e.handle(ToEngine::Jam, 0);
        r.run_engine(None);
        let j = r.c.job(2).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("paper jam"));
        assert_eq!(r.c.job(3).unwrap().state, JobState::Queued);
        r.host(1, HostRequest::ClearJam);
        r.run_engine(None);
        assert_eq!(r.c.job(3).unwrap().state, JobState::Done);
    }

    #[test]
    fn replies_keep_request_order_per_client() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.take_replies();
        r.host(1, HostRequest::EngineStatus); // waits for the engine
        r.host(1, HostRequest::JobStatus { id: None }); // immediate
        r.host(2, HostRequest::JobStatus { id: Some(99) }); // other client: not held up
        let replies = r.take_replies();
        assert_eq!(
            replies,
            vec![(
                2,
                HostReply::Error {
                    code: error_code::UNKNOWN_JOB,
                    message: "no job 99".into()
                }
            )]
        );
        r.run_engine(None);
        let replies = r.take_replies();
        assert_eq!(replies.len(), 2);
        assert!(matches!(replies[0], (1, HostReply::Engine(_))));
        assert_eq!(replies[1], (1, HostReply::Jobs(vec![])));
    }

    #[test]
    fn engine_requests_without_a_link() {
        let mut r = Rig::new();
        r.host(1, HostRequest::EngineStatus);
        r.host(1, HostRequest::InjectJam);
        let replies = r.take_replies();
        let (1, HostReply::Engine(info)) = &replies[0] else {
            panic!()
        };
        assert_eq!(info.state, EngineState::WarmingUp);
        assert_eq!(info.error.as_deref(), Some(ENGINE_NOT_CONNECTED));
        assert!(matches!(
            replies[1],
            (
                1,
                HostReply::Error {
                    code: error_code::ENGINE_UNAVAILABLE,
                    ..
                }
            )
        ));
        // A request waiting for the engine when the link resets gets an error.
        r.connect();
        r.run_engine(None);
        r.host(1, HostRequest::EngineStatus);
        let a = r.c.on_engine_reset();
        r.apply(a);
        let replies = r.take_replies();
        assert!(matches!(
            replies.as_slice(),
            [(
                1,
                HostReply::Error {
                    code: error_code::ENGINE_UNAVAILABLE,
                    ..
                }
            )]
        ));
        // Afterwards: the last known counters, but not the last known state.
        r.host(1, HostRequest::EngineStatus);
        let replies = r.take_replies();
        let [(1, HostReply::Engine(info))] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(info.state, EngineState::WarmingUp);
        assert_eq!(info.error.as_deref(), Some(ENGINE_NOT_CONNECTED));
    }

    #[test]
    fn invalid_jobs_and_queue_limit() {
        let mut r = Rig::new();
        for bad in [
            submit(0, 1),
            submit(MAX_JOB_PAGES + 1, 1),
            HostRequest::SubmitJob {
                pages: 1,
                seed: 1,
                width: 0,
                height: 5,
            },
            HostRequest::SubmitJob {
                pages: 1,
                seed: 1,
                width: 1024,
                height: 1024,
            },
        ] {
            r.host(1, bad);
        }
        let replies = r.take_replies();
        assert_eq!(replies.len(), 4);
        assert!(replies.iter().all(|(_, rep)| matches!(
            rep,
            HostReply::Error {
                code: error_code::INVALID_JOB,
                ..
            }
        )));
        for _ in 0..MAX_ACTIVE_JOBS {
            r.host(1, submit(1, 1));
        }
        r.take_replies();
        r.host(1, submit(1, 1));
        assert!(matches!(
            r.take_replies().as_slice(),
            [(
                1,
                HostReply::Error {
                    code: error_code::QUEUE_FULL,
                    ..
                }
            )]
        ));
        // Once they print, there is room again, and old finished jobs are forgotten.
        r.connect();
        r.run_engine(None);
        assert_eq!(r.c.active_jobs(), 0);
        for _ in 0..10 {
            r.host(1, submit(1, 1));
        }
        r.run_engine(None);
        assert!(r.c.job(1).is_none());
        assert!(r.c.job(11).is_some());
        let replies = r.take_replies();
        assert_eq!(replies.len(), 10);
        r.host(1, HostRequest::JobStatus { id: None });
        let replies = r.take_replies();
        let [(1, HostReply::Jobs(all))] = replies.as_slice() else {
            panic!()
        };
        assert_eq!(all.len(), MAX_FINISHED_JOBS);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(all.last().unwrap().id, MAX_ACTIVE_JOBS as u64 + 10);
    }

    #[test]
    fn malformed_frame_closes_only_that_client() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.host(1, HostRequest::EngineStatus);
        let a = r.c.on_host_malformed(1, &FrameError::Decode);
        r.apply(a);
        r.run_engine(None); // the status answer has nowhere to go
        let replies = r.take_replies();
        assert!(matches!(
            replies.as_slice(),
            [(
                1,
                HostReply::Error {
                    code: error_code::MALFORMED_FRAME,
                    ..
                }
            )]
        ));
        assert_eq!(r.closed, vec![1]);
        r.host(2, submit(1, 1));
        r.run_engine(None);
        assert_eq!(r.c.job(1).unwrap().state, JobState::Done);
    }

    #[test]
    fn snapshot_is_ready_only_after_the_pages_sent_before_it_and_printing_goes_on() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.host(1, submit(5, 7)); // pages 0 and 1 go out
        r.take_replies();
        r.host(9, HostRequest::PrepareSnapshot);
        assert_eq!(r.to_engine.len(), 3);
        assert_eq!(r.to_engine.back(), Some(&ToEngine::PrepareSnapshot));
        assert!(r.c.awaiting_engine());
        // Page 0 answered: page 2 goes out behind the request; no reply yet.
        r.run_engine(Some(1));
        assert!(r.take_replies().is_empty());
        assert!(matches!(
            r.to_engine.back(),
            Some(ToEngine::Print { page: 2, .. })
        ));
        // Page 1 answered: still no reply.
        r.run_engine(Some(1));
        assert!(r.take_replies().is_empty());
        // The approval counts both pages sent before the request, and no later one.
        r.run_engine(Some(1));
        assert_eq!(
            r.take_replies(),
            vec![(
                9,
                HostReply::SnapshotReady {
                    engine_pages_printed: 2,
                    jobs_queued: 1
                }
            )]
        );
        assert_eq!(r.c.engine_info().pages_printed, 2);
        // Nothing was held: the job finishes, and no guest-side request was raised.
        r.run_engine(None);
        let job = r.c.job(1).unwrap();
        assert_eq!(job.state, JobState::Done);
        assert_eq!(
            job.checksums,
            (0..5)
                .map(|p| expected_page_checksum(7, p, 32, 16))
                .collect::<Vec<_>>()
        );
        assert!(r.snapshot_requests.is_empty());
        assert!(!r.c.awaiting_engine());
    }

    #[test]
    fn snapshot_is_denied_while_jammed_with_the_engines_reason() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.host(1, HostRequest::InjectJam);
        r.run_engine(None);
        r.take_replies();
        r.host(1, HostRequest::PrepareSnapshot);
        r.run_engine(None);
        assert_eq!(
            r.take_replies(),
            vec![(
                1,
                HostReply::Error {
                    code: error_code::SNAPSHOT_DENIED,
                    message: "paper jam".into()
                }
            )]
        );
        // A denial changes nothing: the link stays up, and once cleared it approves.
        assert_eq!(r.c.link(), Link::Ready);
        r.host(1, HostRequest::ClearJam);
        r.host(1, HostRequest::PrepareSnapshot);
        r.run_engine(None);
        let replies = r.take_replies();
        assert!(
            matches!(replies[0], (1, HostReply::Engine(_))),
            "{replies:?}"
        );
        assert_eq!(
            replies[1],
            (
                1,
                HostReply::SnapshotReady {
                    engine_pages_printed: 0,
                    jobs_queued: 0
                }
            )
        );
    }

    #[test]
    fn snapshot_without_the_engine_is_503() {
        let mut r = Rig::new();
        r.host(1, HostRequest::PrepareSnapshot);
        r.host(1, HostRequest::RequestSnapshot { reboot: true });
        let replies = r.take_replies();
        assert_eq!(replies.len(), 2);
        assert!(replies.iter().all(|rep| matches!(
            rep,
            (
                1,
                HostReply::Error {
                    code: error_code::ENGINE_UNAVAILABLE,
                    ..
                }
            )
        )));
        assert!(r.to_engine.is_empty());
        assert!(r.snapshot_requests.is_empty());
        // The link resets while the engine prepares: 503, and the job printing fails as
        // on any reset.
        r.connect();
        r.run_engine(None);
        r.host(1, submit(3, 1));
        r.host(1, HostRequest::PrepareSnapshot);
        r.take_replies();
        r.to_engine.clear();
        let a = r.c.on_engine_reset();
        r.apply(a);
        assert_eq!(
            r.take_replies(),
            vec![(
                1,
                HostReply::Error {
                    code: error_code::ENGINE_UNAVAILABLE,
                    message: ENGINE_RESET.into()
                }
            )]
        );
        assert_eq!(r.c.job(1).unwrap().state, JobState::Failed);
        // A client that goes away while the engine prepares gets nothing, and the answer
        // is still consumed (the next status request is answered).
        r.connect();
        r.host(2, HostRequest::PrepareSnapshot);
        r.c.on_host_closed(2);
        r.host(3, HostRequest::EngineStatus);
        r.run_engine(None);
        let replies = r.take_replies();
        assert!(
            matches!(replies.as_slice(), [(3, HostReply::Engine(_))]),
            "{replies:?}"
        );
        assert!(!r.c.awaiting_engine());
    }

    #[test]
    fn snapshot_replies_keep_request_order_per_client() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.take_replies();
        r.host(1, HostRequest::PrepareSnapshot); // waits for the engine
        r.host(1, HostRequest::JobStatus { id: None }); // immediate, but behind it
        r.host(2, HostRequest::JobStatus { id: None }); // other client: not held up
        r.host(1, HostRequest::EngineStatus); // waits for the engine, after the snapshot
        assert_eq!(r.take_replies(), vec![(2, HostReply::Jobs(vec![]))]);
        r.run_engine(Some(1));
        let replies = r.take_replies();
        assert_eq!(
            replies,
            vec![
                (
                    1,
                    HostReply::SnapshotReady {
                        engine_pages_printed: 0,
                        jobs_queued: 0
                    }
                ),
                (1, HostReply::Jobs(vec![])),
            ]
        );
        r.run_engine(None);
        let replies = r.take_replies();
        assert!(matches!(replies.as_slice(), [(1, HostReply::Engine(_))]));
    }

    #[test]
    fn request_snapshot_raises_the_request_and_answers_at_once() {
        let mut r = Rig::new();
        r.connect();
        r.run_engine(None);
        r.take_replies();
        let a =
            r.c.on_host(5, HostRequest::RequestSnapshot { reboot: true });
        assert!(matches!(
            a.as_slice(),
            [
                Action::RequestSnapshot { reboot: true },
                Action::Reply(5, HostReply::Engine(_))
            ]
        ));
        r.apply(a);
        r.host(5, HostRequest::RequestSnapshot { reboot: false });
        assert_eq!(r.snapshot_requests, vec![true, false]);
        // Nothing goes to the engine: the monitor runs the protocol (PrepareSnapshot).
        assert!(r.to_engine.is_empty());
        let replies = r.take_replies();
        let [(5, HostReply::Engine(info)), (5, HostReply::Engine(_))] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(info.state, EngineState::Ready);
    }

    #[test]
    fn all_jobs_fit_one_frame() {
        let mut c = Controller::new();
        for id in 1..=300u64 {
            c.jobs.insert(
                id,
                Job {
                    pages: MAX_JOB_PAGES,
                    seed: 0,
                    width: 1,
                    height: 1,
                    state: JobState::Done,
                    sent: MAX_JOB_PAGES,
                    checksums: vec![u32::MAX; MAX_JOB_PAGES as usize],
                    error: None,
                },
            );
        }
        let all = c.all_jobs();
        assert!(all.len() < 300);
        assert_eq!(all.last().unwrap().id, 300);
        let frame = crate::try_encode(&HostReply::Jobs(all)).expect("fits");
        assert!(frame.len() <= MAX_FRAME);
    }
}
