//! The rights check: which account may do which operation on which box or document.
//! The controller enforces it on every request; the cloud enforces the same function
//! through the pairs ([`crate::Replica::may`]). The table is in "Rights" in
//! `docs/shared-data.md` (a test parses it and compares it with this function).
//!
//! Rules:
//! * `Owner` ⊇ `Write` ⊇ `Read`; an account holds the highest role any of its grants
//!   gives it on the target.
//! * A right on a box applies to the box and to every document in it; a right on a
//!   document applies to that document only.
//! * Operations on the box itself (list it, put a document in it, delete it, grant or
//!   revoke rights on it) look at rights on the box only.
//! * Granting or revoking a right on an object needs `Owner` on that object (for a
//!   document: on the document or its box).
//! * The administrator ([`crate::ADMIN`]) may do everything.

use serde::{Deserialize, Serialize};

use crate::model::{Grant, Object, Role, ADMIN};

/// An operation of the document service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Variant 0: list a box's documents (target: the box).
    ListBox,
    /// Variant 1: put (store) a new document in a box (target: the box).
    PutDoc,
    /// Variant 2: delete a box and all its documents (target: the box).
    DeleteBox,
    /// Variant 3: grant or revoke a right on a box (target: the box).
    GrantOnBox,
    /// Variant 4: get a document's bytes and metadata (target: the document).
    GetDoc,
    /// Variant 5: delete a document (target: the document).
    DeleteDoc,
    /// Variant 6: grant or revoke a right on a document (target: the document).
    GrantOnDoc,
}

impl Op {
    /// Every operation, in the order of the columns of the rights table.
    pub const ALL: [Op; 7] = [
        Op::ListBox,
        Op::PutDoc,
        Op::DeleteBox,
        Op::GrantOnBox,
        Op::GetDoc,
        Op::DeleteDoc,
        Op::GrantOnDoc,
    ];

    /// The operation's name in the rights table.
    pub fn name(self) -> &'static str {
        match self {
            Op::ListBox => "list box",
            Op::PutDoc => "put doc",
            Op::DeleteBox => "delete box",
            Op::GrantOnBox => "grant on box",
            Op::GetDoc => "get doc",
            Op::DeleteDoc => "delete doc",
            Op::GrantOnDoc => "grant on doc",
        }
    }

    /// The role the operation needs.
    pub fn needs(self) -> Role {
        match self {
            Op::ListBox | Op::GetDoc => Role::Read,
            Op::PutDoc | Op::DeleteDoc => Role::Write,
            Op::DeleteBox | Op::GrantOnBox | Op::GrantOnDoc => Role::Owner,
        }
    }

    /// Whether the operation's target is a document (otherwise a box).
    pub fn on_document(self) -> bool {
        matches!(self, Op::GetDoc | Op::DeleteDoc | Op::GrantOnDoc)
    }
}

/// What an operation is applied to. A document is named with its box, since a right on
/// the box applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target<'a> {
    Box(&'a str),
    Doc { box_id: &'a str, doc_id: &'a str },
}

/// Why an operation is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denied {
    /// Variant 0: the account does not hold `needed` on the target.
    Insufficient { needed: Role },
    /// Variant 1: the operation is not one on this kind of target (a document operation
    /// on a box, or the other way round).
    WrongTarget,
    /// Variant 2: (cloud) the cloud user is paired with no device account.
    NotPaired,
    /// Variant 3: (cloud) no such document in the share, or not the shared box.
    NoSuchObject,
}

/// Whether `account` may do `op` on `target` given the rights `grants` (all grants of the
/// device, or of a share: only those on the target and its box matter).
pub fn check(grants: &[Grant], account: &str, op: Op, target: Target<'_>) -> Result<(), Denied> {
    let (box_id, doc_id) = match (target, op.on_document()) {
        (Target::Box(b), false) => (b, None),
        (Target::Doc { box_id, doc_id }, true) => (box_id, Some(doc_id)),
        _ => return Err(Denied::WrongTarget),
    };
    if account == ADMIN {
        return Ok(());
    }
    let needed = op.needs();
    let held = grants
        .iter()
        .filter(|g| g.account == account)
        .filter(|g| match &g.object {
            Object::Box(b) => b == box_id,
            Object::Doc(d) => doc_id == Some(d.as_str()),
        })
        .map(|g| g.role)
        .max_by_key(|r| r.rank());
    match held {
        Some(role) if role.includes(needed) => Ok(()),
        _ => Err(Denied::Insufficient { needed }),
    }
}
