//! Tests of the sync protocol's limits, wire format and hostile values.

use alloc::string::{String, ToString};
use alloc::vec;

use crate::tests_sync::{doc, pair_of, state, synced, SHARE};
use crate::*;

#[test]
fn limits_are_enforced_on_both_sides() {
    let mut o = Outbox::new(SHARE, 1);
    let mut s = state();
    s.documents = (0..=MAX_DOCUMENTS_PER_SHARE)
        .map(|i| doc(&alloc::format!("d{i}"), b""))
        .collect();
    assert_eq!(o.snapshot(s), Err(SyncError::TooLarge));
    let mut s = state();
    s.documents[0].box_id = "b2".to_string();
    assert_eq!(o.snapshot(s), Err(SyncError::Malformed));
    assert_eq!(
        o.push(Change::Unpaired {
            account: "a b".to_string()
        }),
        Err(SyncError::Malformed)
    );
    assert_eq!(
        o.push_document(doc("d1", b"hello"), b"hellO"),
        Err(SyncError::Malformed)
    );
    let mut r = Replica::new(SHARE);
    let mut s = state();
    s.grants = (0..=MAX_GRANTS_PER_SHARE)
        .map(|i| Grant::on_box("b1", Role::Read, &alloc::format!("u{i}")))
        .collect();
    let snap = SyncRequest::Snapshot {
        share_id: SHARE.to_string(),
        revision: 1,
        state: s,
    };
    assert!(matches!(
        r.handle(&snap),
        SyncReply::Error {
            code: error_code::TOO_LARGE,
            ..
        }
    ));
}

#[test]
fn a_delta_stays_under_the_message_limit() {
    let (mut o, _) = synced();
    let data = vec![7u8; 8 * MAX_DATA_CHUNK];
    o.push_document(doc("d5", &data), &data).unwrap();
    let o = &mut o.with_window(16);
    let mut n = 0;
    while let Some(m) = o.poll() {
        let len = postcard::to_allocvec(&m).unwrap().len();
        assert!(len <= MAX_SYNC_MESSAGE, "{len}");
        n += 1;
    }
    assert!(n >= 3, "{n} deltas");
}

#[test]
fn acks_for_another_share_or_an_unsent_revision_are_ignored() {
    let (mut o, _) = synced();
    let ack = |share: &str, revision| SyncReply::Ack {
        share_id: share.to_string(),
        revision,
        need_data: vec![],
    };
    assert_eq!(o.on_reply(&ack("other", 2)), OutboxEvent::Ignored);
    assert_eq!(o.on_reply(&ack(SHARE, 99)), OutboxEvent::Ignored);
    assert_eq!(o.acked(), 2);
}

#[test]
fn wire_format_variant_numbers_are_pinned() {
    let d = SyncRequest::Delta {
        share_id: "s".to_string(),
        revision: 1,
        changes: vec![Change::Paired {
            pair: pair_of("a", "c"),
        }],
    };
    let bytes = postcard::to_allocvec(&d).unwrap();
    // Delta = 1, "s", revision 1, one change, Paired = 7, "a", "c".
    assert_eq!(bytes, [1, 1, b's', 1, 1, 7, 1, b'a', 1, b'c']);
    assert_eq!(postcard::from_bytes::<SyncRequest>(&bytes).unwrap(), d);
    let e = SyncReply::Error {
        share_id: "s".to_string(),
        code: error_code::REVISION_GAP,
        message: String::new(),
        revision: 0,
    };
    let bytes = postcard::to_allocvec(&e).unwrap();
    assert_eq!(bytes, [1, 1, b's', 0x9c, 0x03, 0, 0]);
}

#[test]
fn extreme_revisions_do_not_overflow() {
    let mut r = Replica::new(SHARE);
    let snap = SyncRequest::Snapshot {
        share_id: SHARE.to_string(),
        revision: u64::MAX,
        state: state(),
    };
    assert!(matches!(
        r.handle(&snap),
        SyncReply::Ack {
            revision: u64::MAX,
            ..
        }
    ));
    let d = SyncRequest::Delta {
        share_id: SHARE.to_string(),
        revision: u64::MAX,
        changes: vec![],
    };
    assert!(matches!(
        r.handle(&d),
        SyncReply::Ack {
            revision: u64::MAX,
            ..
        }
    ));
    let mut o = Outbox::new(SHARE, u64::MAX);
    o.snapshot(state()).unwrap();
    assert_eq!(o.next_revision(), u64::MAX);
}
