//! `duplex-docsvc`: the controller's document service (`docs/shared-data.md`) on its disk.
//!
//! [`DocService`] keeps accounts, boxes, documents (metadata and bytes) and rights in a
//! [`duplex_store::Store`]. Every operation is made **as an account** and checked with
//! `duplex_docs::check` (the rights table of `docs/shared-data.md`); account management
//! is the administrator's ([`duplex_docs::ADMIN`]). [`DocService::serve`] answers the link's
//! `BoxOp`s ([`wire`]). Boxes are shared with the cloud (`sharing.rs`: pairs, conflicts,
//! one outbox per share) through the relay's share tunnels (`exchange.rs`:
//! [`DocService::share_open`], [`DocService::share_answer`]).
//!
//! # Guarantees
//!
//! * A change that returned `Ok` is durable (one `Store::put_many`, flushed).
//! * A document's metadata and all its bytes are written in one transaction: after a crash
//!   it is there whole, or not at all. Removing a box removes its documents and every
//!   grant on them in one transaction too.
//! * Uploads in progress ([`DocService::put_begin`]) are in memory only: a crash forgets
//!   them, and nothing of them is on the disk until `put_end` stored the document.
//!
//! # Key layout (see "Storage on the controller's disk" in `docs/shared-data.md`)
//!
//! | key | value (postcard) |
//! |---|---|
//! | `svc/meta` | [`Meta`]: format version, next document number |
//! | `svc/accounts` | `Vec<Account>` in id order |
//! | `svc/boxes` | `Vec<DocBox>` in id order |
//! | `svc/grants` | `Vec<Grant>` in order |
//! | `doc/<id>` | `Document` (ids are `d1`, `d2`, …) |
//! | `dat/<id>/<i:08x>` | bytes `i·32 KiB ..` of the document (the last chunk shorter) |
//! | `svc/pairs` | `duplex_docs::Pairings`: the pairs and held accounts |
//! | `svc/conflicts` | `Vec<duplex_docs::Conflict>` of the last automatic pairing |
//! | `svc/shares` | [`ShareRecord`]s: each share's next and acknowledged revision |
//!
//! Accounts, boxes and grants are small collections kept whole in one value each (keys
//! are at most 64 bytes, and an id alone may be 64): a change rewrites the collection,
//! in the same transaction as whatever else it changes. The service keeps all metadata in
//! memory (read at [`DocService::open`]); only document bytes are read from the disk.

#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

mod documents;
mod error;
mod exchange;
mod service;
mod sharing;
pub mod wire;

#[cfg(test)]
mod tests;

pub use error::DocError;
pub use exchange::{MAX_CLOUD_USERS, MAX_SNAPSHOTS, SHARE_BAD_ANSWER, SHARE_NO_EXCHANGE};
pub use service::{DocService, Limits, Meta, ServiceStats};
pub use sharing::{share_keys, ShareRecord, ShareStatus};

/// Format version in [`Meta`].
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a document per `dat/` item (and the most one `get` returns).
pub const DATA_CHUNK: usize = 32 * 1024;
/// Longest document (16 MiB, `duplex_docs::MAX_DOCUMENT_LEN`).
pub const MAX_DOCUMENT_LEN: u64 = duplex_docs::MAX_DOCUMENT_LEN;

/// The store keys (see the crate's doc).
pub mod keys {
    use alloc::format;
    use alloc::vec::Vec;

    /// The service's [`crate::Meta`].
    pub const META: &[u8] = b"svc/meta";
    /// All accounts.
    pub const ACCOUNTS: &[u8] = b"svc/accounts";
    /// All boxes.
    pub const BOXES: &[u8] = b"svc/boxes";
    /// All grants.
    pub const GRANTS: &[u8] = b"svc/grants";
    /// Prefix of document metadata.
    pub const DOC: &[u8] = b"doc/";
    /// Prefix of document bytes.
    pub const DATA: &[u8] = b"dat/";

    /// The key of document `id`'s metadata.
    pub fn doc(id: &str) -> Vec<u8> {
        format!("doc/{id}").into_bytes()
    }

    /// The key of chunk `i` of document `id`'s bytes.
    pub fn data(id: &str, i: u32) -> Vec<u8> {
        format!("dat/{id}/{i:08x}").into_bytes()
    }
}
