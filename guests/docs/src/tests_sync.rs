//! Tests of the sync protocol: the device outbox (revisions, revocations first, barriers,
//! retransmission, snapshot fallback) against the cloud replica (each revision once, gaps
//! refused, rights enforced through the pairs).

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use crate::*;

pub(crate) const SHARE: &str = "share-1";

pub(crate) fn doc(id: &str, bytes: &[u8]) -> Document {
    Document {
        id: id.to_string(),
        box_id: "b1".to_string(),
        name: "scan.pdf".to_string(),
        len: bytes.len() as u64,
        crc32: document_crc32(bytes),
        created_by: "alice".to_string(),
    }
}

pub(crate) fn pair_of(account: &str, cloud_user: &str) -> Pair {
    Pair {
        account: account.to_string(),
        cloud_user: cloud_user.to_string(),
    }
}

/// Box b1 with d1 (b"hello"); alice (↔ c-alice) reads the box, bob (↔ c-bob) reads d1.
pub(crate) fn state() -> ShareState {
    ShareState {
        doc_box: DocBox {
            id: "b1".to_string(),
            name: "Scans".to_string(),
        },
        pairs: vec![pair_of("alice", "c-alice"), pair_of("bob", "c-bob")],
        documents: vec![doc("d1", b"hello")],
        grants: vec![
            Grant::on_box("b1", Role::Read, "alice"),
            Grant::on_doc("d1", Role::Read, "bob"),
        ],
    }
}

/// An outbox and a replica in sync at the snapshot of [`state`] with d1's data.
pub(crate) fn synced() -> (Outbox, Replica) {
    let mut o = Outbox::new(SHARE, 1);
    let mut r = Replica::new(SHARE);
    let snap = o.snapshot(state()).unwrap();
    let reply = r.handle(&snap);
    assert_eq!(
        o.on_reply(&reply),
        OutboxEvent::Acked {
            revision: 1,
            need_data: vec!["d1".to_string()]
        }
    );
    o.push_data("d1", b"hello").unwrap();
    deliver(&mut o, &mut r);
    assert_eq!(r.data("d1"), Some(&b"hello"[..]));
    (o, r)
}

/// Sends everything the outbox has to the replica until it has nothing more.
fn deliver(o: &mut Outbox, r: &mut Replica) {
    while let Some(m) = o.poll() {
        let reply = r.handle(&m);
        assert!(
            matches!(o.on_reply(&reply), OutboxEvent::Acked { .. }),
            "{reply:?}"
        );
    }
}

fn changes(m: &SyncRequest) -> &[Change] {
    match m {
        SyncRequest::Delta { changes, .. } => changes,
        SyncRequest::Snapshot { .. } => &[],
    }
}

#[test]
fn a_new_outbox_starts_with_a_snapshot() {
    let mut o = Outbox::new(SHARE, 1);
    assert!(o.snapshot_needed());
    o.push(Change::Granted {
        grant: Grant::on_box("b1", Role::Read, "carol"),
    })
    .unwrap();
    assert_eq!(o.poll(), None);
    let (o, r) = synced();
    assert_eq!((o.acked(), r.revision()), (2, 2));
}

#[test]
fn revocations_come_first_and_hold_back_newer_deltas_until_acked() {
    let (mut o, mut r) = synced();
    let g_new = Grant::on_box("b1", Role::Write, "bob");
    let g_old = Grant::on_box("b1", Role::Read, "alice");
    o.push_document(doc("d2", b"abc"), b"abc").unwrap();
    o.push(Change::Granted { grant: g_new }).unwrap();
    o.push(Change::Revoked { grant: g_old }).unwrap();
    o.push(Change::Unpaired {
        account: "bob".to_string(),
    })
    .unwrap();
    let m = o.poll().unwrap();
    let c = changes(&m);
    assert!(matches!(c[0], Change::Revoked { .. }));
    assert!(matches!(c[1], Change::Unpaired { .. }));
    assert!(c[2..].iter().all(|x| !x.is_restrictive()) && c.len() == 5);
    // Another restrictive change waits for the ack of the first.
    o.push(Change::DocumentRemoved {
        id: "d1".to_string(),
    })
    .unwrap();
    assert_eq!(o.poll(), None, "barrier");
    let reply = r.handle(&m);
    o.on_reply(&reply);
    assert!(o.poll().is_some());
}

#[test]
fn a_revocation_cancels_the_queued_grant_it_undoes() {
    let (mut o, _) = synced();
    let g = Grant::on_box("b1", Role::Owner, "carol");
    o.push(Change::Granted { grant: g.clone() }).unwrap();
    o.push(Change::Paired {
        pair: pair_of("carol", "c-carol"),
    })
    .unwrap();
    o.push(Change::Revoked { grant: g.clone() }).unwrap();
    o.push(Change::Unpaired {
        account: "carol".to_string(),
    })
    .unwrap();
    o.push_document(doc("d9", b"x"), b"x").unwrap();
    o.push(Change::Granted {
        grant: Grant::on_doc("d9", Role::Read, "carol"),
    })
    .unwrap();
    o.push(Change::DocumentRemoved {
        id: "d9".to_string(),
    })
    .unwrap();
    assert_eq!(
        o.queued(),
        &[
            Change::Revoked { grant: g },
            Change::Unpaired {
                account: "carol".to_string()
            },
            Change::DocumentRemoved {
                id: "d9".to_string()
            },
        ]
    );
    // Removing an account cancels its queued grants and pairing.
    o.push(Change::Granted {
        grant: Grant::on_box("b1", Role::Read, "dan"),
    })
    .unwrap();
    o.push(Change::Paired {
        pair: pair_of("dan", "c-dan"),
    })
    .unwrap();
    o.push(Change::AccountRemoved {
        account: "dan".to_string(),
    })
    .unwrap();
    assert_eq!(o.queued().len(), 4);
}

#[test]
fn after_a_revocation_delta_the_replica_refuses_that_user() {
    let (mut o, mut r) = synced();
    assert_eq!(r.may("c-alice", Op::GetDoc, Some("d1")), Ok(()));
    assert_eq!(r.may("c-alice", Op::ListBox, None), Ok(()));
    o.push(Change::Revoked {
        grant: Grant::on_box("b1", Role::Read, "alice"),
    })
    .unwrap();
    deliver(&mut o, &mut r);
    assert!(r.may("c-alice", Op::GetDoc, Some("d1")).is_err());
    assert!(r.may("c-alice", Op::ListBox, None).is_err());
    assert_eq!(
        r.may("c-bob", Op::GetDoc, Some("d1")),
        Ok(()),
        "others keep theirs"
    );
}

#[test]
fn after_unpairing_everything_of_that_account_is_refused() {
    let (mut o, mut r) = synced();
    o.push(Change::Granted {
        grant: Grant::on_box("b1", Role::Owner, "bob"),
    })
    .unwrap();
    deliver(&mut o, &mut r);
    for op in Op::ALL {
        let d = op.on_document().then_some("d1");
        assert_eq!(r.may("c-bob", op, d), Ok(()), "{}", op.name());
    }
    o.push(Change::Unpaired {
        account: "bob".to_string(),
    })
    .unwrap();
    deliver(&mut o, &mut r);
    for op in Op::ALL {
        let d = op.on_document().then_some("d1");
        assert_eq!(
            r.may("c-bob", op, d),
            Err(Denied::NotPaired),
            "{}",
            op.name()
        );
    }
    assert!(r.visible_documents("c-bob").is_empty());
    assert_eq!(r.visible_documents("c-alice").len(), 1);
}

#[test]
fn removing_an_account_or_a_document_drops_its_rights_on_the_cloud() {
    let (mut o, mut r) = synced();
    o.push(Change::AccountRemoved {
        account: "alice".to_string(),
    })
    .unwrap();
    o.push(Change::DocumentRemoved {
        id: "d1".to_string(),
    })
    .unwrap();
    deliver(&mut o, &mut r);
    let s = r.state().unwrap();
    assert!(s.grants.is_empty() && s.documents.is_empty());
    assert_eq!(s.pairs, vec![pair_of("bob", "c-bob")]);
    assert_eq!(
        r.may("c-bob", Op::GetDoc, Some("d1")),
        Err(Denied::NoSuchObject)
    );
    assert_eq!(r.data("d1"), None);
}

#[test]
fn the_cloud_answers_what_check_answers_for_the_paired_account() {
    let (_, r) = synced();
    let s = state();
    for (cloud, account) in [("c-alice", "alice"), ("c-bob", "bob")] {
        for op in Op::ALL {
            let (d, t) = if op.on_document() {
                let t = Target::Doc {
                    box_id: "b1",
                    doc_id: "d1",
                };
                (Some("d1"), t)
            } else {
                (None, Target::Box("b1"))
            };
            assert_eq!(r.may(cloud, op, d), check(&s.grants, account, op, t));
        }
    }
    assert_eq!(
        r.may("c-stranger", Op::ListBox, None),
        Err(Denied::NotPaired)
    );
    assert_eq!(
        r.may("c-alice", Op::GetDoc, Some("nope")),
        Err(Denied::NoSuchObject)
    );
}

#[test]
fn unacknowledged_deltas_are_sent_again_and_applied_once() {
    let (o, mut r) = synced();
    let mut o = o.with_window(3);
    let data: Vec<u8> = (0..6 * MAX_DATA_CHUNK as u32).map(|i| i as u8).collect();
    o.push(Change::DocumentAdded {
        meta: doc("big", &data),
    })
    .unwrap();
    o.push_data("big", &data).unwrap();
    let mut sent = Vec::new();
    while let Some(m) = o.poll() {
        sent.push(m);
    }
    assert!(sent.len() >= 2, "several deltas in flight: {}", sent.len());
    let revs: Vec<u64> = sent.iter().map(SyncRequest::revision).collect();
    assert!(
        revs.windows(2).all(|w| w[1] == w[0] + 1),
        "rising revisions"
    );
    // The cloud got the first one; the connection dropped before its ack came back.
    let first = r.handle(&sent[0]);
    assert!(matches!(first, SyncReply::Ack { .. }));
    let again = o.reconnect();
    assert_eq!(again, sent);
    for m in &again {
        let reply = r.handle(m);
        // The first is a duplicate: acked again, not applied twice (its data chunk
        // would land at the wrong offset and be refused).
        assert!(matches!(reply, SyncReply::Ack { .. }), "{reply:?}");
        o.on_reply(&reply);
    }
    deliver(&mut o, &mut r);
    assert_eq!(r.data("big"), Some(data.as_slice()));
    assert_eq!(o.acked(), r.revision());
    assert!(o.reconnect().is_empty());
}

#[test]
fn a_gap_is_refused_and_a_snapshot_repairs_it() {
    let (mut o, mut r) = synced();
    let grant = |a: &str| Change::Granted {
        grant: Grant::on_box("b1", Role::Write, a),
    };
    o.push(grant("carol")).unwrap();
    let lost = o.poll().unwrap();
    o.push(grant("dan")).unwrap();
    let next = o.poll().unwrap();
    let before = r.state().cloned();
    let reply = r.handle(&next);
    assert!(
        matches!(
            reply,
            SyncReply::Error {
                code: error_code::REVISION_GAP,
                revision: 2,
                ..
            }
        ),
        "{reply:?}"
    );
    assert_eq!(r.state().cloned(), before, "nothing applied");
    assert!(matches!(
        o.on_reply(&reply),
        OutboxEvent::SnapshotNeeded { .. }
    ));
    assert_eq!(o.poll(), None);
    let mut s = state();
    s.grants.push(Grant::on_box("b1", Role::Write, "carol"));
    s.grants.push(Grant::on_box("b1", Role::Write, "dan"));
    let snap = o.snapshot(s).unwrap();
    // A stale gap reply to a replaced delta arrives late: ignored.
    let late = r.handle(&next);
    assert_eq!(o.on_reply(&late), OutboxEvent::Ignored);
    let reply = r.handle(&snap);
    assert_eq!(
        o.on_reply(&reply),
        OutboxEvent::Acked {
            revision: 5,
            need_data: vec![]
        },
        "d1's bytes are kept"
    );
    assert_eq!(
        r.may("c-bob", Op::PutDoc, None),
        Err(Denied::Insufficient {
            needed: Role::Write
        })
    );
    assert_eq!(r.data("d1"), Some(&b"hello"[..]));
    // The lost delta, if it arrives now, is older than the snapshot: acked, not applied.
    assert!(matches!(
        r.handle(&lost),
        SyncReply::Ack { revision: 3, .. }
    ));
    assert_eq!(r.revision(), 5);
}

#[test]
fn a_delta_before_any_snapshot_asks_for_one() {
    let mut r = Replica::new(SHARE);
    let d = SyncRequest::Delta {
        share_id: SHARE.to_string(),
        revision: 1,
        changes: vec![],
    };
    assert!(matches!(
        r.handle(&d),
        SyncReply::Error {
            code: error_code::UNKNOWN_SHARE,
            ..
        }
    ));
    let other = SyncRequest::Delta {
        share_id: "share-2".to_string(),
        revision: 1,
        changes: vec![],
    };
    assert!(matches!(
        r.handle(&other),
        SyncReply::Error {
            code: error_code::MALFORMED,
            ..
        }
    ));
}

#[test]
fn a_stale_snapshot_is_refused_and_the_outbox_continues_above_the_cloud() {
    let (_, mut r) = synced();
    // The controller lost its counter and starts again at 1.
    let mut o = Outbox::new(SHARE, 1);
    let snap = o.snapshot(state()).unwrap();
    let reply = r.handle(&snap);
    assert!(matches!(
        reply,
        SyncReply::Error {
            code: error_code::STALE_REVISION,
            revision: 2,
            ..
        }
    ));
    o.on_reply(&reply);
    assert!(o.snapshot_needed());
    assert_eq!(o.next_revision(), 3);
    let snap = o.snapshot(state()).unwrap();
    assert!(matches!(
        r.handle(&snap),
        SyncReply::Ack { revision: 3, .. }
    ));
    // The same snapshot again is acked again.
    assert!(matches!(
        r.handle(&snap),
        SyncReply::Ack { revision: 3, .. }
    ));
}

#[test]
fn a_delta_applies_all_or_nothing() {
    let (_, mut r) = synced();
    let bad = SyncRequest::Delta {
        share_id: SHARE.to_string(),
        revision: 3,
        changes: vec![
            Change::Granted {
                grant: Grant::on_box("b1", Role::Owner, "eve"),
            },
            Change::DocumentData {
                doc_id: "ghost".to_string(),
                offset: 0,
                bytes: vec![1],
            },
        ],
    };
    let reply = r.handle(&bad);
    assert!(matches!(
        reply,
        SyncReply::Error {
            code: error_code::INVALID_CHANGE,
            ..
        }
    ));
    assert_eq!(r.revision(), 2);
    assert!(!r.state().unwrap().grants.iter().any(|g| g.account == "eve"));
}

#[test]
fn corrupt_or_misplaced_data_is_refused() {
    let (_, mut r) = synced();
    let delta = |changes| SyncRequest::Delta {
        share_id: SHARE.to_string(),
        revision: 3,
        changes,
    };
    let mut meta = doc("d3", b"abcd");
    meta.crc32 ^= 1;
    let data = |offset, b: &[u8]| Change::DocumentData {
        doc_id: "d3".to_string(),
        offset,
        bytes: b.to_vec(),
    };
    let added = Change::DocumentAdded { meta };
    for case in [
        vec![added.clone(), data(0, b"abcd")],  // CRC mismatch
        vec![added.clone(), data(1, b"bcd")],   // wrong offset
        vec![added.clone(), data(0, b"abcde")], // past the length
        vec![Change::Granted {
            grant: Grant::on_box("b9", Role::Read, "x"),
        }], // another box
    ] {
        let reply = r.handle(&delta(case));
        assert!(
            matches!(
                reply,
                SyncReply::Error {
                    code: error_code::INVALID_CHANGE,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    assert_eq!(r.revision(), 2);
}
