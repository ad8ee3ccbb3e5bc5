//! Tests of the controller logic against the real engine logic.

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
                key: None,
            },
        );
    }
    let all = c.all_jobs();
    assert!(all.len() < 300);
    assert_eq!(all.last().unwrap().id, 300);
    let frame = crate::try_encode(&HostReply::Jobs(all)).expect("fits");
    assert!(frame.len() <= MAX_FRAME);
}

#[path = "controller_keyed_tests.rs"]
mod keyed;
