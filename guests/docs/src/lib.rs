//! `duplex-docs`: the device's document service and its sharing with a cloud service
//! (`docs/shared-data.md`).
//!
//! * [`model`]: accounts, document boxes, documents, roles and rights as tuples
//!   ([`Grant`], written `box:ID#role@user:ID`), with identifiers and limits.
//! * [`rights`]: the one rights check, [`check`], that the controller enforces and that
//!   the cloud enforces again through the pairs ([`Replica::may`]).
//! * [`email`]: [`normalize_email`], the email comparison pairing relies on.
//! * [`pairing`]: SCIM-shaped cloud users ([`CloudUser`], [`ScimListResponse`]), the
//!   automatic pairing rule ([`pair`]) with its conflict list, and the administrator's
//!   manual pair / unpair ([`Pairings`]).
//! * [`sync`]: the messages device → cloud ([`SyncRequest`], [`SyncReply`]) with their
//!   limits and error codes; [`outbox`]: the device side ([`Outbox`]: revisions,
//!   revocations first, retransmission, snapshot fallback); [`replica`]: the cloud side
//!   ([`Replica`]: each revision applied once, gaps refused, rights enforced).
//!
//! `#![no_std]` with `alloc`, no I/O: the controller firmware and the host cloud server
//! share one definition; tests run on the host
//! (`cargo test --target x86_64-unknown-linux-gnu`). Messages are postcard on the wire:
//! **never reorder enum variants or fields; add new ones at the end.**

#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod email;
pub mod model;
pub mod outbox;
pub mod pairing;
pub mod replica;
pub mod rights;
pub mod sync;
pub mod transport;

pub use email::{normalize_email, MAX_EMAIL_LEN, MAX_LOCAL_LEN};
pub use model::{
    document_crc32, valid_id, valid_name, Account, DocBox, Document, Grant, Object,
    ParseGrantError, Role, ADMIN, MAX_ID_LEN, MAX_NAME_LEN,
};
pub use outbox::{Outbox, OutboxEvent, DEFAULT_WINDOW};
pub use pairing::{
    pair, CloudUser, Conflict, ConflictReason, Pair, PairError, PairingResult, Pairings, ScimEmail,
    ScimListResponse, Subject, MAX_SCIM_PAGE, SCIM_LIST_RESPONSE_SCHEMA, SCIM_USER_SCHEMA,
};
pub use replica::Replica;
pub use rights::{check, Denied, Op, Target};
pub use sync::{
    error_code, Change, ShareState, SyncError, SyncReply, SyncRequest, MAX_CHANGES_PER_DELTA,
    MAX_DATA_CHUNK, MAX_DOCUMENTS_PER_SHARE, MAX_DOCUMENT_LEN, MAX_GRANTS_PER_SHARE,
    MAX_MESSAGE_LEN, MAX_PAIRS_PER_SHARE, MAX_SYNC_MESSAGE,
};
pub use transport::{CloudToDevice, DeviceToCloud};

#[cfg(test)]
mod tests_pairing;
#[cfg(test)]
mod tests_rights;
#[cfg(test)]
mod tests_sync;
#[cfg(test)]
mod tests_wire;
