//! The device side of the sync protocol: one [`Outbox`] per share ("Device outbox" in
//! `docs/shared-data.md`).
//!
//! * The device pushes [`Change`]s as they happen; [`Outbox::poll`] makes them into deltas
//!   with rising revisions. Each delta lists its restrictive changes (revoked, unpaired,
//!   account or document removed) first. So that moving them first never changes the
//!   result, a restrictive change cancels the queued, unsent changes it undoes (a grant
//!   of the same tuple, a pairing of the account, a document's addition and data).
//! * A delta with a restrictive change, and a snapshot, are **barriers**: nothing newer
//!   is sent until the cloud acknowledged them. Otherwise up to `window` deltas are in
//!   flight.
//! * Acks are cumulative. After a reconnect, [`Outbox::reconnect`] gives the unacknowledged
//!   messages to send again, in order (the cloud acks a revision it has without applying it
//!   twice).
//! * On any error from the cloud (a gap, an unknown share, a stale revision, an invalid
//!   change), the outbox drops its queue and in-flight deltas and waits for the device to
//!   call [`Outbox::snapshot`] with the share's current state (full reconciliation). A
//!   new outbox also starts with a snapshot.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::model::{document_crc32, valid_id, Document, Object};
use crate::sync::{
    encoded_len, error_code, Change, ShareState, SyncError, SyncReply, SyncRequest,
    MAX_CHANGES_PER_DELTA, MAX_DATA_CHUNK, MAX_DOCUMENT_LEN, MAX_SYNC_MESSAGE,
};

/// Default number of deltas in flight (unacknowledged) at once.
pub const DEFAULT_WINDOW: usize = 4;
/// Most changes queued: past this the queue is dropped and a snapshot is needed.
pub const MAX_QUEUED_CHANGES: usize = 4096;
/// Bytes a delta's envelope (variant, share id, revision, count) takes at most.
const DELTA_OVERHEAD: usize = 1 + 1 + 64 + 10 + 5;

/// What a reply meant to the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxEvent {
    /// The reply is for another share, or acknowledges nothing sent: ignored.
    Ignored,
    /// Everything up to `revision` is applied on the cloud. `need_data`: documents whose
    /// bytes the cloud lacks after a snapshot (push them with [`Outbox::push_data`]).
    Acked {
        revision: u64,
        need_data: Vec<String>,
    },
    /// The cloud refused a message: call [`Outbox::snapshot`].
    SnapshotNeeded { code: u16, message: String },
}

/// The outgoing sync of one share.
#[derive(Clone, Debug)]
pub struct Outbox {
    share_id: String,
    next_revision: u64,
    acked: u64,
    queue: Vec<Change>,
    in_flight: VecDeque<SyncRequest>,
    snapshot_needed: bool,
    window: usize,
}

impl Outbox {
    /// An outbox for `share_id` whose first message takes revision `next_revision`
    /// (≥ 1; the controller keeps [`Outbox::next_revision`] across restarts). It starts by
    /// needing a snapshot.
    pub fn new(share_id: &str, next_revision: u64) -> Self {
        Outbox {
            share_id: share_id.to_string(),
            next_revision: next_revision.max(1),
            acked: 0,
            queue: Vec::new(),
            in_flight: VecDeque::new(),
            snapshot_needed: true,
            window: DEFAULT_WINDOW,
        }
    }

    /// Sets how many deltas may be in flight (at least 1).
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    pub fn share_id(&self) -> &str {
        &self.share_id
    }

    /// The revision the next message takes.
    pub fn next_revision(&self) -> u64 {
        self.next_revision
    }

    /// The highest revision the cloud acknowledged (0: none yet).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Whether the device must call [`Outbox::snapshot`].
    pub fn snapshot_needed(&self) -> bool {
        self.snapshot_needed
    }

    /// Changes queued and not yet in a message.
    pub fn queued(&self) -> &[Change] {
        &self.queue
    }

    /// Messages sent and not acknowledged, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &SyncRequest> {
        self.in_flight.iter()
    }

    /// Queues a change. A restrictive change drops the queued changes it undoes.
    pub fn push(&mut self, change: Change) -> Result<(), SyncError> {
        if !change.is_valid() {
            return Err(SyncError::Malformed);
        }
        match &change {
            Change::Revoked { grant } => self
                .queue
                .retain(|c| !matches!(c, Change::Granted { grant: g } if g == grant)),
            Change::Unpaired { account } => self
                .queue
                .retain(|c| !matches!(c, Change::Paired { pair } if &pair.account == account)),
            Change::AccountRemoved { account } => self.queue.retain(|c| match c {
                Change::Paired { pair } => &pair.account != account,
                Change::Granted { grant } => &grant.account != account,
                _ => true,
            }),
            Change::DocumentRemoved { id } => self.queue.retain(|c| match c {
                Change::DocumentAdded { meta } => &meta.id != id,
                Change::DocumentData { doc_id, .. } => doc_id != id,
                Change::Granted { grant } => grant.object != Object::Doc(id.clone()),
                _ => true,
            }),
            _ => {}
        }
        if self.snapshot_needed {
            // The snapshot will carry the state; data is asked for by its ack.
            return Ok(());
        }
        if self.queue.len() >= MAX_QUEUED_CHANGES {
            self.queue.clear();
            self.snapshot_needed = true;
            return Ok(());
        }
        self.queue.push(change);
        Ok(())
    }

    /// Queues a new document: its metadata then its bytes in chunks. `bytes` must match
    /// `meta.len` and `meta.crc32`.
    pub fn push_document(&mut self, meta: Document, bytes: &[u8]) -> Result<(), SyncError> {
        if meta.len != bytes.len() as u64 || meta.crc32 != document_crc32(bytes) {
            return Err(SyncError::Malformed);
        }
        let id = meta.id.clone();
        self.push(Change::DocumentAdded { meta })?;
        self.push_data(&id, bytes)
    }

    /// Queues a document's bytes from offset 0, in chunks of [`MAX_DATA_CHUNK`] (after a
    /// `need_data` ack, or after [`Outbox::push`] of its `DocumentAdded`).
    pub fn push_data(&mut self, doc_id: &str, bytes: &[u8]) -> Result<(), SyncError> {
        if !valid_id(doc_id) {
            return Err(SyncError::Malformed);
        }
        if bytes.len() as u64 > MAX_DOCUMENT_LEN {
            return Err(SyncError::TooLarge);
        }
        for (i, chunk) in bytes.chunks(MAX_DATA_CHUNK).enumerate() {
            self.push(Change::DocumentData {
                doc_id: doc_id.to_string(),
                offset: (i * MAX_DATA_CHUNK) as u64,
                bytes: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    /// A snapshot of `state` at the next revision, to send now: it replaces the queue and
    /// the in-flight deltas (the state includes them) and is a barrier until acked.
    pub fn snapshot(&mut self, state: ShareState) -> Result<SyncRequest, SyncError> {
        state.validate()?;
        let msg = SyncRequest::Snapshot {
            share_id: self.share_id.clone(),
            revision: self.next_revision,
            state,
        };
        match encoded_len(&msg) {
            Some(n) if n <= MAX_SYNC_MESSAGE => {}
            _ => return Err(SyncError::TooLarge),
        }
        self.next_revision = self.next_revision.saturating_add(1);
        self.queue.clear();
        self.in_flight.clear();
        self.in_flight.push_back(msg.clone());
        self.snapshot_needed = false;
        Ok(msg)
    }

    /// Whether an unacknowledged message holds back newer ones.
    fn barrier(&self) -> bool {
        self.in_flight.iter().any(|m| match m {
            SyncRequest::Snapshot { .. } => true,
            SyncRequest::Delta { changes, .. } => changes.iter().any(Change::is_restrictive),
        })
    }

    /// The next delta to send now, if any: `None` when a snapshot is needed, a barrier is
    /// in flight, the window is full, or nothing is queued.
    pub fn poll(&mut self) -> Option<SyncRequest> {
        if self.snapshot_needed
            || self.queue.is_empty()
            || self.in_flight.len() >= self.window
            || self.barrier()
        {
            return None;
        }
        // Restrictive changes first, each group in queue order.
        let (mut order, rest): (Vec<Change>, Vec<Change>) = core::mem::take(&mut self.queue)
            .into_iter()
            .partition(Change::is_restrictive);
        order.extend(rest);
        let mut size = DELTA_OVERHEAD + self.share_id.len();
        let mut take = 0;
        for c in &order {
            let n = encoded_len(c).unwrap_or(MAX_SYNC_MESSAGE);
            if take == MAX_CHANGES_PER_DELTA || (take > 0 && size + n > MAX_SYNC_MESSAGE) {
                break;
            }
            size += n;
            take += 1;
        }
        self.queue = order.split_off(take);
        let msg = SyncRequest::Delta {
            share_id: self.share_id.clone(),
            revision: self.next_revision,
            changes: order,
        };
        self.next_revision = self.next_revision.saturating_add(1);
        self.in_flight.push_back(msg.clone());
        Some(msg)
    }

    /// Handles the cloud's reply.
    pub fn on_reply(&mut self, reply: &SyncReply) -> OutboxEvent {
        match reply {
            SyncReply::Ack {
                share_id,
                revision,
                need_data,
            } => {
                if *share_id != self.share_id || *revision >= self.next_revision {
                    return OutboxEvent::Ignored;
                }
                self.in_flight.retain(|m| m.revision() > *revision);
                self.acked = self.acked.max(*revision);
                OutboxEvent::Acked {
                    revision: *revision,
                    need_data: need_data.clone(),
                }
            }
            SyncReply::Error {
                share_id,
                code,
                message,
                revision,
            } => {
                if *share_id != self.share_id {
                    return OutboxEvent::Ignored;
                }
                // Gap and unknown-share errors answer deltas only: once a snapshot is on
                // its way they are stale replies to deltas it replaced.
                let snapshot_in_flight =
                    matches!(self.in_flight.front(), Some(SyncRequest::Snapshot { .. }));
                if snapshot_in_flight
                    && matches!(*code, error_code::REVISION_GAP | error_code::UNKNOWN_SHARE)
                {
                    return OutboxEvent::Ignored;
                }
                if *code == error_code::STALE_REVISION {
                    self.next_revision = self.next_revision.max(revision.saturating_add(1));
                }
                self.queue.clear();
                self.in_flight.clear();
                self.snapshot_needed = true;
                OutboxEvent::SnapshotNeeded {
                    code: *code,
                    message: message.clone(),
                }
            }
        }
    }

    /// The connection was lost and is back: the unacknowledged messages to send again, in
    /// order (before anything [`Outbox::poll`] gives).
    pub fn reconnect(&self) -> Vec<SyncRequest> {
        self.in_flight.iter().cloned().collect()
    }
}
