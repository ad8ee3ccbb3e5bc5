//! The store's errors: [`BlockError`] from a block device, [`StoreError`] from the store.

use thiserror::Error;

/// A block device's failure (a [`crate::BlockDevice`] returns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum BlockError {
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}..+{count} are past the end of the disk")]
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Sectors requested.
        count: u64,
    },
    /// The buffer is empty or not a whole number of 512-byte sectors.
    #[error("a {0}-byte buffer is not a whole number of 512-byte sectors")]
    BadLength(usize),
    /// The device failed the request.
    #[error("device error: {0}")]
    Io(&'static str),
}

/// What went wrong in a [`crate::Store`] operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum StoreError {
    /// A read, write or flush of the disk failed; the operation may or may not have taken
    /// effect (a failed `put` is not acknowledged: after a crash it is there or not, whole).
    #[error("disk {op} failed: {error}")]
    Device {
        /// `read`, `write`, `flush` or `erase`.
        op: &'static str,
        /// The device's error.
        error: BlockError,
    },
    /// The disk has no room for the write; nothing of it was stored. Removing items frees
    /// room (after the next compaction, which the store runs as it writes).
    #[error("the store is full")]
    Full,
    /// A key is longer than [`crate::MAX_KEY_LEN`].
    #[error("key of {0} bytes is longer than the limit of 64")]
    KeyTooLong(usize),
    /// A value is longer than [`crate::MAX_VALUE_LEN`].
    #[error("value of {0} bytes is longer than the limit of 64 MiB")]
    ValueTooLarge(u64),
    /// The disk's contents are inconsistent: the named structure failed its checks.
    #[error("corrupted store: {0}")]
    Corrupted(&'static str),
    /// The disk is neither blank (sector 0 all zeros) nor a store: it was left untouched.
    #[error("the disk holds something other than a store (sector 0 has no store signature)")]
    NotAStore,
    /// The disk holds a store of another format version or configuration.
    #[error("the disk holds a store of another format: {0}")]
    Incompatible(&'static str),
    /// The disk is too small for a store.
    #[error("a disk of {sectors} sectors is too small (at least {min} needed)")]
    TooSmall {
        /// The disk's size in 512-byte sectors.
        sectors: u64,
        /// The smallest size the store accepts.
        min: u64,
    },
    /// A value could not be given memory to be read into.
    #[error("out of memory for a value of {0} bytes")]
    OutOfMemory(u64),
    /// A bug: the storage engine broke an assumption the store relies on.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl StoreError {
    pub(crate) fn device(op: &'static str) -> impl Fn(BlockError) -> StoreError {
        move |error| StoreError::Device { op, error }
    }
}

/// The device error inside one of ekv's errors, as [`StoreError::Device`] (ekv's flash
/// errors are [`DiskError`], which names the operation).
impl From<DiskError> for StoreError {
    fn from(e: DiskError) -> Self {
        StoreError::Device {
            op: e.op,
            error: e.error,
        }
    }
}

/// The error of the flash adapter ([`crate::disk::Disk`]): a device error and the
/// operation that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskError {
    /// `read`, `write` or `erase`.
    pub op: &'static str,
    /// The device's error.
    pub error: BlockError,
}

/// Maps ekv's errors (one type per operation, all sharing these cases) to [`StoreError`].
macro_rules! from_ekv {
    ($($ty:ident { $($case:ident => $to:expr),* $(,)? })*) => {$(
        impl From<ekv::$ty<DiskError>> for StoreError {
            fn from(e: ekv::$ty<DiskError>) -> Self {
                match e {
                    ekv::$ty::Flash(d) => d.into(),
                    ekv::$ty::Corrupted => StoreError::Corrupted("the ekv database"),
                    $(ekv::$ty::$case => $to,)*
                }
            }
        }
    )*};
}

from_ekv! {
    Error {}
    MountError {}
    ReadError {
        KeyNotFound => StoreError::Internal("a missing key reached the error path"),
        KeyTooBig => StoreError::Internal("ekv refused a key the store checked"),
        BufferTooSmall => StoreError::Corrupted("a record is longer than its kind allows"),
    }
    WriteError {
        NotSorted => StoreError::Internal("records written out of order"),
        KeyTooBig => StoreError::Internal("ekv refused a key the store checked"),
        ValueTooBig => StoreError::Internal("ekv refused a record the store sized"),
        TransactionCanceled => StoreError::Internal("write transaction canceled"),
        Full => StoreError::Full,
    }
    CommitError {
        TransactionCanceled => StoreError::Internal("write transaction canceled"),
    }
    CursorError {
        KeyBufferTooSmall => StoreError::Corrupted("a key is longer than ekv allows"),
        ValueBufferTooSmall => StoreError::Corrupted("an item's head record is too long"),
    }
}

impl From<ekv::FormatError<DiskError>> for StoreError {
    fn from(e: ekv::FormatError<DiskError>) -> Self {
        match e {
            ekv::FormatError::Flash(d) => d.into(),
        }
    }
}
