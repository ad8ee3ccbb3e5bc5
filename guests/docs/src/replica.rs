//! The cloud side of the sync protocol: one [`Replica`] per share ("Cloud replica" and
//! "What the cloud enforces" in `docs/shared-data.md`).
//!
//! * A snapshot newer than the replica's revision replaces its state (document bytes it
//!   already holds complete, with the same length and CRC, are kept); the same revision
//!   again is acked again; an older one is refused (`STALE_REVISION`).
//! * A delta is applied iff it is the next revision, all or nothing; a revision the
//!   replica has is acked again and not applied twice; a later one is refused
//!   (`REVISION_GAP`: the device sends a snapshot).
//! * [`Replica::may`] is what the cloud enforces: the cloud user's paired device account,
//!   through the same [`crate::check`] as the device, on the share's rights.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::model::{document_crc32, Document, Object};
use crate::rights::{check, Denied, Op, Target};
use crate::sync::{
    encoded_len, error_code, Change, ShareState, SyncReply, SyncRequest, MAX_CHANGES_PER_DELTA,
    MAX_DOCUMENTS_PER_SHARE, MAX_GRANTS_PER_SHARE, MAX_PAIRS_PER_SHARE, MAX_SYNC_MESSAGE,
};

/// The cloud's copy of one share.
#[derive(Clone, Debug, Default)]
pub struct Replica {
    share_id: String,
    revision: u64,
    state: Option<ShareState>,
    /// Bytes received per document, in order (complete when as long as the document).
    data: BTreeMap<String, Vec<u8>>,
}

/// Why a change did not apply: (code, message).
type Refusal = (u16, &'static str);

impl Replica {
    /// An empty replica of `share_id` (revision 0: it needs a snapshot).
    pub fn new(share_id: &str) -> Self {
        Replica {
            share_id: share_id.to_string(),
            ..Replica::default()
        }
    }

    pub fn share_id(&self) -> &str {
        &self.share_id
    }

    /// The last revision applied (0: none).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The share's state, once a snapshot was applied.
    pub fn state(&self) -> Option<&ShareState> {
        self.state.as_ref()
    }

    /// A document's metadata.
    pub fn document(&self, id: &str) -> Option<&Document> {
        self.state.as_ref()?.documents.iter().find(|d| d.id == id)
    }

    /// A document's bytes, once all received and their CRC checked.
    pub fn data(&self, id: &str) -> Option<&[u8]> {
        let d = self.document(id)?;
        let bytes = self.data.get(id)?;
        (bytes.len() as u64 == d.len).then_some(bytes.as_slice())
    }

    fn error(&self, code: u16, message: &str) -> SyncReply {
        SyncReply::Error {
            share_id: self.share_id.clone(),
            code,
            message: message.to_string(),
            revision: self.revision,
        }
    }

    fn ack(&self, revision: u64, need_data: Vec<String>) -> SyncReply {
        SyncReply::Ack {
            share_id: self.share_id.clone(),
            revision,
            need_data,
        }
    }

    /// Documents of the state whose bytes are not all here.
    fn missing_data(&self) -> Vec<String> {
        let Some(s) = &self.state else {
            return Vec::new();
        };
        s.documents
            .iter()
            .filter(|d| self.data.get(&d.id).map(|b| b.len() as u64) != Some(d.len))
            .map(|d| d.id.clone())
            .collect()
    }

    /// Handles one message and returns the reply.
    pub fn handle(&mut self, req: &SyncRequest) -> SyncReply {
        if req.share_id() != self.share_id {
            return self.error(error_code::MALFORMED, "message for another share");
        }
        if encoded_len(req).is_none_or(|n| n > MAX_SYNC_MESSAGE) {
            return self.error(error_code::TOO_LARGE, "message too large");
        }
        match req {
            SyncRequest::Snapshot {
                revision, state, ..
            } => self.snapshot(*revision, state),
            SyncRequest::Delta {
                revision, changes, ..
            } => self.delta(*revision, changes),
        }
    }

    fn snapshot(&mut self, revision: u64, state: &ShareState) -> SyncReply {
        if self.state.is_some() && revision == self.revision {
            return self.ack(revision, self.missing_data());
        }
        if revision <= self.revision {
            return self.error(
                error_code::STALE_REVISION,
                "snapshot older than the replica",
            );
        }
        if let Err(e) = state.validate() {
            return self.error(e.code(), "invalid snapshot");
        }
        // Keep the bytes of documents that are complete and unchanged; drop the rest.
        let old = self.state.take();
        let mut data = core::mem::take(&mut self.data);
        data.retain(|id, bytes| {
            let before = old
                .as_ref()
                .and_then(|s| s.documents.iter().find(|d| &d.id == id));
            let now = state.documents.iter().find(|d| &d.id == id);
            match (before, now) {
                (Some(b), Some(n)) => {
                    b.len == n.len && b.crc32 == n.crc32 && bytes.len() as u64 == n.len
                }
                _ => false,
            }
        });
        for d in &state.documents {
            if d.len == 0 && d.crc32 == document_crc32(&[]) {
                data.entry(d.id.clone()).or_default();
            }
        }
        self.data = data;
        self.state = Some(state.clone());
        self.revision = revision;
        self.ack(revision, self.missing_data())
    }

    fn delta(&mut self, revision: u64, changes: &[Change]) -> SyncReply {
        let Some(state) = &self.state else {
            return self.error(error_code::UNKNOWN_SHARE, "no snapshot yet");
        };
        if revision <= self.revision {
            return self.ack(revision, Vec::new());
        }
        if self.revision.checked_add(1) != Some(revision) {
            return self.error(
                error_code::REVISION_GAP,
                "revisions missing: send a snapshot",
            );
        }
        if changes.len() > MAX_CHANGES_PER_DELTA {
            return self.error(error_code::TOO_LARGE, "too many changes");
        }
        if !changes.iter().all(Change::is_valid) {
            return self.error(error_code::MALFORMED, "invalid change");
        }
        let mut state = state.clone();
        let mut data = self.data.clone();
        for c in changes {
            if let Err((code, message)) = apply(&mut state, &mut data, c) {
                return self.error(code, message);
            }
        }
        self.state = Some(state);
        self.data = data;
        self.revision = revision;
        self.ack(revision, Vec::new())
    }

    /// Whether `cloud_user` may do `op` on the shared box (`doc` `None`) or on its
    /// document `doc`: the paired device account's rights, by [`check`].
    pub fn may(&self, cloud_user: &str, op: Op, doc: Option<&str>) -> Result<(), Denied> {
        let state = self.state.as_ref().ok_or(Denied::NoSuchObject)?;
        let account = state
            .pairs
            .iter()
            .find(|p| p.cloud_user == cloud_user)
            .map(|p| p.account.as_str())
            .ok_or(Denied::NotPaired)?;
        let box_id = state.doc_box.id.as_str();
        let target = match doc {
            None => Target::Box(box_id),
            Some(id) if state.documents.iter().any(|d| d.id == id) => {
                Target::Doc { box_id, doc_id: id }
            }
            Some(_) => return Err(Denied::NoSuchObject),
        };
        check(&state.grants, account, op, target)
    }

    /// The documents `cloud_user` may get.
    pub fn visible_documents(&self, cloud_user: &str) -> Vec<&Document> {
        let Some(state) = &self.state else {
            return Vec::new();
        };
        state
            .documents
            .iter()
            .filter(|d| self.may(cloud_user, Op::GetDoc, Some(&d.id)).is_ok())
            .collect()
    }
}

/// Applies one change to a copy of the state.
fn apply(
    s: &mut ShareState,
    data: &mut BTreeMap<String, Vec<u8>>,
    c: &Change,
) -> Result<(), Refusal> {
    const INVALID: u16 = error_code::INVALID_CHANGE;
    match c {
        Change::DocumentAdded { meta } => {
            if meta.box_id != s.doc_box.id {
                return Err((INVALID, "document of another box"));
            }
            s.documents.retain(|d| d.id != meta.id);
            if s.documents.len() >= MAX_DOCUMENTS_PER_SHARE {
                return Err((error_code::TOO_LARGE, "too many documents"));
            }
            s.documents.push(meta.clone());
            data.remove(&meta.id);
            if meta.len == 0 {
                if meta.crc32 != document_crc32(&[]) {
                    return Err((INVALID, "document CRC mismatch"));
                }
                data.insert(meta.id.clone(), Vec::new());
            }
        }
        Change::DocumentRemoved { id } => {
            s.documents.retain(|d| &d.id != id);
            s.grants.retain(|g| g.object != Object::Doc(id.clone()));
            data.remove(id);
        }
        Change::Granted { grant } => {
            let known = match &grant.object {
                Object::Box(b) => *b == s.doc_box.id,
                Object::Doc(d) => s.documents.iter().any(|x| &x.id == d),
            };
            if !known {
                return Err((INVALID, "grant on an object not in the share"));
            }
            if !s.grants.contains(grant) {
                if s.grants.len() >= MAX_GRANTS_PER_SHARE {
                    return Err((error_code::TOO_LARGE, "too many grants"));
                }
                s.grants.push(grant.clone());
            }
        }
        Change::Revoked { grant } => s.grants.retain(|g| g != grant),
        Change::Unpaired { account } => s.pairs.retain(|p| &p.account != account),
        Change::AccountRemoved { account } => {
            s.pairs.retain(|p| &p.account != account);
            s.grants.retain(|g| &g.account != account);
        }
        Change::Paired { pair } => {
            if s.pairs.contains(pair) {
                return Ok(());
            }
            if s.pairs
                .iter()
                .any(|p| p.account == pair.account || p.cloud_user == pair.cloud_user)
            {
                return Err((INVALID, "account or cloud user paired otherwise"));
            }
            if s.pairs.len() >= MAX_PAIRS_PER_SHARE {
                return Err((error_code::TOO_LARGE, "too many pairs"));
            }
            s.pairs.push(pair.clone());
        }
        Change::DocumentData {
            doc_id,
            offset,
            bytes,
        } => {
            let meta = s
                .documents
                .iter()
                .find(|d| &d.id == doc_id)
                .ok_or((INVALID, "data for an unknown document"))?;
            let have = data.entry(doc_id.clone()).or_default();
            if *offset != have.len() as u64 {
                return Err((INVALID, "data at the wrong offset"));
            }
            if have.len() as u64 + bytes.len() as u64 > meta.len {
                return Err((INVALID, "data past the document's length"));
            }
            have.extend_from_slice(bytes);
            if have.len() as u64 == meta.len && document_crc32(have) != meta.crc32 {
                return Err((INVALID, "document CRC mismatch"));
            }
        }
    }
    Ok(())
}
