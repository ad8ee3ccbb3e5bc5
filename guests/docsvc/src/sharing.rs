//! Sharing boxes with the cloud (`docs/shared-data.md`, "Pairing" and "Sync protocol"):
//! the device's pairing state, the conflict list, and one [`Outbox`] per shared box.
//!
//! * `duplex box share BOX --with cloud` ([`DocService::share_box`]) creates share `BOX`;
//!   its outbox starts with a snapshot. Afterwards every change to the box — a document
//!   stored (its metadata, then its bytes as `DocumentData` chunks) or deleted, a grant or
//!   revocation on the box or its documents — and every change of the pairs (paired,
//!   unpaired, an account removed) is pushed into the outboxes it concerns.
//! * The administrator pairs and unpairs by hand ([`DocService::admin_pair`],
//!   [`DocService::admin_unpair`]); the automatic pairing runs at each exchange
//!   (`exchange.rs`).
//! * Durable: `svc/pairs` ([`Pairings`]), `svc/conflicts` (`Vec<Conflict>`), and
//!   `svc/shares` (each share's next revision and last acknowledged revision). The queue
//!   of an outbox is in memory only: after a restart each share starts with a snapshot at
//!   its stored next revision, which is written **before** a message with that revision
//!   leaves the device, so a revision is never reused with other content.
//! * A shared box cannot be removed (409): there is no unsharing in version 1.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use duplex_docs::{
    Change, Conflict, DocBox, Document, Grant, Object, Op, Outbox, PairError, Pairings, ShareState,
    Target, ADMIN,
};
use duplex_store::{BlockDevice, Store};
use serde::{Deserialize, Serialize};

use crate::exchange::Exchange;
use crate::service::{encode, Item};
use crate::{DocError, DocService};

/// Store keys of the sharing state.
pub mod share_keys {
    /// The device's [`duplex_docs::Pairings`].
    pub const PAIRS: &[u8] = b"svc/pairs";
    /// The conflicts of the last automatic pairing (`Vec<duplex_docs::Conflict>`).
    pub const CONFLICTS: &[u8] = b"svc/conflicts";
    /// The shares (`Vec<ShareRecord>` in id order).
    pub const SHARES: &[u8] = b"svc/shares";
}

/// A share as stored (`svc/shares`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    /// The share id, the shared box's id.
    pub share_id: String,
    /// The revision the next message takes.
    pub next_revision: u64,
    /// The highest revision the cloud acknowledged (0: none).
    pub acked: u64,
}

/// One share in memory.
#[derive(Clone, Debug)]
pub(crate) struct Share {
    pub outbox: Outbox,
    /// The highest acknowledged revision, kept across restarts.
    pub acked: u64,
}

/// The sharing state of the service.
#[derive(Debug, Default)]
pub(crate) struct Sharing {
    pub pairings: Pairings,
    pub conflicts: Vec<Conflict>,
    pub shares: BTreeMap<String, Share>,
    pub exchange: Exchange,
}

fn decode<T: serde::de::DeserializeOwned>(
    b: Option<Vec<u8>>,
    what: &'static str,
) -> Result<Option<T>, DocError> {
    match b {
        Some(b) => postcard::from_bytes(&b)
            .map(Some)
            .map_err(|_| DocError::Corrupted(what)),
        None => Ok(None),
    }
}

impl Sharing {
    /// Reads the sharing state (empty on a store that has none).
    pub(crate) fn load<D: BlockDevice>(store: &mut Store<D>) -> Result<Self, DocError> {
        let pairings = decode(store.get(share_keys::PAIRS)?, "svc/pairs")?.unwrap_or_default();
        let conflicts =
            decode(store.get(share_keys::CONFLICTS)?, "svc/conflicts")?.unwrap_or_default();
        let records: Vec<ShareRecord> =
            decode(store.get(share_keys::SHARES)?, "svc/shares")?.unwrap_or_default();
        let shares = records
            .into_iter()
            .map(|r| {
                let share = Share {
                    outbox: Outbox::new(&r.share_id, r.next_revision).with_window(1),
                    acked: r.acked,
                };
                (r.share_id, share)
            })
            .collect();
        Ok(Sharing {
            pairings,
            conflicts,
            shares,
            exchange: Exchange::default(),
        })
    }

    pub(crate) fn shares_item(&self) -> Result<Item, DocError> {
        let records: Vec<ShareRecord> = self
            .shares
            .iter()
            .map(|(id, s)| ShareRecord {
                share_id: id.clone(),
                next_revision: s.outbox.next_revision(),
                acked: s.acked.max(s.outbox.acked()),
            })
            .collect();
        Ok((share_keys::SHARES.to_vec(), Some(encode(&records)?)))
    }

    pub(crate) fn pairs_item(pairings: &Pairings) -> Result<Item, DocError> {
        Ok((share_keys::PAIRS.to_vec(), Some(encode(pairings)?)))
    }

    pub(crate) fn conflicts_item(conflicts: &[Conflict]) -> Result<Item, DocError> {
        Ok((share_keys::CONFLICTS.to_vec(), Some(encode(conflicts)?)))
    }

    /// Pushes `change` into every share.
    pub(crate) fn push_all(&mut self, change: &Change) {
        for s in self.shares.values_mut() {
            // A change that does not validate is not sent; the next snapshot carries the
            // state anyway.
            let _ = s.outbox.push(change.clone());
        }
    }

    /// Pushes `change` into share `box_id`, if the box is shared.
    pub(crate) fn push_to(&mut self, box_id: &str, change: Change) {
        if let Some(s) = self.shares.get_mut(box_id) {
            let _ = s.outbox.push(change);
        }
    }
}

/// A pairing refusal as a [`DocError`].
fn pair_error(e: PairError, account: &str, cloud_user: &str) -> DocError {
    match e {
        PairError::NotAdmin => DocError::Denied {
            needed: "admin",
            object: "pairs".into(),
        },
        PairError::InvalidId => DocError::Invalid(format!("ids {account:?}, {cloud_user:?}")),
        PairError::AccountPaired => DocError::Exists {
            kind: "pair of account",
            id: account.into(),
        },
        PairError::CloudUserPaired => DocError::Exists {
            kind: "pair of cloud user",
            id: cloud_user.into(),
        },
        PairError::NotPaired => DocError::not_found("pair of account", account),
    }
}

impl<D: BlockDevice> DocService<D> {
    /// Shares box `box_id` with the cloud (the administrator or an owner of the box). A
    /// box shared already changes nothing.
    pub fn share_box(&mut self, who: &str, box_id: &str) -> Result<(), DocError> {
        self.known(who)?;
        if !self.has_box(box_id) {
            return Err(DocError::not_found("box", box_id));
        }
        self.may(who, Op::GrantOnBox, Target::Box(box_id))?;
        if self.sharing.shares.contains_key(box_id) {
            return Ok(());
        }
        let share = Share {
            outbox: Outbox::new(box_id, 1).with_window(1),
            acked: 0,
        };
        self.sharing.shares.insert(box_id.into(), share);
        let item = self.sharing.shares_item();
        let done = item.and_then(|item| self.commit(&[item]));
        if done.is_err() {
            self.sharing.shares.remove(box_id);
        }
        done
    }

    /// Whether box `box_id` is shared.
    pub fn is_shared(&self, box_id: &str) -> bool {
        self.sharing.shares.contains_key(box_id)
    }

    /// Pairs `account` with `cloud_user` by hand (`admin` only; the account must exist).
    pub fn admin_pair(
        &mut self,
        who: &str,
        account: &str,
        cloud_user: &str,
    ) -> Result<(), DocError> {
        self.known(who)?;
        if who == ADMIN && account != ADMIN && !self.accounts.contains_key(account) {
            return Err(DocError::not_found("account", account));
        }
        let mut pairings = self.sharing.pairings.clone();
        let pair = pairings
            .admin_pair(who, account, cloud_user)
            .map_err(|e| pair_error(e, account, cloud_user))?;
        let conflicts: Vec<Conflict> = self
            .sharing
            .conflicts
            .iter()
            .filter(|c| !matches!(&c.subject, duplex_docs::Subject::Account(a) if a == account))
            .filter(
                |c| !matches!(&c.subject, duplex_docs::Subject::CloudUser(u) if u == cloud_user),
            )
            .cloned()
            .collect();
        self.commit(&[
            Sharing::pairs_item(&pairings)?,
            Sharing::conflicts_item(&conflicts)?,
        ])?;
        self.sharing.pairings = pairings;
        self.sharing.conflicts = conflicts;
        self.sharing.push_all(&Change::Paired { pair });
        Ok(())
    }

    /// Unpairs `account` (`admin` only); automatic pairing then leaves it alone.
    pub fn admin_unpair(&mut self, who: &str, account: &str) -> Result<(), DocError> {
        self.known(who)?;
        let mut pairings = self.sharing.pairings.clone();
        pairings
            .admin_unpair(who, account)
            .map_err(|e| pair_error(e, account, ""))?;
        self.commit(&[Sharing::pairs_item(&pairings)?])?;
        self.sharing.pairings = pairings;
        self.sharing.push_all(&Change::Unpaired {
            account: account.into(),
        });
        Ok(())
    }

    /// The device's pairs and held accounts.
    pub fn pairings(&self) -> &Pairings {
        &self.sharing.pairings
    }

    /// The conflicts of the last automatic pairing (`admin` only).
    pub fn conflicts(&self, who: &str) -> Result<Vec<Conflict>, DocError> {
        self.admin(who)?;
        Ok(self.sharing.conflicts.clone())
    }

    /// The shares: (share id, last revision sent, last revision acknowledged, changes
    /// queued, messages in flight, snapshot due) (`admin` only).
    pub fn shares(&self, who: &str) -> Result<Vec<ShareStatus>, DocError> {
        self.admin(who)?;
        Ok(self
            .sharing
            .shares
            .iter()
            .map(|(id, s)| ShareStatus {
                share_id: id.clone(),
                revision: s.outbox.next_revision().saturating_sub(1),
                acked: s.acked.max(s.outbox.acked()),
                queued: s.outbox.queued().len(),
                in_flight: s.outbox.in_flight().count(),
                snapshot_needed: s.outbox.snapshot_needed(),
            })
            .collect())
    }

    fn admin(&self, who: &str) -> Result<(), DocError> {
        self.known(who)?;
        if who == ADMIN {
            Ok(())
        } else {
            Err(DocError::Denied {
                needed: "admin",
                object: "shares".into(),
            })
        }
    }

    /// The whole state of share `box_id` now, for a snapshot.
    pub(crate) fn share_state(&self, box_id: &str) -> Option<ShareState> {
        let doc_box: DocBox = self.boxes.get(box_id)?.clone();
        let documents: Vec<Document> = self
            .docs
            .values()
            .filter(|d| d.box_id == box_id)
            .cloned()
            .collect();
        let grants: Vec<Grant> = self
            .grants
            .iter()
            .filter(|g| match &g.object {
                Object::Box(b) => b == box_id,
                Object::Doc(d) => documents.iter().any(|doc| &doc.id == d),
            })
            .cloned()
            .collect();
        Some(ShareState {
            doc_box,
            pairs: self.sharing.pairings.pairs.clone(),
            documents,
            grants,
        })
    }

    // ---- hooks: the service's changes, pushed into the shares they concern -----------

    /// A document was stored.
    pub(crate) fn shared_document_added(&mut self, doc: &Document, bytes: &[u8]) {
        if let Some(s) = self.sharing.shares.get_mut(&doc.box_id) {
            let _ = s.outbox.push_document(doc.clone(), bytes);
        }
    }

    /// A document was deleted.
    pub(crate) fn shared_document_removed(&mut self, doc: &Document) {
        self.sharing
            .push_to(&doc.box_id, Change::DocumentRemoved { id: doc.id.clone() });
    }

    /// A grant was made (`granted`) or revoked.
    pub(crate) fn shared_grant(&mut self, g: &Grant, granted: bool) {
        let box_id = match &g.object {
            Object::Box(b) => Some(b.clone()),
            Object::Doc(d) => self.doc(d).ok().map(|d| d.box_id.clone()),
        };
        let Some(box_id) = box_id else { return };
        let grant = g.clone();
        let change = if granted {
            Change::Granted { grant }
        } else {
            Change::Revoked { grant }
        };
        self.sharing.push_to(&box_id, change);
    }

    /// An account is being removed: the pairs item to write with it, if it was paired or
    /// held.
    pub(crate) fn unpair_removed_item(
        &self,
        account: &str,
    ) -> Result<Option<(Item, Pairings)>, DocError> {
        let mut pairings = self.sharing.pairings.clone();
        pairings.remove_account(account);
        if pairings == self.sharing.pairings {
            return Ok(None);
        }
        Ok(Some((Sharing::pairs_item(&pairings)?, pairings)))
    }

    /// An account was removed (its pair too, if any).
    pub(crate) fn shared_account_removed(&mut self, account: &str, pairings: Option<Pairings>) {
        if let Some(p) = pairings {
            self.sharing.pairings = p;
        }
        self.sharing.push_all(&Change::AccountRemoved {
            account: account.to_string(),
        });
    }
}

/// A share's sync state ([`DocService::shares`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareStatus {
    pub share_id: String,
    /// The last revision given to a message (0: none yet).
    pub revision: u64,
    /// The last revision the cloud acknowledged.
    pub acked: u64,
    /// Changes queued, not in a message yet.
    pub queued: usize,
    /// Messages sent and not acknowledged.
    pub in_flight: usize,
    /// Whether a snapshot is due.
    pub snapshot_needed: bool,
}
