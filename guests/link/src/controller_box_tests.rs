//! Tests of the controller's document logic: `Box` requests keep each client's reply
//! order; scans run on the real engine logic and fail cleanly.

use alloc::collections::VecDeque;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::engine::Engine;
use crate::msg::{BoxOp, BoxReply, FromEngine, HostRequest};
use crate::print::{expected_page_checksum, gamma_table, page_checksum};

struct Rig {
    c: Controller,
    e: Engine,
    to_engine: VecDeque<ToEngine>,
    replies: Vec<(ClientId, HostReply)>,
}

impl Rig {
    fn new() -> Self {
        let mut e = Engine::new(gamma_table());
        e.calibrated();
        let mut r = Rig {
            c: Controller::new(),
            e,
            to_engine: VecDeque::new(),
            replies: Vec::new(),
        };
        let a = r.c.on_engine_connected();
        r.apply(a);
        let a = r.c.on_engine(FromEngine::Ready);
        r.apply(a);
        r.run_engine();
        r
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Reply(c, r) => self.replies.push((c, r)),
                Action::Engine(m) => self.to_engine.push_back(m),
                _ => {}
            }
        }
    }

    fn run_engine(&mut self) {
        while let Some(m) = self.to_engine.pop_front() {
            let r = self.e.handle(m, 0);
            let a = self.c.on_engine(r);
            self.apply(a);
        }
    }
}

fn scan(pages: u32) -> ScanRequest {
    ScanRequest {
        account: "alice".to_string(),
        box_id: "inbox".to_string(),
        name: "s".to_string(),
        pages,
        seed: 5,
        width: 30,
        height: 10,
    }
}

fn list(box_id: &str) -> HostRequest {
    HostRequest::Box {
        account: "alice".into(),
        op: BoxOp::ListBox {
            box_id: box_id.into(),
        },
    }
}

#[test]
fn box_requests_are_answered_in_each_clients_order() {
    let mut r = Rig::new();
    let a = r.c.on_host(1, list("a"));
    r.apply(a);
    let a = r.c.on_host(1, HostRequest::JobStatus { id: None });
    r.apply(a);
    // The job status waits behind the unanswered box request.
    assert!(r.replies.is_empty());
    let reqs = r.c.take_box_requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].account, "alice");
    let a =
        r.c.box_reply(reqs[0].slot, HostReply::Box(BoxReply::Docs(vec![])));
    r.apply(a);
    assert_eq!(
        r.replies,
        vec![
            (1, HostReply::Box(BoxReply::Docs(vec![]))),
            (1, HostReply::Jobs(vec![]))
        ]
    );
    assert!(r.c.take_box_requests().is_empty());
}

#[test]
fn a_scan_collects_the_engines_halftones_as_one_pbm_document() {
    let mut r = Rig::new();
    let a = r.c.on_host(3, list("x"));
    r.apply(a);
    let slot = r.c.take_box_requests()[0].slot;
    let a = r.c.start_scan(slot, scan(3));
    r.apply(a);
    assert_eq!(r.c.pages_in_flight(), crate::controller::WINDOW);
    r.run_engine();
    let done = r.c.take_scans_done();
    assert_eq!(done.len(), 1);
    assert_eq!(r.c.active_scans(), 0);
    let doc = &done[0].document;
    let page_len = 4 * 10;
    let header = b"P4\n30 10\n";
    assert_eq!(doc.len(), 3 * (header.len() + page_len));
    for (p, page) in doc.chunks(header.len() + page_len).enumerate() {
        assert_eq!(&page[..header.len()], header);
        assert_eq!(
            page_checksum(&page[header.len()..]),
            expected_page_checksum(5, p as u32, 30, 10)
        );
    }
    assert_eq!(r.e.pages_printed(), 0);
    assert!(r.replies.is_empty(), "the firmware answers once stored");
}

#[test]
fn scans_fail_with_503_on_a_jam_or_a_reset_and_bad_ones_are_refused() {
    let mut r = Rig::new();
    let slots: Vec<ReplySlot> = (0..4)
        .map(|_| {
            let a = r.c.on_host(1, list("x"));
            r.apply(a);
            r.c.take_box_requests()[0].slot
        })
        .collect();
    let a = r.c.start_scan(slots[0], scan(0));
    r.apply(a);
    let a = r.c.start_scan(slots[1], scan(MAX_SCAN_PAGES + 1));
    r.apply(a);
    r.e.handle(ToEngine::Jam, 0);
    let a = r.c.start_scan(slots[2], scan(2));
    r.apply(a);
    r.run_engine();
    let a = r.c.start_scan(slots[3], scan(2));
    r.apply(a);
    let a = r.c.on_engine_reset();
    r.apply(a);
    let codes: Vec<u16> = r
        .replies
        .iter()
        .map(|(_, rep)| match rep {
            HostReply::Error { code, .. } => *code,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, vec![422, 422, 503, 503]);
    assert_eq!(r.c.active_scans(), 0);
    assert!(r.c.take_scans_done().is_empty());
}
