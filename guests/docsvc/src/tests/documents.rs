//! Documents through the link's messages (`serve`): put in chunks, get in chunks, list,
//! delete, uploads' errors, persistence across a reopen, a full disk.

use std::string::String;
use std::vec::Vec;

use duplex_docs::{document_crc32, ADMIN};
use duplex_link::msg::{BoxObject, BoxOp, BoxReply, BoxRole, DocEntry, HostReply};

use super::{account, bytes, fresh, MemDisk};
use crate::{DocService, DATA_CHUNK};

fn ok(s: &mut DocService<MemDisk>, who: &str, op: BoxOp) -> BoxReply {
    match s.serve(who, op.clone()) {
        HostReply::Box(r) => r,
        other => panic!("{op:?} as {who}: {other:?}"),
    }
}

fn code(s: &mut DocService<MemDisk>, who: &str, op: BoxOp) -> u16 {
    match s.serve(who, op.clone()) {
        HostReply::Error { code, .. } => code,
        other => panic!("{op:?} as {who} succeeded: {other:?}"),
    }
}

/// Uploads `data` in chunks of `chunk` bytes; the stored document.
fn put(
    s: &mut DocService<MemDisk>,
    who: &str,
    box_id: &str,
    data: &[u8],
    chunk: usize,
) -> DocEntry {
    let begin = BoxOp::PutBegin {
        box_id: box_id.into(),
        name: "file.bin".into(),
        len: data.len() as u64,
    };
    let BoxReply::PutStarted { put_id } = ok(s, who, begin) else {
        panic!("no put id")
    };
    let mut offset = 0u64;
    for part in data.chunks(chunk) {
        let op = BoxOp::PutData {
            put_id,
            offset,
            bytes: part.to_vec(),
        };
        let BoxReply::PutProgress { received, .. } = ok(s, who, op) else {
            panic!("no progress")
        };
        offset += part.len() as u64;
        assert_eq!(received, offset);
    }
    let end = BoxOp::PutEnd {
        put_id,
        crc32: document_crc32(data),
    };
    let BoxReply::Stored(doc) = ok(s, who, end) else {
        panic!("not stored")
    };
    doc
}

/// Reads a document in pieces of `len` bytes.
fn get(s: &mut DocService<MemDisk>, who: &str, id: &str, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let op = BoxOp::Get {
            doc_id: id.into(),
            offset: out.len() as u64,
            len,
        };
        let BoxReply::Data { bytes, doc, offset } = ok(s, who, op) else {
            panic!("no data")
        };
        assert_eq!(offset, out.len() as u64);
        if bytes.is_empty() {
            assert_eq!(doc.len, out.len() as u64);
            return out;
        }
        out.extend_from_slice(&bytes);
    }
}

fn setup() -> (DocService<MemDisk>, MemDisk) {
    let (mut s, disk) = fresh(24);
    for a in ["alice", "bob"] {
        s.add_account(ADMIN, account(a)).expect("account");
    }
    ok(
        &mut s,
        "alice",
        BoxOp::CreateBox {
            box_id: "inbox".into(),
            name: "Alice's inbox".into(),
        },
    );
    (s, disk)
}

#[test]
fn large_documents_round_trip_in_chunks_and_survive_a_reopen() {
    let (mut s, disk) = setup();
    let big = bytes(7, 3 * 1024 * 1024 + 12_345);
    let small = bytes(8, 10);
    let d1 = put(&mut s, "alice", "inbox", &big, DATA_CHUNK);
    let d2 = put(&mut s, "alice", "inbox", &small, 3);
    let empty = put(&mut s, "alice", "inbox", &[], 1);
    assert_eq!((d1.id.as_str(), d2.id.as_str()), ("d1", "d2"));
    assert_eq!(d1.len, big.len() as u64);
    assert_eq!(d1.crc32, document_crc32(&big));
    assert_eq!(d1.created_by, "alice");
    assert_eq!(get(&mut s, "alice", "d1", DATA_CHUNK as u32), big);
    // Unaligned pieces cross the stored chunks.
    assert_eq!(get(&mut s, "alice", "d1", 10_007), big);
    assert_eq!(get(&mut s, "alice", "d2", 4), small);
    assert_eq!(get(&mut s, "alice", &empty.id, 100), Vec::<u8>::new());
    // A request for more than a chunk gets a chunk.
    let BoxReply::Data { bytes: b, .. } = ok(
        &mut s,
        "alice",
        BoxOp::Get {
            doc_id: "d1".into(),
            offset: 5,
            len: u32::MAX,
        },
    ) else {
        panic!()
    };
    assert_eq!(b, big[5..5 + DATA_CHUNK]);
    let BoxReply::Docs(list) = ok(
        &mut s,
        "alice",
        BoxOp::ListBox {
            box_id: "inbox".into(),
        },
    ) else {
        panic!()
    };
    let ids: Vec<&str> = list.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["d1", "d2", "d3"]);
    drop(s);
    let mut s = DocService::open(MemDisk::from_image(disk.crash_image())).expect("reopen");
    assert_eq!(get(&mut s, "alice", "d1", DATA_CHUNK as u32), big);
    assert_eq!(get(&mut s, "alice", "d2", 1000), small);
    // Numbers are not reused after a reopen.
    let d4 = put(&mut s, "alice", "inbox", b"more", 100);
    assert_eq!(d4.id, "d4");
}

#[test]
fn uploads_check_offsets_lengths_crcs_and_owners() {
    let (mut s, _disk) = setup();
    let begin = |len| BoxOp::PutBegin {
        box_id: "inbox".into(),
        name: "x".into(),
        len,
    };
    let BoxReply::PutStarted { put_id } = ok(&mut s, "alice", begin(10)) else {
        panic!()
    };
    let data = |offset, n: usize| BoxOp::PutData {
        put_id,
        offset,
        bytes: std::vec![1; n],
    };
    assert_eq!(code(&mut s, "alice", data(3, 2)), 400, "wrong offset");
    assert_eq!(
        code(&mut s, "bob", data(0, 2)),
        404,
        "someone else's upload"
    );
    assert_eq!(code(&mut s, "alice", data(0, DATA_CHUNK + 1)), 413);
    assert_eq!(
        code(&mut s, "alice", data(0, 11)),
        400,
        "more than announced"
    );
    ok(&mut s, "alice", data(0, 10));
    assert_eq!(
        code(&mut s, "alice", BoxOp::PutEnd { put_id, crc32: 1 }),
        400,
        "bad crc"
    );
    // The failed end dropped the upload; nothing was stored.
    assert_eq!(code(&mut s, "alice", data(10, 0)), 404);
    assert_eq!(s.stats().documents, 0);
    assert_eq!(
        code(&mut s, "alice", begin(crate::MAX_DOCUMENT_LEN + 1)),
        413
    );
    assert_eq!(code(&mut s, "bob", begin(1)), 403, "bob may not write");
    let short = BoxOp::PutBegin {
        box_id: "inbox".into(),
        name: "x".into(),
        len: 5,
    };
    let BoxReply::PutStarted { put_id } = ok(&mut s, "alice", short) else {
        panic!()
    };
    let end = BoxOp::PutEnd {
        put_id,
        crc32: document_crc32(&[]),
    };
    assert_eq!(code(&mut s, "alice", end), 400, "short upload");
    // Uploads beyond the limit evict the oldest.
    let ids: Vec<u64> = (0..6)
        .map(|_| match ok(&mut s, "alice", begin(1)) {
            BoxReply::PutStarted { put_id } => put_id,
            _ => panic!(),
        })
        .collect();
    assert_eq!(s.uploads(), 4);
    let stale = BoxOp::PutAbort { put_id: ids[0] };
    assert_eq!(code(&mut s, "alice", stale), 404);
    ok(&mut s, "alice", BoxOp::PutAbort { put_id: ids[5] });
}

#[test]
fn error_codes_of_the_operations() {
    let (mut s, _disk) = setup();
    let d = put(&mut s, "alice", "inbox", b"abc", 10);
    let mk = |id: &str| BoxOp::CreateBox {
        box_id: id.into(),
        name: "n".into(),
    };
    assert_eq!(code(&mut s, "alice", mk("inbox")), 409);
    assert_eq!(code(&mut s, "alice", mk("bad id")), 422);
    assert_eq!(
        code(
            &mut s,
            "alice",
            BoxOp::ListBox {
                box_id: "nope".into()
            }
        ),
        404
    );
    let get = |id: &str, offset| BoxOp::Get {
        doc_id: id.into(),
        offset,
        len: 10,
    };
    assert_eq!(code(&mut s, "alice", get("d99", 0)), 404);
    assert_eq!(code(&mut s, "alice", get("zzz", 0)), 404);
    assert_eq!(code(&mut s, "alice", get(&d.id, 4)), 400);
    assert_eq!(code(&mut s, "bob", get(&d.id, 0)), 403);
    let add = |id: &str| BoxOp::AddAccount {
        id: id.into(),
        name: "N".into(),
        email: Some("n@example.com".into()),
        email_verified: true,
    };
    assert_eq!(code(&mut s, ADMIN, add("alice")), 409);
    assert_eq!(code(&mut s, ADMIN, add("admin")), 409);
    assert_eq!(code(&mut s, "alice", add("carol")), 403);
    ok(&mut s, ADMIN, add("carol"));
    let BoxReply::Accounts(all) = ok(&mut s, ADMIN, BoxOp::ListAccounts) else {
        panic!()
    };
    let ids: Vec<&str> = all.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["alice", "bob", "carol"]);
    assert!(all[2].email_verified);
    let grant = |role| BoxOp::Grant {
        object: BoxObject::Doc(d.id.clone()),
        role,
        account: "bob".into(),
    };
    ok(&mut s, "alice", grant(BoxRole::Read));
    ok(&mut s, "alice", grant(BoxRole::Read)); // held already: nothing changes
    assert_eq!(
        s.serve("bob", get(&d.id, 0)),
        s.serve("alice", get(&d.id, 0))
    );
    let BoxReply::Grants(g) = ok(
        &mut s,
        "bob",
        BoxOp::ListGrants {
            object: BoxObject::Doc(d.id.clone()),
        },
    ) else {
        panic!()
    };
    assert_eq!(g.len(), 1);
    let revoke = BoxOp::Revoke {
        object: BoxObject::Doc(d.id.clone()),
        role: BoxRole::Read,
        account: "bob".into(),
    };
    ok(&mut s, "alice", revoke.clone());
    assert_eq!(code(&mut s, "alice", revoke), 404);
    assert_eq!(code(&mut s, "bob", get(&d.id, 0)), 403);
    let BoxReply::Boxes(b) = ok(&mut s, "bob", BoxOp::ListBoxes) else {
        panic!()
    };
    assert!(b.is_empty());
    let scan = BoxOp::Scan {
        box_id: "inbox".into(),
        name: "s".into(),
        pages: 1,
        seed: 1,
        width: 8,
        height: 8,
    };
    assert_eq!(code(&mut s, "alice", scan), 400);
}

#[test]
fn removing_a_box_removes_its_documents_and_grants_durably() {
    let (mut s, disk) = setup();
    let d = put(&mut s, "alice", "inbox", &bytes(3, 70_000), DATA_CHUNK);
    s.grant(
        "alice",
        duplex_docs::Grant::on_doc(&d.id, duplex_docs::Role::Read, "bob"),
    )
    .expect("grant");
    ok(
        &mut s,
        "alice",
        BoxOp::RemoveBox {
            box_id: "inbox".into(),
        },
    );
    let mut s = DocService::open(MemDisk::from_image(disk.crash_image())).expect("reopen");
    assert_eq!(s.stats().documents, 0);
    assert!(s.all_grants().is_empty());
    assert_eq!(s.store.keys(b"dat/").expect("keys"), Vec::<Vec<u8>>::new());
    assert_eq!(
        code(
            &mut s,
            "alice",
            BoxOp::ListBox {
                box_id: "inbox".into()
            }
        ),
        404
    );
}

#[test]
fn a_full_disk_answers_507_and_keeps_what_it_had() {
    let (mut s, _disk) = fresh(2);
    s.create_box(ADMIN, "b", "B").expect("box");
    let mut stored: Vec<(String, Vec<u8>)> = Vec::new();
    let mut full = false;
    for i in 0..64 {
        let data = bytes(i, 200_000);
        match s.put_document(ADMIN, "b", "x", &data) {
            Ok(d) => stored.push((d.id, data)),
            Err(e) => {
                assert_eq!(e.code(), 507, "{e}");
                full = true;
                break;
            }
        }
    }
    assert!(
        full,
        "a 2 MiB disk took {} documents of 200 kB",
        stored.len()
    );
    assert_eq!(s.stats().documents, stored.len());
    for (id, data) in &stored {
        assert_eq!(&get(&mut s, ADMIN, id, DATA_CHUNK as u32), data);
    }
    // Deleting makes room again.
    for (id, _) in &stored {
        s.delete_document(ADMIN, id).expect("delete");
    }
    s.put_document(ADMIN, "b", "y", &bytes(99, 200_000))
        .expect("room after deleting");
}
