//! The shares the cloud received (`docs/shared-data.md`, "Cloud replica"): one
//! [`duplex_docs::Replica`] per (device, share), fed by the devices' sync messages
//! ([`Shares::apply`]), kept in the share database ([`super::share_db`]) and read by the
//! cloud's users through the rights the replica enforces ([`Shares::visible`],
//! [`Shares::read`]).
//!
//! A replica cannot be saved as such: what is stored is its revision, its state and its
//! complete documents' bytes. At start each share is rebuilt by applying a snapshot of the
//! stored state at the stored revision (so a replayed delta is acked and not applied
//! twice, and a gap refused, as before the restart); the stored bytes are served beside
//! the replica ([`ShareEntry::kept`]) as long as the document's length and CRC match, and
//! are left out of the `need_data` the cloud answers.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use duplex_docs::{
    document_crc32, error_code, valid_id, Denied, Document, Op, Replica, ShareState, SyncReply,
    SyncRequest,
};
use serde::Serialize;

use super::share_db::{ShareDb, ShareDbError};

/// Most shares the cloud keeps for one device.
pub const MAX_SHARES_PER_DEVICE: usize = 64;

/// One share and what the cloud keeps beside its replica.
struct ShareEntry {
    replica: Replica,
    /// Complete documents' bytes loaded from the database (the replica has not received
    /// them since the restart).
    kept: BTreeMap<String, Vec<u8>>,
    /// The documents stored in the database, with their (length, CRC).
    stored: BTreeMap<String, (u64, u32)>,
    /// The revision last written to the database (0: never).
    saved_revision: u64,
}

impl ShareEntry {
    fn new(share_id: &str) -> Self {
        ShareEntry {
            replica: Replica::new(share_id),
            kept: BTreeMap::new(),
            stored: BTreeMap::new(),
            saved_revision: 0,
        }
    }

    /// A document's complete bytes: the replica's, or kept ones that still match.
    fn bytes(&self, id: &str) -> Option<&[u8]> {
        if let Some(b) = self.replica.data(id) {
            return Some(b);
        }
        let meta = self.replica.document(id)?;
        let kept = self.kept.get(id)?;
        matches(meta, kept).then_some(kept.as_slice())
    }

    /// Drops kept bytes the replica has now, or that no longer match a document.
    fn prune_kept(&mut self) {
        let replica = &self.replica;
        self.kept.retain(|id, bytes| {
            replica.data(id).is_none() && replica.document(id).is_some_and(|m| matches(m, bytes))
        });
    }
}

fn matches(meta: &Document, bytes: &[u8]) -> bool {
    bytes.len() as u64 == meta.len && document_crc32(bytes) == meta.crc32
}

/// A document a cloud user may read (`GET /v1/shared/documents`).
#[derive(Clone, Debug, Serialize)]
pub struct SharedDocument {
    pub id: String,
    pub name: String,
    pub len: u64,
    pub crc32: u32,
    pub created_by: String,
    pub box_id: String,
    pub box_name: String,
    pub device_id: String,
    pub share_id: String,
    /// Whether all its bytes have arrived (it can be read).
    pub available: bool,
}

/// Why a document cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no shared document {0}")]
    Unknown(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the bytes of document {0} have not all arrived yet")]
    Incomplete(String),
}

/// A share's revision, as reported by a sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShareRevision {
    pub share_id: String,
    pub revision: u64,
}

/// Every share received, by (device id, share id), and the database they are kept in.
pub struct Shares {
    entries: Mutex<BTreeMap<(String, String), ShareEntry>>,
    db: Mutex<ShareDb>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn why_denied(d: Denied, user: &str, doc: &str) -> String {
    match d {
        Denied::NotPaired => {
            format!("user {user} is not paired with an account of the device sharing {doc}")
        }
        Denied::Insufficient { needed } => format!(
            "user {user}'s account has no {} right on document {doc}",
            needed.as_str()
        ),
        Denied::NoSuchObject | Denied::WrongTarget => format!("user {user} may not read {doc}"),
    }
}

impl Shares {
    /// Opens the database and rebuilds every share stored in it.
    pub fn open(db: ShareDb) -> Result<Shares, ShareDbError> {
        let mut entries = BTreeMap::new();
        for s in db.load()? {
            let mut e = ShareEntry::new(&s.share_id);
            let snapshot = SyncRequest::Snapshot {
                share_id: s.share_id.clone(),
                revision: s.revision,
                state: s.state,
            };
            match e.replica.handle(&snapshot) {
                SyncReply::Ack { .. } => {}
                SyncReply::Error { code, message, .. } => {
                    return Err(ShareDbError::Corrupt {
                        device_id: s.device_id,
                        share_id: s.share_id,
                        why: format!("its state does not load ({code}: {message})"),
                    })
                }
            }
            e.saved_revision = s.revision;
            for (id, bytes) in s.documents {
                if let Some(meta) = e.replica.document(&id) {
                    e.stored.insert(id.clone(), (meta.len, meta.crc32));
                    e.kept.insert(id, bytes);
                }
            }
            e.prune_kept();
            log::info!(
                "share {}/{} loaded at revision {} ({} documents stored)",
                s.device_id,
                s.share_id,
                s.revision,
                e.kept.len()
            );
            entries.insert((s.device_id, s.share_id), e);
        }
        Ok(Shares {
            entries: Mutex::new(entries),
            db: Mutex::new(db),
        })
    }

    /// Applies one sync message of `device`'s and returns the reply. A revision applied
    /// is written to the database before it is acked; when it cannot be, the reply is an
    /// `Err` (the device sends it again; the replica acks it then, and it is written).
    pub fn apply(&self, device: &str, req: &SyncRequest) -> Result<SyncReply, ShareDbError> {
        let share_id = req.share_id();
        let refuse = |code: u16, message: &str| SyncReply::Error {
            share_id: share_id.to_string(),
            code,
            message: message.to_string(),
            revision: 0,
        };
        if !valid_id(share_id) {
            return Ok(refuse(error_code::MALFORMED, "invalid share id"));
        }
        let mut entries = lock(&self.entries);
        let key = (device.to_string(), share_id.to_string());
        if !entries.contains_key(&key) {
            let n = entries.keys().filter(|(d, _)| d == device).count();
            if n >= MAX_SHARES_PER_DEVICE {
                return Ok(refuse(error_code::TOO_LARGE, "too many shares"));
            }
        }
        let e = entries
            .entry(key)
            .or_insert_with(|| ShareEntry::new(share_id));
        let mut reply = e.replica.handle(req);
        e.prune_kept();
        if let SyncReply::Ack { need_data, .. } = &mut reply {
            let kept = &e.kept;
            need_data.retain(|id| !kept.contains_key(id));
        }
        if e.replica.revision() != e.saved_revision {
            self.save(device, e)?;
        }
        Ok(reply)
    }

    /// Writes `e` (its revision, state and complete documents not yet stored).
    fn save(&self, device: &str, e: &mut ShareEntry) -> Result<(), ShareDbError> {
        let Some(state) = e.replica.state() else {
            return Ok(());
        };
        let mut write = Vec::new();
        let mut keep = Vec::new();
        let mut stored = BTreeMap::new();
        for d in &state.documents {
            let Some(bytes) = e.bytes(&d.id) else {
                continue;
            };
            keep.push(d.id.as_str());
            stored.insert(d.id.clone(), (d.len, d.crc32));
            if e.stored.get(&d.id) != Some(&(d.len, d.crc32)) {
                write.push((d.id.as_str(), bytes));
            }
        }
        let revision = e.replica.revision();
        lock(&self.db).save(device, e.replica.share_id(), revision, state, &write, &keep)?;
        e.stored = stored;
        e.saved_revision = revision;
        Ok(())
    }

    /// The revision and state of `device`'s share `share_id`, if the cloud has it.
    pub fn state(&self, device: &str, share_id: &str) -> Option<(u64, Option<ShareState>)> {
        let entries = lock(&self.entries);
        let e = entries.get(&(device.to_string(), share_id.to_string()))?;
        Some((e.replica.revision(), e.replica.state().cloned()))
    }

    /// `device`'s shares and their revisions.
    pub fn revisions(&self, device: &str) -> Vec<ShareRevision> {
        lock(&self.entries)
            .iter()
            .filter(|((d, _), _)| d == device)
            .map(|((_, s), e)| ShareRevision {
                share_id: s.clone(),
                revision: e.replica.revision(),
            })
            .collect()
    }

    /// The documents `user` may read now, across every share.
    pub fn visible(&self, user: &str) -> Vec<SharedDocument> {
        let entries = lock(&self.entries);
        let mut out = Vec::new();
        for ((device, share), e) in entries.iter() {
            let Some(state) = e.replica.state() else {
                continue;
            };
            for d in e.replica.visible_documents(user) {
                out.push(SharedDocument {
                    id: d.id.clone(),
                    name: d.name.clone(),
                    len: d.len,
                    crc32: d.crc32,
                    created_by: d.created_by.clone(),
                    box_id: state.doc_box.id.clone(),
                    box_name: state.doc_box.name.clone(),
                    device_id: device.clone(),
                    share_id: share.clone(),
                    available: e.bytes(&d.id).is_some(),
                });
            }
        }
        out
    }

    /// Document `doc`'s bytes, if `user` may read it now (through any share holding it).
    pub fn read(&self, user: &str, doc: &str) -> Result<Vec<u8>, ReadError> {
        let entries = lock(&self.entries);
        let mut denied = None;
        for e in entries.values() {
            if e.replica.document(doc).is_none() {
                continue;
            }
            match e.replica.may(user, Op::GetDoc, Some(doc)) {
                Ok(()) => {
                    return e
                        .bytes(doc)
                        .map(<[u8]>::to_vec)
                        .ok_or_else(|| ReadError::Incomplete(doc.to_string()))
                }
                Err(d) => denied = denied.or(Some(d)),
            }
        }
        match denied {
            Some(d) => Err(ReadError::Forbidden(why_denied(d, user, doc))),
            None => Err(ReadError::Unknown(doc.to_string())),
        }
    }
}
