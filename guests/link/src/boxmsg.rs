//! The document service's messages on the job port: [`BoxOp`] (inside
//! `HostRequest::Box { account, op }`) and [`BoxReply`] (inside `HostReply::Box`), with
//! their limits and error codes. Documented in `docs/link-protocol.md` ("Document boxes")
//! and `docs/shared-data.md` ("`duplex box` commands and link messages").
//!
//! The entry types mirror `duplex-docs`' model field for field and variant for variant
//! ([`AccountEntry`] = `Account`, [`BoxEntry`] = `DocBox`, [`DocEntry`] = `Document`,
//! [`GrantEntry`] = `Grant`, [`BoxRole`] = `Role`, [`BoxObject`] = `Object`), so their
//! postcard encodings are the same; `duplex-link` does not depend on `duplex-docs`.
//!
//! postcard writes a variant as its index: **never reorder variants or fields**; add new
//! ones at the end.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// Most document bytes in one `PutData` or one `Data` reply (32 KiB): a document goes in
/// chunks, each frame far below [`crate::MAX_FRAME`].
pub const MAX_BOX_CHUNK: usize = 32 * 1024;
/// Longest document (16 MiB), as `duplex_docs::MAX_DOCUMENT_LEN`.
pub const MAX_BOX_DOCUMENT: u64 = 16 << 20;
/// Most pages in one `Scan`.
pub const MAX_SCAN_PAGES: u32 = 64;

/// The `code` of `HostReply::Error` for document requests (HTTP-like numbers).
pub mod box_error {
    /// Malformed request (a `PutData` at the wrong offset, a CRC that does not match).
    pub const BAD_REQUEST: u16 = 400;
    /// The account may not do this: the message names the right needed
    /// (`needs write on box:inbox`, `needs admin`, `unknown account bob`).
    pub const DENIED: u16 = 403;
    /// No such account, box, document, grant or upload.
    pub const NOT_FOUND: u16 = 404;
    /// The account or box exists already.
    pub const EXISTS: u16 = 409;
    /// The document is longer than [`super::MAX_BOX_DOCUMENT`] (or a chunk than
    /// [`super::MAX_BOX_CHUNK`]).
    pub const TOO_LARGE: u16 = 413;
    /// An invalid identifier, name or parameter.
    pub const INVALID: u16 = 422;
    /// Too many uploads or scans at once.
    pub const BUSY: u16 = 429;
    /// The disk failed, or holds something the service cannot read.
    pub const STORAGE: u16 = 500;
    /// No disk (documents are disabled), or the engine is needed (`Scan`) and unavailable.
    pub const UNAVAILABLE: u16 = 503;
    /// The disk is full.
    pub const FULL: u16 = 507;
}

/// A role on a box or document; `Owner` ⊇ `Write` ⊇ `Read` (`duplex_docs::Role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxRole {
    /// Variant 0.
    Owner,
    /// Variant 1.
    Write,
    /// Variant 2.
    Read,
}

/// What a right is on (`duplex_docs::Object`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxObject {
    /// Variant 0: a box (the right applies to its documents too).
    Box(String),
    /// Variant 1: one document.
    Doc(String),
}

/// A device account (`duplex_docs::Account`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountEntry {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub email_verified: bool,
}

/// A box (`duplex_docs::DocBox`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxEntry {
    pub id: String,
    pub name: String,
}

/// A document's metadata (`duplex_docs::Document`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocEntry {
    pub id: String,
    pub box_id: String,
    pub name: String,
    pub len: u64,
    /// CRC-32/ISO-HDLC of the bytes.
    pub crc32: u32,
    pub created_by: String,
}

/// A right (`duplex_docs::Grant`, the tuple `box:ID#role@user:ID`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantEntry {
    pub object: BoxObject,
    pub role: BoxRole,
    pub account: String,
}

/// A document service operation, made as the request's account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxOp {
    /// 0: create an account (admin only). Reply `Done`.
    AddAccount {
        id: String,
        name: String,
        email: Option<String>,
        email_verified: bool,
    },
    /// 1: every account (admin only). Reply `Accounts`.
    ListAccounts,
    /// 2: remove an account and its grants (admin only; not `admin`). Reply `Done`.
    RemoveAccount { id: String },
    /// 3: create a box; the account gets `owner` on it. Reply `Done`.
    CreateBox { box_id: String, name: String },
    /// 4: delete a box with its documents and grants (`owner` on the box). Reply `Done`.
    RemoveBox { box_id: String },
    /// 5: the boxes the account may list. Reply `Boxes`.
    ListBoxes,
    /// 6: start an upload of `len` bytes into a box (`write` on the box). Reply
    /// `PutStarted`.
    PutBegin {
        box_id: String,
        name: String,
        len: u64,
    },
    /// 7: the upload's bytes at `offset` (= the bytes received so far), at most
    /// [`MAX_BOX_CHUNK`]. Reply `PutProgress`.
    PutData {
        put_id: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// 8: all bytes sent; `crc32` is theirs. The document is stored — metadata and bytes
    /// in one transaction — and the reply `Stored` comes once it is durable.
    PutEnd { put_id: u64, crc32: u32 },
    /// 9: drop an upload. Reply `Done`.
    PutAbort { put_id: u64 },
    /// 10: up to `len` (≤ [`MAX_BOX_CHUNK`]) bytes of a document from `offset` (`read`).
    /// Reply `Data`.
    Get {
        doc_id: String,
        offset: u64,
        len: u32,
    },
    /// 11: a box's documents, oldest first (`read` on the box). Reply `Docs`.
    ListBox { box_id: String },
    /// 12: delete a document (`write` on it or its box). Reply `Done`.
    DeleteDoc { doc_id: String },
    /// 13: grant `role` on `object` to `account` (`owner` on the object). Reply `Done`.
    Grant {
        object: BoxObject,
        role: BoxRole,
        account: String,
    },
    /// 14: revoke that grant (`owner` on the object). Reply `Done`, or 404.
    Revoke {
        object: BoxObject,
        role: BoxRole,
        account: String,
    },
    /// 15: the grants on an object (`read` on it). Reply `Grants`.
    ListGrants { object: BoxObject },
    /// 16: scan `pages` pages into a new document of the box (`write` on the box): the
    /// engine renders and halftones each page (`page_raster(seed, page, width, height)`),
    /// the document is the pages as one multi-image PBM (`P4`). Reply `Stored` once it is
    /// durable.
    Scan {
        box_id: String,
        name: String,
        pages: u32,
        seed: u64,
        width: u16,
        height: u16,
    },
    /// 17: share the box with the cloud (admin or an `owner` of the box): the share
    /// (named as the box) starts with a snapshot, then every change to the box is sent.
    /// Sharing a box shared already changes nothing. Reply `Done`.
    Share { box_id: String },
    /// 18: pair `account` with cloud user `cloud_user` by hand (admin only; releases a
    /// hold). Reply `Done`.
    Pair { account: String, cloud_user: String },
    /// 19: unpair `account` (admin only); automatic pairing then leaves it alone. Reply
    /// `Done`.
    Unpair { account: String },
    /// 20: the conflicts of the last automatic pairing (admin only). Reply `Conflicts`.
    ListConflicts,
    /// 21: the shares and their sync state (admin only). Reply `Shares`.
    ListShares,
}

/// An account or cloud user automatic pairing left alone (`duplex_docs::Conflict`, as
/// text for the CLI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictEntry {
    /// `account` or `cloud_user`.
    pub kind: String,
    /// The account's or cloud user's id.
    pub id: String,
    /// The reason in snake case (`no_match`, `several_on_device`, ...).
    pub reason: String,
    /// The normalised email in question.
    pub email: Option<String>,
}

/// A share and its sync state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareEntry {
    /// The share id (the box's id).
    pub share_id: String,
    /// The last revision sent (0: none yet).
    pub revision: u64,
    /// The last revision the cloud acknowledged (since the controller started; 0: none).
    pub acked: u64,
    /// Changes queued, not sent yet.
    pub queued: u32,
    /// Messages sent and not acknowledged.
    pub in_flight: u32,
    /// Whether a snapshot is due.
    pub snapshot_needed: bool,
}

/// The answer to a [`BoxOp`] (errors are `HostReply::Error` with a [`box_error`] code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxReply {
    /// 0: done (and durable, for a change).
    Done,
    /// 1.
    Accounts(Vec<AccountEntry>),
    /// 2.
    Boxes(Vec<BoxEntry>),
    /// 3.
    Docs(Vec<DocEntry>),
    /// 4.
    Grants(Vec<GrantEntry>),
    /// 5: the upload's id, for `PutData` and `PutEnd`.
    PutStarted { put_id: u64 },
    /// 6: bytes received so far.
    PutProgress { put_id: u64, received: u64 },
    /// 7: the document is stored and durable.
    Stored(DocEntry),
    /// 8: bytes of a document from `offset` (fewer than asked at its end).
    Data {
        doc: DocEntry,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// 9: the answer to `ListConflicts`.
    Conflicts(Vec<ConflictEntry>),
    /// 10: the answer to `ListShares`.
    Shares(Vec<ShareEntry>),
}

/// The PBM (`P4`) header of one scanned page: `P4\n<width> <height>\n`; the page's
/// halftone (1 = black, rows MSB first, padded to whole bytes) follows.
pub fn pbm_header(width: u16, height: u16) -> Vec<u8> {
    alloc::format!("P4\n{width} {height}\n").into_bytes()
}
