//! The simulated relay's device: the device firmware's own print logic in process, the
//! controller ([`duplex_link::controller::Controller`]) driving the engine
//! ([`duplex_link::engine::Engine`], calibrated, halftoning through
//! [`duplex_link::gamma_table`]) over an in-memory link. The relay's controller requests
//! (`SubmitKeyedJob`, `JobStatus`) are answered exactly as on the device: a job key seen
//! before is answered with the first job's id and `duplicate: true`, and printed once.
//!
//! The engine answers its messages in order, each when its time has come: a page costs
//! nothing, except that a job's first page waits the device's print delay
//! ([`FakeDevice::with_delay`]). Time passes whenever the device is used (a request, or
//! [`FakeDevice::prints`]), so a job in progress moves on as the relay polls it. The device
//! outlives the relays that use it, as the controller partition outlives the relay's
//! connections.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use duplex_link::controller::{Action, ClientId, Controller};
use duplex_link::engine::Engine;
use duplex_link::{gamma_table, FromEngine, HostReply, HostRequest, JobState, ToEngine};

/// A message on its way to the engine, and when the engine has answered it.
struct InFlight {
    msg: ToEngine,
    done_at: Instant,
}

/// The device's state.
struct Inner {
    controller: Controller,
    engine: Engine,
    /// Messages to the engine, in order.
    link: VecDeque<InFlight>,
    /// When the engine is done with the last message sent to it.
    engine_free_at: Instant,
    /// Replies waiting for each connected client, in order.
    clients: HashMap<ClientId, VecDeque<HostReply>>,
    next_client: ClientId,
    /// Job keys the controller accepted, to their device job ids.
    keys: HashMap<String, u64>,
    /// Jobs accepted and not finished yet (counted in `prints` when done).
    unfinished: Vec<u64>,
    prints: u64,
    /// When the device started (the engine's clock).
    started: Instant,
    /// How long the engine takes before the first page of each job.
    print_delay: Duration,
}

/// The device behind a simulated relay (see the module documentation).
pub struct FakeDevice {
    inner: Mutex<Inner>,
    /// How long the engine takes before the first page of each job.
    pub print_delay: Duration,
}

impl Default for FakeDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeDevice {
    /// A device that prints at once.
    pub fn new() -> Self {
        Self::with_delay(Duration::ZERO)
    }

    /// A device whose engine takes `delay` before each job's first page.
    pub fn with_delay(delay: Duration) -> Self {
        let now = Instant::now();
        let mut engine = Engine::new(gamma_table());
        let ready = engine.calibrated();
        let mut inner = Inner {
            controller: Controller::new(),
            engine,
            link: VecDeque::new(),
            engine_free_at: now,
            clients: HashMap::new(),
            next_client: 1,
            keys: HashMap::new(),
            unfinished: Vec::new(),
            prints: 0,
            started: now,
            print_delay: delay,
        };
        // The engine link comes up and the calibrated engine greets the controller.
        let actions = inner.controller.on_engine_connected();
        inner.apply(actions, now);
        let actions = inner.controller.on_engine(ready);
        inner.apply(actions, now);
        inner.pump(now);
        FakeDevice {
            inner: Mutex::new(inner),
            print_delay: delay,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many jobs were printed to the end (a duplicate is not printed again).
    pub fn prints(&self) -> u64 {
        let mut inner = self.lock();
        inner.pump(Instant::now());
        inner.prints
    }

    /// The device job id of `job_id` (the job key), if the device took it.
    pub fn device_job(&self, job_id: &str) -> Option<u64> {
        self.lock().keys.get(job_id).copied()
    }

    /// A new client connection to the controller's job port.
    pub fn connect(&self) -> ClientId {
        let mut inner = self.lock();
        let id = inner.next_client;
        inner.next_client += 1;
        inner.clients.insert(id, VecDeque::new());
        id
    }

    /// The client's connection is gone.
    pub fn disconnect(&self, client: ClientId) {
        let mut inner = self.lock();
        inner.clients.remove(&client);
        inner.controller.on_host_closed(client);
    }

    /// A request from `client`: the replies it has now, in order (one per request, some
    /// possibly later), or `None` if the controller closed the connection.
    pub fn request(&self, client: ClientId, req: HostRequest) -> Option<Vec<HostReply>> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.pump(now);
        inner.clients.get(&client)?;
        let key = match &req {
            HostRequest::SubmitKeyedJob { key, .. } => Some(key.clone()),
            _ => None,
        };
        let actions = inner.controller.on_host(client, req);
        if let Some(key) = key {
            for a in &actions {
                if let Action::Reply(c, HostReply::KeyedJobAccepted { id, duplicate }) = a {
                    if *c == client {
                        inner.keys.entry(key.clone()).or_insert(*id);
                        if !duplicate {
                            inner.unfinished.push(*id);
                        }
                    }
                }
            }
        }
        inner.apply(actions, now);
        inner.pump(now);
        inner
            .clients
            .get_mut(&client)
            .map(|q| q.drain(..).collect())
    }
}

impl Inner {
    /// Carries out the controller's actions; messages to the engine leave at `at`.
    fn apply(&mut self, actions: Vec<Action>, at: Instant) {
        for a in actions {
            match a {
                Action::Reply(c, reply) => {
                    if let Some(q) = self.clients.get_mut(&c) {
                        q.push_back(reply);
                    }
                }
                Action::Close(c) => {
                    self.clients.remove(&c);
                    self.controller.on_host_closed(c);
                }
                Action::Engine(msg) => {
                    let cost = if matches!(msg, ToEngine::Print { page: 0, .. }) {
                        self.print_delay
                    } else {
                        Duration::ZERO
                    };
                    let done_at = self.engine_free_at.max(at) + cost;
                    self.engine_free_at = done_at;
                    self.link.push_back(InFlight { msg, done_at });
                }
                Action::Log(line) => log::debug!("sim device: {line}"),
                Action::EngineReady | Action::RequestSnapshot { .. } => {}
            }
        }
    }

    /// Lets the engine answer every message whose time has come by `now`.
    fn pump(&mut self, now: Instant) {
        while self.link.front().is_some_and(|m| m.done_at <= now) {
            let Some(InFlight { msg, done_at }) = self.link.pop_front() else {
                break;
            };
            let at_ms = done_at.saturating_duration_since(self.started).as_millis();
            let answer: FromEngine = self
                .engine
                .handle(msg, u64::try_from(at_ms).unwrap_or(u64::MAX));
            let actions = self.controller.on_engine(answer);
            self.apply(actions, done_at);
            let (controller, prints) = (&self.controller, &mut self.prints);
            self.unfinished
                .retain(|id| match controller.job(*id).map(|j| j.state) {
                    Some(JobState::Done) => {
                        *prints += 1;
                        false
                    }
                    Some(state) => !state.is_finished(),
                    None => false,
                });
        }
    }
}
