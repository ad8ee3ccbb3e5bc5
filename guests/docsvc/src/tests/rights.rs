//! Every account × right × operation through the service's real operations, against the
//! rights table of `docs/shared-data.md` (the one `duplex-docs` checks `check` against),
//! against `check` itself, and against a hand-written sample of rows.

use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

use duplex_docs::{check, Grant, Object, Op, Role, Target, ADMIN};

use super::{account, bytes, MemDisk};
use crate::{DocError, DocService};

/// The right a row's account holds.
#[derive(Clone, Copy, Debug)]
enum Held {
    None,
    OnBox(Role),
    OnDoc(Role),
    OwnerOtherDoc,
    OwnerOtherBox,
    Admin,
}

/// The row labels of the documented table, to what they mean.
fn held(label: &str) -> Held {
    match label {
        "none" => Held::None,
        "read on the box" => Held::OnBox(Role::Read),
        "write on the box" => Held::OnBox(Role::Write),
        "owner on the box" => Held::OnBox(Role::Owner),
        "read on the document" => Held::OnDoc(Role::Read),
        "write on the document" => Held::OnDoc(Role::Write),
        "owner on the document" => Held::OnDoc(Role::Owner),
        "owner on another document of the box" => Held::OwnerOtherDoc,
        "owner on another box" => Held::OwnerOtherBox,
        "administrator (`admin`), no grant" => Held::Admin,
        other => panic!("unknown row {other:?} in the rights table"),
    }
}

/// The rights table of `docs/shared-data.md`: (label, cells in `Op::ALL` order).
fn doc_table() -> Vec<(String, Vec<bool>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/shared-data.md");
    let text = std::fs::read_to_string(path).expect("docs/shared-data.md");
    let start = text.find("<!-- rights-table -->").expect("start marker");
    let end = text.find("<!-- /rights-table -->").expect("end marker");
    let rows: Vec<Vec<String>> = text[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|') && !l.contains("---"))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let header: Vec<&str> = rows[0][1..].iter().map(String::as_str).collect();
    let names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
    assert_eq!(header, names);
    rows[1..]
        .iter()
        .map(|r| {
            let cells = r[1..].iter().map(|c| c == "yes").collect();
            (r[0].clone(), cells)
        })
        .collect()
}

/// A disk holding: accounts `who` (unless admin), `bystander`, `other`; boxes `b1`, `b2`;
/// documents `d1`, `d2` in `b1`, `d3` in `b2`; the bystander owns everything; `who` holds
/// the row's right.
fn setup(h: Held, who: &str) -> Vec<u8> {
    let disk = MemDisk::new(2);
    let mut s = DocService::open(disk.clone()).expect("open");
    for a in [who, "bystander", "other"] {
        if a != ADMIN {
            s.add_account(ADMIN, account(a)).expect("account");
        }
    }
    s.create_box(ADMIN, "b1", "Box one").expect("b1");
    s.create_box(ADMIN, "b2", "Box two").expect("b2");
    for (b, n) in [("b1", "first"), ("b1", "second"), ("b2", "third")] {
        s.put_document(ADMIN, b, n, &bytes(1, 3000)).expect("doc");
    }
    let mut grants = vec![
        Grant::on_box("b1", Role::Owner, "bystander"),
        Grant::on_doc("d1", Role::Owner, "bystander"),
        Grant::on_box("b2", Role::Owner, "bystander"),
    ];
    match h {
        Held::None | Held::Admin => {}
        Held::OnBox(r) => grants.push(Grant::on_box("b1", r, who)),
        Held::OnDoc(r) => grants.push(Grant::on_doc("d1", r, who)),
        Held::OwnerOtherDoc => grants.push(Grant::on_doc("d2", Role::Owner, who)),
        Held::OwnerOtherBox => grants.push(Grant::on_box("b2", Role::Owner, who)),
    }
    for g in grants {
        s.grant(ADMIN, g).expect("grant");
    }
    disk.crash_image()
}

/// Runs `op` as `who` on box `b1` / document `d1` through the service (`revoke`: the
/// revoking form of the grant operations).
fn run(image: &[u8], who: &str, op: Op, revoke: bool) -> Result<(), DocError> {
    let disk = MemDisk::from_image(image.to_vec());
    let mut s = DocService::open(disk.clone()).expect("reopen");
    let result = match op {
        Op::ListBox => s.list_box(who, "b1").map(|_| ()),
        Op::PutDoc => s.put_document(who, "b1", "new", b"hello").map(|_| ()),
        Op::DeleteBox => s.remove_box(who, "b1"),
        Op::GrantOnBox if revoke => s.revoke(who, &Grant::on_box("b1", Role::Owner, "bystander")),
        Op::GrantOnBox => s.grant(who, Grant::on_box("b1", Role::Read, "other")),
        Op::GetDoc => s.get(who, "d1", 0, 100).map(|_| ()),
        Op::DeleteDoc => s.delete_document(who, "d1"),
        Op::GrantOnDoc if revoke => s.revoke(who, &Grant::on_doc("d1", Role::Owner, "bystander")),
        Op::GrantOnDoc => s.grant(who, Grant::on_doc("d1", Role::Read, "other")),
    };
    // What the operation did is there after a reopen (it was durable), or nothing.
    let after = DocService::open(MemDisk::from_image(disk.crash_image())).expect("again");
    match (op, &result) {
        (Op::PutDoc, Ok(())) => assert_eq!(after.stats().documents, 4),
        (Op::DeleteDoc, Ok(())) => assert!(after.doc("d1").is_err()),
        (Op::DeleteBox, Ok(())) => assert!(!after.has_box("b1") && after.doc("d2").is_err()),
        (_, Err(_)) => assert_eq!(after.stats().documents, 3),
        _ => {}
    }
    result
}

#[test]
fn every_account_right_and_operation_answers_as_the_documented_table_says() {
    let table = doc_table();
    assert_eq!(table.len(), 10);
    let mut checked = 0;
    for (label, cells) in &table {
        let h = held(label);
        let accounts: &[&str] = match h {
            Held::Admin => &[ADMIN],
            _ => &["u", "alice.smith", "x-1_2"],
        };
        for who in accounts {
            let image = setup(h, who);
            let grants = DocService::open(MemDisk::from_image(image.clone()))
                .expect("open")
                .all_grants()
                .to_vec();
            for (op, want) in Op::ALL.iter().zip(cells) {
                let target = if op.on_document() {
                    Target::Doc {
                        box_id: "b1",
                        doc_id: "d1",
                    }
                } else {
                    Target::Box("b1")
                };
                assert_eq!(
                    check(&grants, who, *op, target).is_ok(),
                    *want,
                    "check disagrees with the table: {label} / {}",
                    op.name()
                );
                let forms: &[bool] = match op {
                    Op::GrantOnBox | Op::GrantOnDoc => &[false, true],
                    _ => &[false],
                };
                for revoke in forms {
                    let got = run(&image, who, *op, *revoke);
                    let ctx = format!("{label} / {who} / {} (revoke {revoke})", op.name());
                    if *want {
                        assert_eq!(got, Ok(()), "{ctx}");
                    } else {
                        let needed = op.needs().as_str();
                        let object = if op.on_document() { "doc:d1" } else { "box:b1" };
                        assert_eq!(
                            got,
                            Err(DocError::Denied {
                                needed,
                                object: object.into()
                            }),
                            "{ctx}"
                        );
                        assert_eq!(got.map_err(|e| e.code()), Err(403));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 9 * 3 * 9 + 9);
}

#[test]
fn a_hand_written_sample_of_rows_holds() {
    const Y: bool = true;
    const N: bool = false;
    let sample: [(&str, Held, [bool; 7]); 5] = [
        ("none", Held::None, [N; 7]),
        ("read box", Held::OnBox(Role::Read), [Y, N, N, N, Y, N, N]),
        ("write box", Held::OnBox(Role::Write), [Y, Y, N, N, Y, Y, N]),
        ("write doc", Held::OnDoc(Role::Write), [N, N, N, N, Y, Y, N]),
        ("owner doc", Held::OnDoc(Role::Owner), [N, N, N, N, Y, Y, Y]),
    ];
    for (label, h, cells) in sample {
        let image = setup(h, "u");
        for (op, want) in Op::ALL.iter().zip(cells) {
            let got = run(&image, "u", *op, false);
            assert_eq!(got.is_ok(), want, "{label} / {}", op.name());
        }
    }
}

#[test]
fn account_management_is_the_administrators_and_unknown_accounts_are_refused() {
    let image = setup(Held::OnBox(Role::Owner), "u");
    let mut s = DocService::open(MemDisk::from_image(image)).expect("open");
    let denied = Err(DocError::Denied {
        needed: "admin",
        object: "accounts".into(),
    });
    assert_eq!(s.add_account("u", account("v")), denied);
    assert_eq!(s.accounts("u").map(|_| ()), denied);
    assert_eq!(s.remove_account("u", "other"), denied);
    assert_eq!(
        s.list_box("ghost", "b1").map(|_| ()),
        Err(DocError::UnknownAccount("ghost".into()))
    );
    assert_eq!(
        s.create_box("ghost", "b9", "x").map_err(|e| e.code()),
        Err(403)
    );
    // The owner may grant only to accounts that exist.
    assert_eq!(
        s.grant("u", Grant::on_box("b1", Role::Read, "nobody"))
            .map_err(|e| e.code()),
        Err(404)
    );
    // Removing an account removes its grants; it is then unknown.
    s.remove_account(ADMIN, "u").expect("remove");
    assert!(!s.all_grants().iter().any(|g| g.account == "u"));
    assert_eq!(s.list_box("u", "b1").map_err(|e| e.code()), Err(403));
    let owned: Vec<&Grant> = s
        .all_grants()
        .iter()
        .filter(|g| g.object == Object::Box("b1".into()))
        .collect();
    assert_eq!(owned.len(), 2, "admin's and the bystander's: {owned:?}");
}
