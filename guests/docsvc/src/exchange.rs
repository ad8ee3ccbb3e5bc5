//! The controller's side of a share exchange (`docs/shared-data.md`, "Transport"), driven
//! by the relay's `HostRequest::ShareOpen` / `ShareAnswer` (one request in flight, each
//! answered with the next message for the cloud, or the end):
//!
//! 1. `ShareOpen`: the cloud's users are fetched page by page (`ListUsers` from index 1,
//!    `count` [`MAX_SCIM_PAGE`], going on at `ScimListResponse::next_start_index`; a user
//!    listed twice counts once), then `duplex_docs::pair` runs over the device accounts,
//!    the users and the stored pairs; the pairs and conflicts are stored, and each new
//!    pair is pushed into every share as `Paired`. A cloud `Error` to a `ListUsers` skips
//!    the pairing (the stored pairs stay).
//! 2. Then each share in id order: first its unacknowledged messages again (in order),
//!    then a snapshot when one is due, then its deltas, each answered by the cloud's
//!    `SyncReply` (applied with `Outbox::on_reply`; a `need_data` ack queues those
//!    documents' bytes). The share's next revision is stored before each message goes out.
//!    A cloud `Error` (not a `SyncReply`), or more than [`MAX_SNAPSHOTS`] snapshots in
//!    one exchange, moves on to the next share.
//! 3. `ShareDone` when every share has nothing left to send.
//!
//! A new `ShareOpen` drops an unfinished exchange (its unacknowledged messages are sent
//! again). An ack for a revision the device has not reached yet (the cloud is ahead: the
//! device was restored from an older snapshot set) forces a snapshot, which the cloud
//! answers `STALE_REVISION` with its revision, and the device goes on above it.

use alloc::collections::{BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use duplex_docs::{
    pair, CloudToDevice, CloudUser, DeviceToCloud, OutboxEvent, Pairings, SyncReply, SyncRequest,
    MAX_SCIM_PAGE,
};
use duplex_link::HostReply;
use duplex_store::BlockDevice;

use crate::sharing::Sharing;
use crate::{DocError, DocService};

/// Most snapshots of one share in one exchange.
pub const MAX_SNAPSHOTS: u32 = 3;
/// Most cloud users the device reads (the listing stops there).
pub const MAX_CLOUD_USERS: usize = 10_000;
/// `HostReply::Error` code: the body does not decode, or answers another request.
pub const SHARE_BAD_ANSWER: u16 = 400;
/// `HostReply::Error` code: no exchange waits for an answer.
pub const SHARE_NO_EXCHANGE: u16 = 409;

/// Where an exchange is.
#[derive(Clone, Debug, Default)]
enum Step {
    /// No exchange (or it ended).
    #[default]
    Idle,
    /// `ListUsers` from `requested` sent.
    Users {
        requested: u32,
        users: Vec<CloudUser>,
        seen: BTreeSet<String>,
    },
    /// A `Sync` of the current share sent.
    Sync,
}

/// The state of the exchange in progress.
#[derive(Clone, Debug, Default)]
pub(crate) struct Exchange {
    step: Step,
    /// Shares still to go through.
    todo: VecDeque<String>,
    /// The share being sent, its messages to send again, and its snapshots so far.
    current: Option<String>,
    resend: VecDeque<SyncRequest>,
    snapshots: u32,
    /// The cloud is ahead of the current share: send a snapshot.
    force_snapshot: bool,
}

fn share_send(msg: &DeviceToCloud) -> HostReply {
    match postcard::to_allocvec(msg) {
        Ok(bytes) => HostReply::ShareSend { bytes },
        Err(_) => HostReply::Error {
            code: 500,
            message: "a share message does not encode".into(),
        },
    }
}

fn reply_of(r: Result<Option<DeviceToCloud>, DocError>) -> HostReply {
    match r {
        Ok(Some(m)) => share_send(&m),
        Ok(None) => HostReply::ShareDone,
        Err(e) => crate::wire::error_reply(&e),
    }
}

fn list_users(start_index: u32) -> DeviceToCloud {
    DeviceToCloud::ListUsers {
        start_index,
        count: MAX_SCIM_PAGE,
    }
}

impl<D: BlockDevice> DocService<D> {
    /// `ShareOpen`: starts an exchange; the first message for the cloud.
    pub fn share_open(&mut self) -> HostReply {
        let ex = &mut self.sharing.exchange;
        *ex = Exchange::default();
        ex.todo = self.sharing.shares.keys().cloned().collect();
        ex.step = Step::Users {
            requested: 1,
            users: Vec::new(),
            seen: BTreeSet::new(),
        };
        share_send(&list_users(1))
    }

    /// `ShareAnswer`: the cloud's answer to the last message; the next message.
    pub fn share_answer(&mut self, bytes: &[u8]) -> HostReply {
        let Ok(answer) = postcard::from_bytes::<CloudToDevice>(bytes) else {
            return HostReply::Error {
                code: SHARE_BAD_ANSWER,
                message: "the cloud's answer does not decode".into(),
            };
        };
        let step = core::mem::take(&mut self.sharing.exchange.step);
        let r = match (step, answer) {
            (Step::Idle, _) => {
                return HostReply::Error {
                    code: SHARE_NO_EXCHANGE,
                    message: "no share exchange waits for an answer".into(),
                }
            }
            (
                Step::Users {
                    requested,
                    mut users,
                    mut seen,
                },
                CloudToDevice::Users(page),
            ) => {
                for u in page.resources.iter() {
                    if users.len() < MAX_CLOUD_USERS && seen.insert(u.id.clone()) {
                        users.push(u.clone());
                    }
                }
                match page.next_start_index() {
                    Some(next) if next > requested && users.len() < MAX_CLOUD_USERS => {
                        self.sharing.exchange.step = Step::Users {
                            requested: next,
                            users,
                            seen,
                        };
                        return share_send(&list_users(next));
                    }
                    _ => self.auto_pair(&users).and_then(|()| self.next_sync()),
                }
            }
            (Step::Users { .. }, CloudToDevice::Error { .. }) => self.next_sync(),
            (Step::Sync, CloudToDevice::Sync(reply)) => {
                self.sync_reply(&reply).and_then(|()| self.next_sync())
            }
            (Step::Sync, CloudToDevice::Error { .. }) => {
                self.sharing.exchange.current = None;
                self.next_sync()
            }
            (_, other) => {
                return HostReply::Error {
                    code: SHARE_BAD_ANSWER,
                    message: format!("unexpected answer {}", kind(&other)),
                }
            }
        };
        reply_of(r)
    }

    /// Runs the automatic pairing over the cloud's users and stores its outcome.
    fn auto_pair(&mut self, users: &[CloudUser]) -> Result<(), DocError> {
        let accounts: Vec<_> = self.accounts.values().cloned().collect();
        let result = pair(&accounts, users, &self.sharing.pairings);
        let pairings = Pairings {
            pairs: result.pairs,
            held: self.sharing.pairings.held.clone(),
        };
        self.commit(&[
            Sharing::pairs_item(&pairings)?,
            Sharing::conflicts_item(&result.conflicts)?,
        ])?;
        self.sharing.pairings = pairings;
        self.sharing.conflicts = result.conflicts;
        for p in result.added {
            self.sharing
                .push_all(&duplex_docs::Change::Paired { pair: p });
        }
        Ok(())
    }

    /// The cloud's reply to the current share's message.
    fn sync_reply(&mut self, reply: &SyncReply) -> Result<(), DocError> {
        let Some(id) = self.sharing.exchange.current.clone() else {
            return Ok(());
        };
        let Some(share) = self.sharing.shares.get_mut(&id) else {
            return Ok(());
        };
        match share.outbox.on_reply(reply) {
            OutboxEvent::Acked { need_data, .. } => {
                share.acked = share.acked.max(share.outbox.acked());
                for doc_id in need_data {
                    let Ok(doc) = self.doc(&doc_id).cloned() else {
                        continue;
                    };
                    if doc.box_id != id {
                        continue;
                    }
                    let bytes = self.read_document(&doc)?;
                    if let Some(s) = self.sharing.shares.get_mut(&id) {
                        let _ = s.outbox.push_data(&doc.id, &bytes);
                    }
                }
                let item = self.sharing.shares_item()?;
                self.commit(&[item])?;
            }
            OutboxEvent::SnapshotNeeded { .. } => {}
            OutboxEvent::Ignored => {
                if let SyncReply::Ack { revision, .. } = reply {
                    if *revision >= share.outbox.next_revision() {
                        self.sharing.exchange.force_snapshot = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// The next `Sync` of this exchange, or `None`: nothing more to send.
    fn next_sync(&mut self) -> Result<Option<DeviceToCloud>, DocError> {
        loop {
            let Some(id) = self.sharing.exchange.current.clone() else {
                let ex = &mut self.sharing.exchange;
                let Some(next) = ex.todo.pop_front() else {
                    ex.step = Step::Idle;
                    return Ok(None);
                };
                ex.resend = match self.sharing.shares.get(&next) {
                    Some(s) => s.outbox.reconnect().into(),
                    None => VecDeque::new(),
                };
                ex.current = Some(next);
                ex.snapshots = 0;
                ex.force_snapshot = false;
                continue;
            };
            let Some(share) = self.sharing.shares.get(&id) else {
                self.sharing.exchange.current = None;
                continue;
            };
            if let Some(m) = self.sharing.exchange.resend.pop_front() {
                self.sharing.exchange.step = Step::Sync;
                return Ok(Some(DeviceToCloud::Sync(m)));
            }
            let ex = &self.sharing.exchange;
            let msg = if share.outbox.snapshot_needed() || ex.force_snapshot {
                if ex.snapshots >= MAX_SNAPSHOTS {
                    self.sharing.exchange.current = None;
                    continue;
                }
                let state = self.share_state(&id);
                let ex = &mut self.sharing.exchange;
                ex.snapshots += 1;
                ex.force_snapshot = false;
                let snapshot = match (state, self.sharing.shares.get_mut(&id)) {
                    (Some(state), Some(s)) => s.outbox.snapshot(state).ok(),
                    _ => None,
                };
                snapshot
            } else {
                self.sharing
                    .shares
                    .get_mut(&id)
                    .and_then(|s| s.outbox.poll())
            };
            let Some(msg) = msg else {
                self.sharing.exchange.current = None;
                continue;
            };
            // The revision is durable before the message leaves the device.
            let item = self.sharing.shares_item()?;
            self.commit(&[item])?;
            self.sharing.exchange.step = Step::Sync;
            return Ok(Some(DeviceToCloud::Sync(msg)));
        }
    }

    /// A document's bytes, whole.
    fn read_document(&mut self, doc: &duplex_docs::Document) -> Result<Vec<u8>, DocError> {
        let mut out = Vec::new();
        while (out.len() as u64) < doc.len {
            let (_, chunk) = self.get(
                duplex_docs::ADMIN,
                &doc.id,
                out.len() as u64,
                crate::DATA_CHUNK as u32,
            )?;
            if chunk.is_empty() {
                return Err(DocError::Corrupted("a document's bytes end early"));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Answers `ShareOpen` and `ShareAnswer` (other requests: 400).
    pub fn share_serve(&mut self, req: duplex_link::HostRequest) -> HostReply {
        match req {
            duplex_link::HostRequest::ShareOpen { .. } => self.share_open(),
            duplex_link::HostRequest::ShareAnswer { bytes } => self.share_answer(&bytes),
            _ => HostReply::Error {
                code: SHARE_BAD_ANSWER,
                message: "not a share request".into(),
            },
        }
    }
}

fn kind(a: &CloudToDevice) -> &'static str {
    match a {
        CloudToDevice::Users(_) => "Users",
        CloudToDevice::Sync(_) => "Sync",
        CloudToDevice::Error { .. } => "Error",
    }
}
