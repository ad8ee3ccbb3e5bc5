//! [`DocError`]: why a document service operation failed, with its HTTP-like code
//! (`duplex_link::msg::box_error`; the table is in `docs/shared-data.md`).

use alloc::string::String;

use duplex_link::msg::box_error;
use duplex_store::StoreError;
use thiserror::Error;

/// Why an operation failed. Nothing was changed, except for [`DocError::Storage`] on a
/// write, which may or may not have taken effect (whole, never in part).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DocError {
    /// 403: the account does not hold `needed` (`owner`, `write`, `read`, or `admin`) on
    /// `object` (`box:ID`, `doc:ID`, `accounts`).
    #[error("denied: needs {needed} on {object}")]
    Denied {
        needed: &'static str,
        object: String,
    },
    /// 403: the request's account does not exist.
    #[error("denied: unknown account {0}")]
    UnknownAccount(String),
    /// 404: no such account, box, document, grant or upload.
    #[error("no {kind} {id}")]
    NotFound { kind: &'static str, id: String },
    /// 409: the account or box exists already.
    #[error("{kind} {id} exists")]
    Exists { kind: &'static str, id: String },
    /// 400: a malformed request (an upload's offset or CRC does not match).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 422: an invalid identifier, name, email, or a limit on counts reached.
    #[error("invalid: {0}")]
    Invalid(String),
    /// 413: a document or chunk longer than allowed.
    #[error("{what} of {len} bytes is larger than {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// 429: no memory for one more upload now.
    #[error("busy: {0}")]
    Busy(String),
    /// 507: the disk is full.
    #[error("the store is full")]
    Full,
    /// 500: the disk failed or holds something unreadable.
    #[error("storage error: {0}")]
    Storage(StoreError),
    /// 500: a stored value does not decode.
    #[error("corrupted store: {0}")]
    Corrupted(&'static str),
}

impl DocError {
    /// The HTTP-like code of `HostReply::Error`.
    pub fn code(&self) -> u16 {
        match self {
            DocError::Denied { .. } | DocError::UnknownAccount(_) => box_error::DENIED,
            DocError::NotFound { .. } => box_error::NOT_FOUND,
            DocError::Exists { .. } => box_error::EXISTS,
            DocError::BadRequest(_) => box_error::BAD_REQUEST,
            DocError::Invalid(_) => box_error::INVALID,
            DocError::TooLarge { .. } => box_error::TOO_LARGE,
            DocError::Busy(_) => box_error::BUSY,
            DocError::Full => box_error::FULL,
            DocError::Storage(_) | DocError::Corrupted(_) => box_error::STORAGE,
        }
    }

    pub(crate) fn not_found(kind: &'static str, id: &str) -> Self {
        DocError::NotFound {
            kind,
            id: id.into(),
        }
    }
}

impl From<StoreError> for DocError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full => DocError::Full,
            e => DocError::Storage(e),
        }
    }
}
