//! The sync protocol device → cloud: messages, limits and error codes ("Sync protocol" in
//! `docs/shared-data.md`). The device's [`crate::Outbox`] sends [`SyncRequest`]s; the
//! cloud's [`crate::Replica`] answers each with one [`SyncReply`]. Carried as postcard
//! frames over the relay's tunnel (the transport is not this crate's).
//!
//! postcard writes an enum as its variant index then its fields in order: **never reorder
//! variants or fields**; add new ones at the end.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::model::{valid_id, valid_name, DocBox, Document, Grant};
use crate::pairing::Pair;

/// Largest encoded [`SyncRequest`] or [`SyncReply`] (postcard), in bytes: fits a tunnel
/// frame (128 KiB) with room for an envelope.
pub const MAX_SYNC_MESSAGE: usize = 120 * 1024;
/// Largest `DocumentData.bytes`.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
/// Most documents in one share.
pub const MAX_DOCUMENTS_PER_SHARE: usize = 128;
/// Most grants in one share (on the box and its documents).
pub const MAX_GRANTS_PER_SHARE: usize = 256;
/// Most pairs sent with one share.
pub const MAX_PAIRS_PER_SHARE: usize = 128;
/// Most changes in one delta.
pub const MAX_CHANGES_PER_DELTA: usize = 64;
/// Largest shared document, in bytes (16 MiB).
pub const MAX_DOCUMENT_LEN: u64 = 16 << 20;
/// Longest error message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 256;

/// Error codes carried by [`SyncReply::Error`].
pub mod error_code {
    /// The message is not valid (bad id, name, limit inside a field, wrong share box).
    pub const MALFORMED: u16 = 400;
    /// The cloud has no state for this share: send a snapshot.
    pub const UNKNOWN_SHARE: u16 = 404;
    /// A snapshot older than the cloud's revision: the device's counter went back. The
    /// reply's `revision` is the cloud's; the device continues above it with a snapshot.
    pub const STALE_REVISION: u16 = 409;
    /// A delta that is not the next revision: revisions are missing. Send a snapshot.
    pub const REVISION_GAP: u16 = 412;
    /// Over a limit (message size, documents, grants, pairs, changes, document length).
    pub const TOO_LARGE: u16 = 413;
    /// A change does not apply (data for an unknown document, at the wrong offset, past
    /// its length, or whose CRC does not match). Nothing of the delta was applied; send
    /// a snapshot.
    pub const INVALID_CHANGE: u16 = 422;
}

/// Everything a share holds, as sent in a snapshot and kept by the replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareState {
    /// The shared box.
    pub doc_box: DocBox,
    /// The device's pairs (account ↔ cloud user).
    pub pairs: Vec<Pair>,
    /// The documents of the box (metadata).
    pub documents: Vec<Document>,
    /// The rights on the box and on its documents.
    pub grants: Vec<Grant>,
}

/// One change of a share, inside a [`SyncRequest::Delta`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Variant 0: a document was stored in the box; its bytes follow as `DocumentData`.
    DocumentAdded { meta: Document },
    /// Variant 1: a document was deleted (its data and the rights on it go too).
    DocumentRemoved { id: String },
    /// Variant 2: a right was granted.
    Granted { grant: Grant },
    /// Variant 3: a right was revoked.
    Revoked { grant: Grant },
    /// Variant 4: the administrator unpaired this account.
    Unpaired { account: String },
    /// Variant 5: this account was removed from the device (its pair and rights go).
    AccountRemoved { account: String },
    /// Variant 6: the next bytes of a document: `offset` is the number of bytes the cloud
    /// has received for it (chunks are in order, at most [`MAX_DATA_CHUNK`] bytes).
    DocumentData {
        doc_id: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Variant 7: an account was paired (automatically or by the administrator).
    Paired { pair: Pair },
}

impl Change {
    /// Whether the change takes access away (revoked, unpaired, account or document
    /// removed): such changes go first ("revocations first").
    pub fn is_restrictive(&self) -> bool {
        matches!(
            self,
            Change::Revoked { .. }
                | Change::Unpaired { .. }
                | Change::AccountRemoved { .. }
                | Change::DocumentRemoved { .. }
        )
    }

    /// Whether every id, name and length in the change is valid.
    pub fn is_valid(&self) -> bool {
        match self {
            Change::DocumentAdded { meta } => valid_document(meta),
            Change::DocumentRemoved { id } => valid_id(id),
            Change::Granted { grant } | Change::Revoked { grant } => grant.is_valid(),
            Change::Unpaired { account } | Change::AccountRemoved { account } => valid_id(account),
            Change::DocumentData { doc_id, bytes, .. } => {
                valid_id(doc_id) && bytes.len() <= MAX_DATA_CHUNK
            }
            Change::Paired { pair } => valid_id(&pair.account) && valid_id(&pair.cloud_user),
        }
    }
}

/// Whether a document's ids, name and length are valid.
pub fn valid_document(d: &Document) -> bool {
    valid_id(&d.id)
        && valid_id(&d.box_id)
        && valid_id(&d.created_by)
        && valid_name(&d.name)
        && d.len <= MAX_DOCUMENT_LEN
}

impl ShareState {
    /// Checks the state against the limits and the identifier rules; every document
    /// must be in `doc_box`.
    pub fn validate(&self) -> Result<(), SyncError> {
        if self.documents.len() > MAX_DOCUMENTS_PER_SHARE
            || self.grants.len() > MAX_GRANTS_PER_SHARE
            || self.pairs.len() > MAX_PAIRS_PER_SHARE
        {
            return Err(SyncError::TooLarge);
        }
        let ok = valid_id(&self.doc_box.id)
            && valid_name(&self.doc_box.name)
            && self
                .documents
                .iter()
                .all(|d| valid_document(d) && d.box_id == self.doc_box.id)
            && self.grants.iter().all(Grant::is_valid)
            && self
                .pairs
                .iter()
                .all(|p| valid_id(&p.account) && valid_id(&p.cloud_user));
        if ok {
            Ok(())
        } else {
            Err(SyncError::Malformed)
        }
    }
}

/// Device → cloud.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncRequest {
    /// Variant 0: the whole share at `revision` (first sync and full reconciliation):
    /// the cloud replaces its state with it.
    Snapshot {
        share_id: String,
        revision: u64,
        state: ShareState,
    },
    /// Variant 1: the changes from `revision - 1` to `revision`, applied all or nothing,
    /// in order (restrictive changes first).
    Delta {
        share_id: String,
        revision: u64,
        changes: Vec<Change>,
    },
}

impl SyncRequest {
    /// The share the message is for.
    pub fn share_id(&self) -> &str {
        match self {
            SyncRequest::Snapshot { share_id, .. } | SyncRequest::Delta { share_id, .. } => {
                share_id
            }
        }
    }

    /// The revision the message brings the share to.
    pub fn revision(&self) -> u64 {
        match self {
            SyncRequest::Snapshot { revision, .. } | SyncRequest::Delta { revision, .. } => {
                *revision
            }
        }
    }
}

/// Cloud → device: one per [`SyncRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncReply {
    /// Variant 0: the cloud has applied every revision up to `revision` (sent again for a
    /// duplicate). After a snapshot, `need_data` lists the documents whose bytes the cloud
    /// lacks (the device sends them from offset 0); empty otherwise.
    Ack {
        share_id: String,
        revision: u64,
        need_data: Vec<String>,
    },
    /// Variant 1: the message was refused ([`error_code`]); `revision` is the cloud's
    /// current revision of the share (0: none). Nothing of it was applied.
    Error {
        share_id: String,
        code: u16,
        message: String,
        revision: u64,
    },
}

/// A local refusal (outbox or replica) before anything is sent or applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncError {
    /// Over a limit ([`error_code::TOO_LARGE`]).
    TooLarge,
    /// An invalid id, name or field ([`error_code::MALFORMED`]).
    Malformed,
}

impl SyncError {
    /// The protocol error code for this refusal.
    pub fn code(self) -> u16 {
        match self {
            SyncError::TooLarge => error_code::TOO_LARGE,
            SyncError::Malformed => error_code::MALFORMED,
        }
    }
}

/// The encoded size of `msg` (postcard), or `None` when it cannot be encoded.
pub fn encoded_len<T: Serialize>(msg: &T) -> Option<usize> {
    postcard::experimental::serialized_size(msg).ok()
}
