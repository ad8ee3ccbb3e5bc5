//! Share exchanges against the cloud's state machine (`duplex_docs::Replica`) in-process,
//! through the relay's API (`share_open`, `share_answer`): users paged, pairs and
//! conflicts, a snapshot then deltas, revocations first, and a restart mid-sync.

use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

use duplex_docs::{
    Account, Change, CloudToDevice, CloudUser, ConflictReason, DeviceToCloud, Grant, Pair, Replica,
    Role, ScimEmail, ScimListResponse, Subject, SyncRequest,
};
use duplex_link::HostReply;

use super::{bytes, fresh, MemDisk};
use crate::DocService;

fn user(id: &str, email: &str) -> CloudUser {
    CloudUser {
        schemas: vec![],
        id: id.into(),
        user_name: id.into(),
        display_name: id.into(),
        emails: vec![ScimEmail {
            value: email.into(),
            verified: true,
            primary: true,
        }],
    }
}

fn verified(id: &str, email: &str) -> Account {
    Account {
        id: id.into(),
        name: format!("User {id}"),
        email: Some(email.into()),
        email_verified: true,
    }
}

/// The cloud side: its users (served `page` at a time) and one replica per share.
struct Cloud {
    users: Vec<CloudUser>,
    page: usize,
    replicas: BTreeMap<String, Replica>,
    /// Every message the device sent, in order.
    log: Vec<DeviceToCloud>,
}

impl Cloud {
    fn new(users: Vec<CloudUser>, page: usize) -> Self {
        Cloud {
            users,
            page,
            replicas: BTreeMap::new(),
            log: Vec::new(),
        }
    }

    fn answer(&mut self, m: &DeviceToCloud) -> CloudToDevice {
        match m {
            DeviceToCloud::ListUsers { start_index, count } => {
                assert_eq!(*count, 100);
                let from = (*start_index as usize).max(1) - 1;
                let resources: Vec<CloudUser> = self
                    .users
                    .iter()
                    .skip(from)
                    .take(self.page)
                    .cloned()
                    .collect();
                CloudToDevice::Users(ScimListResponse {
                    schemas: vec![],
                    total_results: self.users.len() as u32,
                    start_index: *start_index,
                    items_per_page: resources.len() as u32,
                    resources,
                })
            }
            DeviceToCloud::Sync(req) => {
                let r = self
                    .replicas
                    .entry(req.share_id().to_string())
                    .or_insert_with(|| Replica::new(req.share_id()));
                CloudToDevice::Sync(r.handle(req))
            }
            DeviceToCloud::Done => panic!("Done is not sent as a message"),
        }
    }

    /// Runs one whole exchange; `stop_after`: stop after that many messages (a lost
    /// tunnel). Returns whether it ended with `ShareDone`.
    fn exchange(&mut self, svc: &mut DocService<MemDisk>, stop_after: Option<usize>) -> bool {
        let mut reply = svc.share_open();
        let mut n = 0;
        loop {
            let bytes = match reply {
                HostReply::ShareSend { bytes } => bytes,
                HostReply::ShareDone => return true,
                other => panic!("unexpected {other:?}"),
            };
            let m: DeviceToCloud = postcard::from_bytes(&bytes).expect("a DeviceToCloud");
            self.log.push(m.clone());
            n += 1;
            let ans = self.answer(&m);
            if stop_after == Some(n) {
                return false;
            }
            let ans = postcard::to_allocvec(&ans).expect("encode");
            reply = svc.share_answer(&ans);
        }
    }

    fn replica(&self, share: &str) -> &Replica {
        self.replicas.get(share).expect("the share's replica")
    }
}

/// A service with accounts alice (paired by email), bob (two accounts with one email),
/// a box `inbox` owned by alice with one document, shared.
fn setup() -> (DocService<MemDisk>, MemDisk) {
    let (mut s, disk) = fresh(8);
    s.add_account("admin", verified("alice", "Alice@Example.com"))
        .expect("alice");
    s.add_account("admin", verified("bob1", "bob@example.com"))
        .expect("bob1");
    s.add_account("admin", verified("bob2", "bob@example.com"))
        .expect("bob2");
    s.create_box("alice", "inbox", "Inbox").expect("box");
    s.put_document("alice", "inbox", "one", &bytes(1, 40_000))
        .expect("put");
    s.share_box("alice", "inbox").expect("share");
    (s, disk)
}

fn users() -> Vec<CloudUser> {
    let mut u = vec![
        user("c-alice", "alice@example.com"),
        user("c-bob", "bob@example.com"),
    ];
    for i in 0..5 {
        u.push(user(&format!("c-{i}"), &format!("u{i}@example.com")));
    }
    u
}

#[test]
fn a_first_exchange_pages_users_pairs_and_sends_a_snapshot_and_the_data() {
    let (mut s, _disk) = setup();
    let mut cloud = Cloud::new(users(), 3);
    assert!(cloud.exchange(&mut s, None));
    // Three pages of users (7 users, 3 a page).
    let lists: Vec<u32> = cloud
        .log
        .iter()
        .filter_map(|m| match m {
            DeviceToCloud::ListUsers { start_index, .. } => Some(*start_index),
            _ => None,
        })
        .collect();
    assert_eq!(lists, vec![1, 4, 7]);
    // alice pairs; bob1, bob2 and c-bob conflict (several on the device).
    assert_eq!(
        s.pairings().pairs,
        vec![Pair {
            account: "alice".into(),
            cloud_user: "c-alice".into()
        }]
    );
    let conflicts = s.conflicts("admin").expect("conflicts");
    let bob1 = conflicts
        .iter()
        .find(|c| c.subject == Subject::Account("bob1".into()))
        .expect("bob1");
    assert_eq!(bob1.reason, ConflictReason::SeveralOnDevice);
    assert!(conflicts
        .iter()
        .any(|c| c.subject == Subject::CloudUser("c-bob".into())
            && c.reason == ConflictReason::SeveralOnDevice));
    // A snapshot, then the document's bytes the cloud asked for.
    let r = cloud.replica("inbox");
    let state = r.state().expect("a state");
    assert_eq!(state.documents.len(), 1);
    assert_eq!(r.data("d1"), Some(&bytes(1, 40_000)[..]));
    assert_eq!(state.pairs.len(), 1);
    assert!(r
        .may("c-alice", duplex_docs::Op::GetDoc, Some("d1"))
        .is_ok());
    let shares = s.shares("admin").expect("shares");
    assert_eq!(shares[0].revision, r.revision());
    assert_eq!(shares[0].acked, r.revision());
    assert_eq!(shares[0].queued + shares[0].in_flight, 0);
    // Stored: a reopened service has the pairs and the conflicts.
}

#[test]
fn deltas_follow_and_a_revocation_goes_before_newer_changes() {
    let (mut s, _disk) = setup();
    let mut cloud = Cloud::new(users(), 100);
    assert!(cloud.exchange(&mut s, None));
    let before = cloud.replica("inbox").revision();
    let g = Grant::on_box("inbox", Role::Read, "bob1");
    s.grant("alice", g.clone()).expect("grant");
    assert!(cloud.exchange(&mut s, None));
    assert!(cloud
        .replica("inbox")
        .state()
        .expect("state")
        .grants
        .contains(&g));
    // Then: a new document and a revocation, in this order.
    s.put_document("alice", "inbox", "two", &bytes(2, 100))
        .expect("put");
    let owner = Grant::on_box("inbox", Role::Owner, "alice");
    s.grant("admin", Grant::on_doc("d2", Role::Read, "bob2"))
        .expect("grant d2");
    s.revoke("admin", &owner).expect("revoke");
    cloud.log.clear();
    assert!(cloud.exchange(&mut s, None));
    let deltas: Vec<&Vec<Change>> = cloud
        .log
        .iter()
        .filter_map(|m| match m {
            DeviceToCloud::Sync(SyncRequest::Delta { changes, .. }) => Some(changes),
            DeviceToCloud::Sync(SyncRequest::Snapshot { .. }) => panic!("no snapshot expected"),
            _ => None,
        })
        .collect();
    assert!(!deltas.is_empty());
    assert_eq!(
        deltas[0][0],
        Change::Revoked {
            grant: owner.clone()
        }
    );
    let r = cloud.replica("inbox");
    assert!(r.revision() > before);
    let state = r.state().expect("state");
    assert!(!state.grants.contains(&owner));
    assert_eq!(state.documents.len(), 2);
    assert_eq!(r.data("d2"), Some(&bytes(2, 100)[..]));
    assert!(r
        .may("c-alice", duplex_docs::Op::GetDoc, Some("d1"))
        .is_err());
}

#[test]
fn a_restart_mid_sync_loses_nothing_and_applies_nothing_twice() {
    let (mut s, disk) = setup();
    let mut cloud = Cloud::new(users(), 100);
    assert!(cloud.exchange(&mut s, None));
    // Changes, then a tunnel lost after the first delta was applied by the cloud.
    s.put_document("alice", "inbox", "two", &bytes(3, 70_000))
        .expect("put");
    s.grant("alice", Grant::on_doc("d2", Role::Read, "bob1"))
        .expect("grant");
    assert!(!cloud.exchange(&mut s, Some(2)));
    let mid = cloud.replica("inbox").revision();
    // The controller restarts: the service is opened again on the same disk.
    drop(s);
    let mut s = DocService::open(disk.clone()).expect("reopen");
    assert_eq!(s.pairings().pairs.len(), 1);
    let status = &s.shares("admin").expect("shares")[0];
    assert!(status.snapshot_needed);
    assert!(status.revision >= mid, "the next revision is never reused");
    cloud.log.clear();
    assert!(cloud.exchange(&mut s, None));
    // A snapshot above everything sent before: the replica replaced its state once.
    assert!(matches!(
        cloud.log.iter().find(|m| matches!(m, DeviceToCloud::Sync(_))),
        Some(DeviceToCloud::Sync(SyncRequest::Snapshot { revision, .. })) if *revision > mid
    ));
    let r = cloud.replica("inbox");
    let state = r.state().expect("state");
    assert_eq!(state.documents.len(), 2);
    assert!(state
        .grants
        .contains(&Grant::on_doc("d2", Role::Read, "bob1")));
    assert_eq!(r.data("d2"), Some(&bytes(3, 70_000)[..]));
    let rev = r.revision();
    assert_eq!(s.shares("admin").expect("shares")[0].acked, rev);
    // Nothing more to send: the next exchange only lists users.
    cloud.log.clear();
    assert!(cloud.exchange(&mut s, None));
    assert!(cloud
        .log
        .iter()
        .all(|m| matches!(m, DeviceToCloud::ListUsers { .. })));
    assert_eq!(cloud.replica("inbox").revision(), rev);
}

#[test]
fn a_lost_tunnel_sends_the_unacknowledged_message_again() {
    let (mut s, _disk) = setup();
    let mut cloud = Cloud::new(users(), 100);
    assert!(cloud.exchange(&mut s, None));
    s.grant("alice", Grant::on_box("inbox", Role::Write, "bob2"))
        .expect("grant");
    // The delta reaches the cloud, the answer is lost.
    assert!(!cloud.exchange(&mut s, Some(2)));
    let rev = cloud.replica("inbox").revision();
    cloud.log.clear();
    assert!(cloud.exchange(&mut s, None));
    // Sent again with the same revision, acked without being applied twice.
    let again: Vec<u64> = cloud
        .log
        .iter()
        .filter_map(|m| match m {
            DeviceToCloud::Sync(r) => Some(r.revision()),
            _ => None,
        })
        .collect();
    assert_eq!(again, vec![rev]);
    assert_eq!(cloud.replica("inbox").revision(), rev);
}

#[test]
fn admin_pair_unpair_and_account_removal_reach_the_cloud() {
    let (mut s, disk) = setup();
    let mut cloud = Cloud::new(users(), 100);
    assert!(cloud.exchange(&mut s, None));
    s.admin_pair("admin", "bob1", "c-bob").expect("pair");
    assert!(s.admin_pair("alice", "bob2", "c-0").is_err());
    assert_eq!(
        s.admin_pair("admin", "bob2", "c-bob").map_err(|e| e.code()),
        Err(409)
    );
    s.grant("alice", Grant::on_box("inbox", Role::Read, "bob1"))
        .expect("grant");
    assert!(cloud.exchange(&mut s, None));
    assert!(cloud
        .replica("inbox")
        .may("c-bob", duplex_docs::Op::ListBox, None)
        .is_ok());
    s.admin_unpair("admin", "bob1").expect("unpair");
    s.remove_account("admin", "alice").expect("remove alice");
    assert!(cloud.exchange(&mut s, None));
    let r = cloud.replica("inbox");
    assert!(r.may("c-bob", duplex_docs::Op::ListBox, None).is_err());
    assert!(r.may("c-alice", duplex_docs::Op::ListBox, None).is_err());
    // bob1 is held: automatic pairing leaves it alone; durable across a reopen.
    let s2 = DocService::open(disk.clone()).expect("reopen");
    assert_eq!(s2.pairings().held, vec!["bob1".to_string()]);
    assert!(s2.pairings().pairs.is_empty());
    // A shared box cannot be removed.
    assert_eq!(
        s.remove_box("admin", "inbox").map_err(|e| e.code()),
        Err(409)
    );
    // Only the admin or an owner shares.
    s.create_box("bob2", "b2", "B2").expect("box");
    assert_eq!(s.share_box("bob1", "b2").map_err(|e| e.code()), Err(403));
}

#[test]
fn answers_out_of_turn_are_refused() {
    let (mut s, _disk) = setup();
    let stray = postcard::to_allocvec(&CloudToDevice::Error {
        code: 1,
        message: "x".into(),
    })
    .expect("encode");
    assert!(matches!(
        s.share_answer(&stray),
        HostReply::Error { code: 409, .. }
    ));
    assert!(matches!(
        s.share_answer(&[0xff, 0xff]),
        HostReply::Error { code: 400, .. }
    ));
    let HostReply::ShareSend { .. } = s.share_open() else {
        panic!("ListUsers expected");
    };
    // A Sync answer to a ListUsers.
    let wrong = postcard::to_allocvec(&CloudToDevice::Sync(duplex_docs::SyncReply::Ack {
        share_id: "inbox".into(),
        revision: 1,
        need_data: vec![],
    }))
    .expect("encode");
    assert!(matches!(
        s.share_answer(&wrong),
        HostReply::Error { code: 400, .. }
    ));
}
