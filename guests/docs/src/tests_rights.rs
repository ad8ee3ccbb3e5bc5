//! Tests of the rights model: the rights table, exhaustively, against [`check`] and
//! against the table in `docs/shared-data.md`; the tuple syntax.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::*;

/// The box and document the table is about, and their neighbours.
const BOX: &str = "b1";
const DOC: &str = "d1";
const OTHER_DOC: &str = "d2"; // in BOX too
const OTHER_BOX: &str = "b2";

/// The right the account holds, one row of the table.
#[derive(Clone, Copy, Debug)]
enum Held {
    None,
    OnBox(Role),
    OnDoc(Role),
    OwnerOtherDoc,
    OwnerOtherBox,
    Admin,
}

/// The rights table: the one source of truth the tests check [`check`] against, and that
/// `docs/shared-data.md` must show. Columns in [`Op::ALL`] order: list box, put doc,
/// delete box, grant on box, get doc, delete doc, grant on doc.
const TABLE: &[(&str, Held, [bool; 7])] = {
    const Y: bool = true;
    const N: bool = false;
    &[
        ("none", Held::None, [N, N, N, N, N, N, N]),
        (
            "read on the box",
            Held::OnBox(Role::Read),
            [Y, N, N, N, Y, N, N],
        ),
        (
            "write on the box",
            Held::OnBox(Role::Write),
            [Y, Y, N, N, Y, Y, N],
        ),
        (
            "owner on the box",
            Held::OnBox(Role::Owner),
            [Y, Y, Y, Y, Y, Y, Y],
        ),
        (
            "read on the document",
            Held::OnDoc(Role::Read),
            [N, N, N, N, Y, N, N],
        ),
        (
            "write on the document",
            Held::OnDoc(Role::Write),
            [N, N, N, N, Y, Y, N],
        ),
        (
            "owner on the document",
            Held::OnDoc(Role::Owner),
            [N, N, N, N, Y, Y, Y],
        ),
        (
            "owner on another document of the box",
            Held::OwnerOtherDoc,
            [N; 7],
        ),
        ("owner on another box", Held::OwnerOtherBox, [N; 7]),
        ("administrator (`admin`), no grant", Held::Admin, [Y; 7]),
    ]
};

/// The accounts each row is tried with (the administrator row uses `admin`).
const ACCOUNTS: &[&str] = &["u", "alice.smith", "x-1_2"];

fn target(op: Op) -> Target<'static> {
    if op.on_document() {
        Target::Doc {
            box_id: BOX,
            doc_id: DOC,
        }
    } else {
        Target::Box(BOX)
    }
}

/// The grants for a row: the account's own, plus every right for a bystander.
fn grants_for(held: Held, account: &str) -> Vec<Grant> {
    let mut g = vec![
        Grant::on_box(BOX, Role::Owner, "bystander"),
        Grant::on_doc(DOC, Role::Owner, "bystander"),
        Grant::on_box(OTHER_BOX, Role::Owner, "bystander"),
    ];
    match held {
        Held::None | Held::Admin => {}
        Held::OnBox(r) => g.push(Grant::on_box(BOX, r, account)),
        Held::OnDoc(r) => g.push(Grant::on_doc(DOC, r, account)),
        Held::OwnerOtherDoc => g.push(Grant::on_doc(OTHER_DOC, Role::Owner, account)),
        Held::OwnerOtherBox => g.push(Grant::on_box(OTHER_BOX, Role::Owner, account)),
    }
    g
}

#[test]
fn every_account_right_and_operation_answers_as_the_table_says() {
    let mut checked = 0;
    for (label, held, row) in TABLE {
        let accounts: &[&str] = match held {
            Held::Admin => &[ADMIN],
            _ => ACCOUNTS,
        };
        for account in accounts {
            let grants = grants_for(*held, account);
            for (op, want) in Op::ALL.iter().zip(row) {
                let got = check(&grants, account, *op, target(*op));
                assert_eq!(got.is_ok(), *want, "{label} / {account} / {}", op.name());
                if !want {
                    assert_eq!(
                        got,
                        Err(Denied::Insufficient { needed: op.needs() }),
                        "{label} / {}",
                        op.name()
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 9 * 3 * 7 + 7);
}

#[test]
fn several_grants_give_the_highest_role_and_order_does_not_matter() {
    let mut g = vec![
        Grant::on_box(BOX, Role::Read, "u"),
        Grant::on_doc(DOC, Role::Owner, "u"),
    ];
    let t = target(Op::GrantOnDoc);
    assert_eq!(check(&g, "u", Op::GrantOnDoc, t), Ok(()));
    assert!(check(&g, "u", Op::PutDoc, Target::Box(BOX)).is_err());
    g.reverse();
    assert_eq!(check(&g, "u", Op::GrantOnDoc, t), Ok(()));
}

#[test]
fn a_document_right_does_not_apply_to_the_same_document_id_in_another_box_target() {
    // A document is checked with its own box: a right on box b2 does not reach d1 in b1.
    let g = vec![Grant::on_box(OTHER_BOX, Role::Owner, "u")];
    assert!(check(&g, "u", Op::GetDoc, target(Op::GetDoc)).is_err());
    let in_b2 = Target::Doc {
        box_id: OTHER_BOX,
        doc_id: DOC,
    };
    assert_eq!(check(&g, "u", Op::GetDoc, in_b2), Ok(()));
}

#[test]
fn an_operation_on_the_wrong_kind_of_target_is_refused_even_for_the_admin() {
    for op in Op::ALL {
        let wrong = if op.on_document() {
            Target::Box(BOX)
        } else {
            Target::Doc {
                box_id: BOX,
                doc_id: DOC,
            }
        };
        assert_eq!(check(&[], ADMIN, op, wrong), Err(Denied::WrongTarget));
    }
}

#[test]
fn roles_include_lower_roles_only() {
    assert!(Role::Owner.includes(Role::Write) && Role::Owner.includes(Role::Read));
    assert!(Role::Write.includes(Role::Read) && !Role::Write.includes(Role::Owner));
    assert!(!Role::Read.includes(Role::Write));
}

#[test]
fn tuples_print_and_parse_back() {
    let g = Grant::on_box("inbox", Role::Write, "alice");
    assert_eq!(g.to_string(), "box:inbox#write@user:alice");
    assert_eq!("box:inbox#write@user:alice".parse::<Grant>(), Ok(g));
    let d = Grant::on_doc("scan-7.pdf", Role::Owner, "bob_2");
    assert_eq!(d.to_string().parse::<Grant>(), Ok(d));
    assert_eq!(
        "doc:x#read@user:y".parse::<Grant>(),
        Ok(Grant::on_doc("x", Role::Read, "y"))
    );
}

#[test]
fn bad_tuples_are_refused() {
    let cases = [
        ("box:inbox#write", ParseGrantError::Syntax),
        ("box:inbox#write@alice", ParseGrantError::Syntax),
        ("inbox#write@user:alice", ParseGrantError::Syntax),
        ("folder:inbox#write@user:alice", ParseGrantError::Kind),
        ("box:inbox#admin@user:alice", ParseGrantError::Role),
        ("box:#read@user:alice", ParseGrantError::Id),
        ("box:a b#read@user:alice", ParseGrantError::Id),
        ("box:inbox#read@user:", ParseGrantError::Id),
        ("box:inbox#read@user:al@ice", ParseGrantError::Id),
        ("box:in:box#read@user:alice", ParseGrantError::Id),
    ];
    for (s, e) in cases {
        assert_eq!(s.parse::<Grant>(), Err(e), "{s}");
    }
}

#[test]
fn ids_are_checked() {
    assert!(valid_id("a") && valid_id("A-b_c.9") && valid_id(&"x".repeat(MAX_ID_LEN)));
    for bad in [
        "",
        "a:b",
        "a#b",
        "a@b",
        "a b",
        "é",
        &"x".repeat(MAX_ID_LEN + 1),
    ] {
        assert!(!valid_id(bad), "{bad}");
    }
}

/// The rights table of `docs/shared-data.md`: the rows between the marker comments.
fn doc_table() -> Vec<Vec<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/shared-data.md");
    let text = std::fs::read_to_string(path).expect("docs/shared-data.md");
    let start = text.find("<!-- rights-table -->").expect("start marker");
    let end = text.find("<!-- /rights-table -->").expect("end marker");
    text[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .filter(|l| !l.contains("---"))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn the_documented_rights_table_is_the_tested_one() {
    let rows = doc_table();
    let header: Vec<&str> = rows[0].iter().map(String::as_str).collect();
    let mut want_header = vec!["right held"];
    want_header.extend(Op::ALL.iter().map(|o| o.name()));
    assert_eq!(header, want_header);
    assert_eq!(rows.len() - 1, TABLE.len(), "one row per table entry");
    for (row, (label, _, cells)) in rows[1..].iter().zip(TABLE) {
        assert_eq!(row[0], *label);
        let got: Vec<bool> = row[1..]
            .iter()
            .map(|c| match c.as_str() {
                "yes" => true,
                "no" => false,
                other => panic!("cell {other:?} in row {label}"),
            })
            .collect();
        assert_eq!(got, cells.to_vec(), "row {label}");
    }
}
