//! The link's document messages (`duplex_link::msg::BoxOp`, `BoxReply`) answered by the
//! service: [`DocService::serve`], and the conversions between the link's entry types and
//! `duplex-docs`' model (the same fields, so the same postcard bytes).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use duplex_docs::{
    Account, Conflict, ConflictReason, DocBox, Document, Grant, Object, Role, Subject,
};
use duplex_link::msg::{
    box_error, AccountEntry, BoxEntry, BoxObject, BoxOp, BoxReply, BoxRole, ConflictEntry,
    DocEntry, GrantEntry, HostReply, ShareEntry,
};
use duplex_store::BlockDevice;

use crate::{DocError, DocService};

/// The link's role.
pub fn role_entry(r: Role) -> BoxRole {
    match r {
        Role::Owner => BoxRole::Owner,
        Role::Write => BoxRole::Write,
        Role::Read => BoxRole::Read,
    }
}

/// The model's role.
pub fn role(r: BoxRole) -> Role {
    match r {
        BoxRole::Owner => Role::Owner,
        BoxRole::Write => Role::Write,
        BoxRole::Read => Role::Read,
    }
}

/// The model's object.
pub fn object(o: BoxObject) -> Object {
    match o {
        BoxObject::Box(id) => Object::Box(id),
        BoxObject::Doc(id) => Object::Doc(id),
    }
}

/// The link's object.
pub fn object_entry(o: Object) -> BoxObject {
    match o {
        Object::Box(id) => BoxObject::Box(id),
        Object::Doc(id) => BoxObject::Doc(id),
    }
}

/// The link's document entry.
pub fn doc_entry(d: Document) -> DocEntry {
    DocEntry {
        id: d.id,
        box_id: d.box_id,
        name: d.name,
        len: d.len,
        crc32: d.crc32,
        created_by: d.created_by,
    }
}

fn account_entry(a: Account) -> AccountEntry {
    AccountEntry {
        id: a.id,
        name: a.name,
        email: a.email,
        email_verified: a.email_verified,
    }
}

fn box_entry(b: DocBox) -> BoxEntry {
    BoxEntry {
        id: b.id,
        name: b.name,
    }
}

fn grant_entry(g: Grant) -> GrantEntry {
    GrantEntry {
        object: object_entry(g.object),
        role: role_entry(g.role),
        account: g.account,
    }
}

fn grant(object_: BoxObject, role_: BoxRole, account: String) -> Grant {
    Grant {
        object: object(object_),
        role: role(role_),
        account,
    }
}

/// A conflict reason's name (snake case, as its serde name).
pub fn reason_name(r: ConflictReason) -> &'static str {
    match r {
        ConflictReason::NoMatch => "no_match",
        ConflictReason::SeveralOnDevice => "several_on_device",
        ConflictReason::SeveralOnCloud => "several_on_cloud",
        ConflictReason::Unverified => "unverified",
        ConflictReason::NoEmail => "no_email",
        ConflictReason::InvalidEmail => "invalid_email",
        ConflictReason::SeveralEmails => "several_emails",
        ConflictReason::MatchUnavailable => "match_unavailable",
        ConflictReason::HeldByAdmin => "held_by_admin",
        ConflictReason::InvalidId => "invalid_id",
    }
}

/// The link's conflict entry.
pub fn conflict_entry(c: Conflict) -> ConflictEntry {
    let (kind, id) = match c.subject {
        Subject::Account(id) => ("account", id),
        Subject::CloudUser(id) => ("cloud_user", id),
    };
    ConflictEntry {
        kind: kind.into(),
        id,
        reason: reason_name(c.reason).into(),
        email: c.email,
    }
}

/// The `HostReply::Error` of a failed operation.
pub fn error_reply(e: &DocError) -> HostReply {
    HostReply::Error {
        code: e.code(),
        message: e.to_string(),
    }
}

/// The reply when the controller has no disk.
pub fn disabled_reply() -> HostReply {
    HostReply::Error {
        code: box_error::UNAVAILABLE,
        message: "no disk: documents are disabled".into(),
    }
}

impl<D: BlockDevice> DocService<D> {
    /// Answers one operation made as `account`. `Scan` needs the engine: the controller
    /// checks it with [`DocService::check_put`], runs it, and stores the pages with
    /// [`DocService::put_document`]; here it is a bad request.
    pub fn serve(&mut self, account: &str, op: BoxOp) -> HostReply {
        match self.answer(account, op) {
            Ok(reply) => HostReply::Box(reply),
            Err(e) => error_reply(&e),
        }
    }

    /// [`DocService::serve`] before the conversion to a `HostReply`.
    pub fn answer(&mut self, who: &str, op: BoxOp) -> Result<BoxReply, DocError> {
        Ok(match op {
            BoxOp::AddAccount {
                id,
                name,
                email,
                email_verified,
            } => {
                let a = Account {
                    id,
                    name,
                    email,
                    email_verified,
                };
                self.add_account(who, a)?;
                BoxReply::Done
            }
            BoxOp::ListAccounts => {
                BoxReply::Accounts(self.accounts(who)?.into_iter().map(account_entry).collect())
            }
            BoxOp::RemoveAccount { id } => {
                self.remove_account(who, &id)?;
                BoxReply::Done
            }
            BoxOp::CreateBox { box_id, name } => {
                self.create_box(who, &box_id, &name)?;
                BoxReply::Done
            }
            BoxOp::RemoveBox { box_id } => {
                self.remove_box(who, &box_id)?;
                BoxReply::Done
            }
            BoxOp::ListBoxes => {
                BoxReply::Boxes(self.boxes(who)?.into_iter().map(box_entry).collect())
            }
            BoxOp::PutBegin { box_id, name, len } => BoxReply::PutStarted {
                put_id: self.put_begin(who, &box_id, &name, len)?,
            },
            BoxOp::PutData {
                put_id,
                offset,
                bytes,
            } => BoxReply::PutProgress {
                put_id,
                received: self.put_data(who, put_id, offset, &bytes)?,
            },
            BoxOp::PutEnd { put_id, crc32 } => {
                BoxReply::Stored(doc_entry(self.put_end(who, put_id, crc32)?))
            }
            BoxOp::PutAbort { put_id } => {
                self.put_abort(who, put_id)?;
                BoxReply::Done
            }
            BoxOp::Get {
                doc_id,
                offset,
                len,
            } => {
                let (doc, bytes) = self.get(who, &doc_id, offset, len)?;
                BoxReply::Data {
                    doc: doc_entry(doc),
                    offset,
                    bytes,
                }
            }
            BoxOp::ListBox { box_id } => BoxReply::Docs(
                self.list_box(who, &box_id)?
                    .into_iter()
                    .map(doc_entry)
                    .collect(),
            ),
            BoxOp::DeleteDoc { doc_id } => {
                self.delete_document(who, &doc_id)?;
                BoxReply::Done
            }
            BoxOp::Grant {
                object,
                role,
                account,
            } => {
                self.grant(who, grant(object, role, account))?;
                BoxReply::Done
            }
            BoxOp::Revoke {
                object,
                role,
                account,
            } => {
                self.revoke(who, &grant(object, role, account))?;
                BoxReply::Done
            }
            BoxOp::ListGrants { object: o } => {
                let grants: Vec<GrantEntry> = self
                    .grants(who, &object(o))?
                    .into_iter()
                    .map(grant_entry)
                    .collect();
                BoxReply::Grants(grants)
            }
            BoxOp::Share { box_id } => {
                self.share_box(who, &box_id)?;
                BoxReply::Done
            }
            BoxOp::Pair {
                account,
                cloud_user,
            } => {
                self.admin_pair(who, &account, &cloud_user)?;
                BoxReply::Done
            }
            BoxOp::Unpair { account } => {
                self.admin_unpair(who, &account)?;
                BoxReply::Done
            }
            BoxOp::ListConflicts => BoxReply::Conflicts(
                self.conflicts(who)?
                    .into_iter()
                    .map(conflict_entry)
                    .collect(),
            ),
            BoxOp::ListShares => BoxReply::Shares(
                self.shares(who)?
                    .into_iter()
                    .map(|s| ShareEntry {
                        share_id: s.share_id,
                        revision: s.revision,
                        acked: s.acked,
                        queued: u32::try_from(s.queued).unwrap_or(u32::MAX),
                        in_flight: u32::try_from(s.in_flight).unwrap_or(u32::MAX),
                        snapshot_needed: s.snapshot_needed,
                    })
                    .collect(),
            ),
            BoxOp::Scan { .. } => {
                return Err(DocError::BadRequest(
                    "a scan is run by the controller, not the store".into(),
                ))
            }
        })
    }
}
