//! Tests of tunnels and jobs: requests, dial-backs, documents, the controller, closing.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use duplex_link::{HostReply, HostRequest, JobInfo, JobState};
use duplex_tunnel::*;

use crate::tests::{closes, logs, sent, H};
use crate::*;

pub(crate) const CLOUD: Endpoint = Endpoint {
    ip: [10, 77, 0, 3],
    port: 9443,
};

pub(crate) fn ticket(tunnel_id: u64, device: &str) -> Ticket {
    Ticket::sign(
        &[3; 32],
        TicketBody {
            tunnel_id,
            relay_id: "relay-1".into(),
            device_id: device.into(),
            nonce: [4; 16],
            expires_ms: 99,
        },
    )
}

pub(crate) fn request(tunnel_id: u64, device: &str) -> MediatorToRelay {
    MediatorToRelay::TunnelRequest {
        tunnel_id,
        device_id: device.into(),
        cloud: CLOUD,
        ticket: ticket(tunnel_id, device),
    }
}

fn dial_of(actions: &[Action]) -> Option<ConnId> {
    actions.iter().find_map(|a| match a {
        Action::Dial {
            conn,
            endpoint,
            peer: Peer::Cloud,
        } if *endpoint == CLOUD => Some(*conn),
        _ => None,
    })
}

/// Requests tunnel `id` on the session and opens it; returns its connection.
pub(crate) fn open_tunnel(h: &mut H, id: u64, device: &str) -> ConnId {
    let session = h.conn;
    let a = h.feed(session, &request(id, device));
    let conn = dial_of(&a).expect("a dial to the cloud server");
    h.relay.on_connected(conn, h.now);
    let a = h.relay.take_actions();
    assert_eq!(
        sent::<RelayToCloud>(&a, conn),
        vec![RelayToCloud::Dial {
            version: PROTOCOL_VERSION,
            ticket: ticket(id, device)
        }]
    );
    let a = h.feed(conn, &CloudToRelay::DialOk { tunnel_id: id });
    assert_eq!(
        sent::<RelayToMediator>(&a, session),
        vec![RelayToMediator::TunnelAccepted { tunnel_id: id }]
    );
    assert!(logs(&a).contains(&alloc::format!("tunnel {id} open to 10.77.0.3:9443")));
    conn
}

pub(crate) fn job(id: &str, device: &str, len: u64) -> CloudToRelay {
    CloudToRelay::Job {
        job_id: id.into(),
        device_id: device.into(),
        user: "alice".into(),
        pages: 2,
        seed: 7,
        width: 16,
        height: 16,
        document_len: len,
    }
}

pub(crate) fn data(id: &str, bytes: &[u8]) -> CloudToRelay {
    CloudToRelay::JobData {
        job_id: id.into(),
        bytes: bytes.to_vec(),
    }
}

pub(crate) fn controller_requests(actions: &[Action]) -> Vec<HostRequest> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ControllerSend(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// A relay with a session up, the controller connected and tunnel 5 open for `mfp-1`.
pub(crate) fn ready() -> (H, ConnId) {
    let mut h = H::new();
    h.up();
    h.relay.on_controller_connected(h.now);
    h.relay.take_actions();
    let t = open_tunnel(&mut h, 5, "mfp-1");
    (h, t)
}

fn info(id: u64, state: JobState, checksums: Vec<u32>, error: Option<&str>) -> HostReply {
    HostReply::Jobs(vec![JobInfo {
        id,
        state,
        pages: 2,
        pages_done: checksums.len() as u32,
        checksums,
        error: error.map(String::from),
    }])
}

fn reply(h: &mut H, r: HostReply) -> Vec<Action> {
    h.relay.on_controller_reply(r, h.now);
    h.relay.take_actions()
}

#[test]
fn a_job_goes_to_the_controller_keyed_and_its_result_comes_back() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-1", "mfp-1", 5));
    h.feed(t, &data("j-1", b"hel"));
    let a = h.feed(t, &data("j-1", b"lo"));
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::SubmitKeyedJob {
            key: "j-1".into(),
            pages: 2,
            seed: 7,
            width: 16,
            height: 16
        }]
    );
    let a = reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 11,
            duplicate: false,
        },
    );
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::JobAccepted {
            job_id: "j-1".into(),
            device_job: 11,
            duplicate: false
        }]
    );
    // Polled soon, then less and less often, up to every JOB_POLL_MS.
    assert_eq!(h.relay.next_deadline(), Some(h.now + JOB_POLL_FIRST_MS));
    let a = h.advance(JOB_POLL_FIRST_MS);
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::JobStatus { id: Some(11) }]
    );
    let mut wait = JOB_POLL_FIRST_MS;
    for _ in 0..6 {
        reply(&mut h, info(11, JobState::Printing, vec![1], None));
        wait = (wait * 2).min(JOB_POLL_MS);
        assert_eq!(h.relay.next_deadline(), Some(h.now + wait));
        assert!(controller_requests(&h.advance(wait - 1)).is_empty());
        assert_eq!(
            controller_requests(&h.advance(1)),
            vec![HostRequest::JobStatus { id: Some(11) }]
        );
    }
    assert_eq!(wait, JOB_POLL_MS);
    reply(&mut h, info(11, JobState::Printing, vec![1], None));
    let a = h.advance(JOB_POLL_MS);
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::JobStatus { id: Some(11) }]
    );
    let a = reply(&mut h, info(11, JobState::Done, vec![0xaa, 0xbb], None));
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(b"hello");
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::JobResult {
            job_id: "j-1".into(),
            outcome: JobOutcome::Done,
            checksums: vec![0xaa, 0xbb],
            document_crc32: crc,
            error: None
        }]
    );
    assert!(logs(&a).contains(&"job j-1 done (device job 11, duplicate=false)".to_string()));
    // Close: Closed with the count, the connection closed, the mediator told.
    let a = h.feed(t, &CloudToRelay::Close);
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::Closed { jobs: 1 }]
    );
    assert!(closes(&a, t));
    assert_eq!(
        sent::<RelayToMediator>(&a, h.conn),
        vec![RelayToMediator::TunnelClosed {
            tunnel_id: 5,
            jobs: vec!["j-1".into()]
        }]
    );
    assert!(logs(&a).contains(&"tunnel 5 closed (1 jobs)".to_string()));
}

#[test]
fn a_job_sent_again_is_submitted_with_the_same_key_and_not_printed_twice() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-9", "mfp-1", 0));
    reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 3,
            duplicate: false,
        },
    );
    // The tunnel is lost mid-job; the cloud server sends the job again on a new tunnel.
    h.relay.on_closed(t, "reset", h.now);
    h.relay.take_actions();
    let t2 = open_tunnel(&mut h, 6, "mfp-1");
    let a = h.feed(t2, &job("j-9", "mfp-1", 0));
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::SubmitKeyedJob {
            key: "j-9".into(),
            pages: 2,
            seed: 7,
            width: 16,
            height: 16
        }]
    );
    let a = reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 3,
            duplicate: true,
        },
    );
    assert_eq!(
        sent::<RelayToCloud>(&a, t2),
        vec![RelayToCloud::JobAccepted {
            job_id: "j-9".into(),
            device_job: 3,
            duplicate: true
        }]
    );
    h.advance(JOB_POLL_MS);
    let a = reply(&mut h, info(3, JobState::Done, vec![1, 2], None));
    assert!(logs(&a).contains(&"job j-9 done (device job 3, duplicate=true)".to_string()));
}

#[test]
fn a_job_for_another_device_is_refused_with_403() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-2", "mfp-2", 3));
    let a = h.feed(t, &data("j-2", b"abc"));
    assert!(controller_requests(&a).is_empty());
    let results: Vec<RelayToCloud> = sent(&a, t);
    let [RelayToCloud::JobResult {
        outcome: JobOutcome::Failed,
        error: Some(e),
        ..
    }] = results.as_slice()
    else {
        panic!("{results:?}")
    };
    assert!(e.starts_with("403 "), "{e}");
    // The tunnel goes on.
    h.feed(t, &job("j-3", "mfp-1", 0));
    assert_eq!(h.relay.tunnel_count(), 1);
}

#[test]
fn controller_errors_fail_the_job() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-4", "mfp-1", 0));
    let a = reply(
        &mut h,
        HostReply::Error {
            code: 422,
            message: "pages out of range".into(),
        },
    );
    let results: Vec<RelayToCloud> = sent(&a, t);
    assert!(matches!(
        results.as_slice(),
        [RelayToCloud::JobResult { outcome: JobOutcome::Failed, error: Some(e), .. }]
            if e == "422 pages out of range"
    ));
}

#[test]
fn a_failed_print_is_reported_with_its_error() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-5", "mfp-1", 0));
    reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 4,
            duplicate: false,
        },
    );
    h.advance(JOB_POLL_MS);
    let a = reply(
        &mut h,
        info(4, JobState::Failed, vec![9], Some("paper jam")),
    );
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::JobResult {
            job_id: "j-5".into(),
            outcome: JobOutcome::Failed,
            checksums: vec![9],
            document_crc32: 0,
            error: Some("paper jam".into())
        }]
    );
}

#[test]
fn protocol_errors_on_a_tunnel_close_only_that_tunnel() {
    let bad: Vec<(Vec<CloudToRelay>, u16)> = vec![
        (vec![job("j", "mfp-1", 4), data("other", b"x")], 400),
        (vec![job("j", "mfp-1", 2), data("j", b"xyz")], 400),
        (vec![job("j", "mfp-1", 2), job("k", "mfp-1", 0)], 400),
        (vec![data("j", b"x")], 400),
        (vec![CloudToRelay::DialOk { tunnel_id: 5 }], 400),
        (vec![job("bad id", "mfp-1", 0)], 400),
    ];
    for (msgs, code) in bad {
        let (mut h, t) = ready();
        let other = open_tunnel(&mut h, 6, "mfp-2");
        let mut a = Vec::new();
        for m in &msgs {
            a = h.feed(t, m);
        }
        let errs: Vec<RelayToCloud> = sent(&a, t);
        assert!(
            matches!(errs.last(), Some(RelayToCloud::Error { code: c, .. }) if *c == code),
            "{msgs:?}: {errs:?}"
        );
        assert!(closes(&a, t) && !closes(&a, other));
        assert_eq!(
            sent::<RelayToMediator>(&a, h.conn),
            vec![RelayToMediator::TunnelClosed {
                tunnel_id: 5,
                jobs: msgs
                    .iter()
                    .filter_map(|m| match m {
                        CloudToRelay::Job { job_id, .. } if valid_id(job_id) =>
                            Some(job_id.clone()),
                        _ => None,
                    })
                    .take(1)
                    .collect()
            }]
        );
        assert_eq!(h.relay.tunnel_count(), 1);
    }
}

#[test]
fn an_oversized_tunnel_frame_is_413_and_closes_that_tunnel() {
    let (mut h, t) = ready();
    let other = open_tunnel(&mut h, 6, "mfp-2");
    h.relay
        .on_data(t, &((MAX_TUNNEL_FRAME + 1) as u32).to_le_bytes(), h.now);
    let a = h.relay.take_actions();
    assert!(matches!(
        sent::<RelayToCloud>(&a, t).as_slice(),
        [RelayToCloud::Error { code: 413, .. }]
    ));
    assert!(closes(&a, t) && !closes(&a, other) && !closes(&a, h.conn));
    assert_eq!(h.relay.session_id(), Some(7));
}

#[test]
fn tunnel_requests_are_refused_for_other_devices_and_beyond_four() {
    let (mut h, _t) = ready();
    let s = h.conn;
    let a = h.feed(s, &request(9, "mfp-9"));
    assert!(dial_of(&a).is_none());
    assert!(matches!(
        sent::<RelayToMediator>(&a, s).as_slice(),
        [RelayToMediator::TunnelFailed {
            tunnel_id: 9,
            code: 403,
            ..
        }]
    ));
    for id in 10..13 {
        let a = h.feed(s, &request(id, "mfp-1"));
        assert!(dial_of(&a).is_some());
    }
    assert_eq!(h.relay.tunnel_count(), MAX_TUNNELS);
    let a = h.feed(s, &request(13, "mfp-1"));
    assert!(dial_of(&a).is_none());
    assert!(matches!(
        sent::<RelayToMediator>(&a, s).as_slice(),
        [RelayToMediator::TunnelFailed {
            tunnel_id: 13,
            code: 429,
            ..
        }]
    ));
}

#[test]
fn refused_unreachable_and_silent_cloud_servers_fail_the_tunnel() {
    // Refused ticket: the cloud server's code is passed on.
    let mut h = H::new();
    let s = h.up();
    let c = dial_of(&h.feed(s, &request(1, "mfp-1"))).unwrap();
    h.relay.on_connected(c, h.now);
    let a = h.feed(
        c,
        &CloudToRelay::DialRefused {
            code: 410,
            message: "ticket expired".into(),
        },
    );
    assert!(closes(&a, c));
    assert_eq!(
        sent::<RelayToMediator>(&a, s),
        vec![RelayToMediator::TunnelFailed {
            tunnel_id: 1,
            code: 410,
            message: "ticket expired".into()
        }]
    );
    // Unreachable: 504.
    let c = dial_of(&h.feed(s, &request(2, "mfp-1"))).unwrap();
    h.relay.on_closed(c, "connection refused", h.now);
    let a = h.relay.take_actions();
    assert!(matches!(
        sent::<RelayToMediator>(&a, s).as_slice(),
        [RelayToMediator::TunnelFailed {
            tunnel_id: 2,
            code: 504,
            ..
        }]
    ));
    // Silent: 504 after the dial timeout (the session keeps beating meanwhile).
    let c = dial_of(&h.feed(s, &request(3, "mfp-1"))).unwrap();
    let mut a = Vec::new();
    for _ in 0..10 {
        a = h.advance(DIAL_TIMEOUT_MS / 10);
        h.feed(s, &MediatorToRelay::Pong { seq: 1 });
    }
    assert!(closes(&a, c));
    assert!(sent::<RelayToMediator>(&a, s).iter().any(|m| matches!(
        m,
        RelayToMediator::TunnelFailed {
            tunnel_id: 3,
            code: 504,
            ..
        }
    )));
}

#[test]
fn an_idle_tunnel_is_closed_but_not_while_a_job_prints() {
    let (mut h, t) = ready();
    let s = h.conn;
    let keep_session = |h: &mut H| {
        let s = h.conn;
        h.feed(s, &MediatorToRelay::Pong { seq: 0 });
    };
    h.feed(t, &job("j-6", "mfp-1", 0));
    reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 8,
            duplicate: false,
        },
    );
    // Two minutes of printing: the tunnel stays.
    for _ in 0..(120_000 / JOB_POLL_MS) {
        let a = h.advance(JOB_POLL_MS);
        assert!(!closes(&a, t));
        if !controller_requests(&a).is_empty() {
            reply(&mut h, info(8, JobState::Printing, vec![], None));
        }
        keep_session(&mut h);
    }
    h.advance(JOB_POLL_MS);
    reply(&mut h, info(8, JobState::Done, vec![1, 2], None));
    // Then a minute with nothing from the cloud server.
    let mut closed = None;
    for step in 0..61 {
        let a = h.advance(1000);
        keep_session(&mut h);
        if closes(&a, t) {
            closed = Some((step, a));
            break;
        }
    }
    let (step, a) = closed.expect("closed when idle");
    assert_eq!(step, 59);
    let reports: Vec<RelayToMediator> = sent(&a, s);
    assert!(reports.contains(&RelayToMediator::TunnelClosed {
        tunnel_id: 5,
        jobs: vec!["j-6".into()]
    }));
}

#[test]
fn a_lost_tunnel_is_reported_closed() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-7", "mfp-1", 10));
    h.relay
        .on_closed(t, "TLS: the peer closed the connection", h.now);
    let a = h.relay.take_actions();
    assert_eq!(
        sent::<RelayToMediator>(&a, h.conn),
        vec![RelayToMediator::TunnelClosed {
            tunnel_id: 5,
            jobs: vec!["j-7".into()]
        }]
    );
    assert!(logs(&a)[0].starts_with("tunnel 5 closed (1 jobs): connection lost"));
}

#[test]
fn requests_in_flight_are_sent_again_after_the_controller_link_drops() {
    let (mut h, t) = ready();
    h.feed(t, &job("j-8", "mfp-1", 0));
    h.relay.on_controller_closed(h.now);
    let a = h.relay.take_actions();
    assert!(logs(&a)[0].contains("controller connection lost"));
    let a = h.advance(CONTROLLER_RETRY_MS);
    assert!(a.contains(&Action::ControllerConnect));
    h.relay.on_controller_connected(h.now);
    let a = h.relay.take_actions();
    assert!(matches!(
        controller_requests(&a).as_slice(),
        [HostRequest::SubmitKeyedJob { key, .. }] if key == "j-8"
    ));
}

#[test]
fn replies_for_closed_tunnels_are_dropped_in_order() {
    let (mut h, t) = ready();
    let t2 = open_tunnel(&mut h, 6, "mfp-2");
    h.feed(t, &job("a", "mfp-1", 0));
    h.feed(t2, &job("b", "mfp-2", 0));
    h.feed(t, &CloudToRelay::Close);
    // The first reply belongs to the closed tunnel's job, the second to "b".
    let a = reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 1,
            duplicate: false,
        },
    );
    assert!(sent::<RelayToCloud>(&a, t).is_empty());
    let a = reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 2,
            duplicate: false,
        },
    );
    assert_eq!(
        sent::<RelayToCloud>(&a, t2),
        vec![RelayToCloud::JobAccepted {
            job_id: "b".into(),
            device_job: 2,
            duplicate: false
        }]
    );
    // A reply to nothing: the link is reset.
    let a = reply(
        &mut h,
        HostReply::KeyedJobAccepted {
            id: 3,
            duplicate: false,
        },
    );
    assert!(a.contains(&Action::ControllerClose));
}

#[test]
fn a_request_offered_again_gets_the_known_answer() {
    let (mut h, t) = ready();
    let s = h.conn;
    let a = h.feed(s, &request(5, "mfp-1"));
    assert!(dial_of(&a).is_none());
    assert_eq!(
        sent::<RelayToMediator>(&a, s),
        vec![RelayToMediator::TunnelAccepted { tunnel_id: 5 }]
    );
    h.feed(t, &CloudToRelay::Close);
    let a = h.feed(s, &request(5, "mfp-1"));
    assert!(dial_of(&a).is_none());
    assert_eq!(
        sent::<RelayToMediator>(&a, s),
        vec![RelayToMediator::TunnelClosed {
            tunnel_id: 5,
            jobs: vec![]
        }]
    );
}
