//! Why a snapshot operation failed. Every variant names the set directory (or the path)
//! and the file, partition or field concerned, so that the monitor can pass the message
//! on as it is ("the device falls back to a cold boot and says why").

use std::io;
use std::path::{Path, PathBuf};

/// Why writing, opening, verifying, loading or merging a snapshot set failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The set was written by another version of the format: this crate reads versions
    /// [`MIN_FORMAT_VERSION`](crate::MIN_FORMAT_VERSION) to `expected`
    /// ([`FORMAT_VERSION`](crate::FORMAT_VERSION)).
    #[error(
        "snapshot set {dir}: manifest.json has format_version {found}, this monitor reads \
         format_version 2 to {expected} only (a set of another version cannot be restored: \
         take a new snapshot with this monitor)"
    )]
    Version {
        dir: PathBuf,
        found: u64,
        expected: u32,
    },
    /// A file the set needs is not there.
    #[error("snapshot set {dir}: file {file} is missing")]
    Missing { dir: PathBuf, file: String },
    /// A file's length is not the one the manifest records (cut short, or overwritten).
    #[error(
        "snapshot set {dir}: file {file} is {found} bytes long, the manifest records {expected} \
         bytes (truncated or overwritten)"
    )]
    Truncated {
        dir: PathBuf,
        file: String,
        expected: u64,
        found: u64,
    },
    /// A file's content does not match its recorded CRC-32.
    #[error(
        "snapshot set {dir}: file {file} fails its checksum (manifest records crc32 \
         {expected:08x}, the content gives {found:08x}): the file is corrupt"
    )]
    Checksum {
        dir: PathBuf,
        file: String,
        expected: u32,
        found: u32,
    },
    /// A data file's structure is wrong (bad header or size) in a way its length did not show.
    #[error("snapshot set {dir}: file {file}: {message}")]
    Corrupt {
        dir: PathBuf,
        file: String,
        message: String,
    },
    /// The set has no partition of that name.
    #[error("snapshot set {dir} has no partition {name:?}")]
    NoPartition { dir: PathBuf, name: String },
    /// The parent set of an incremental set is missing or does not match.
    #[error("snapshot set {dir}: parent set: {reason}")]
    Parent { dir: PathBuf, reason: String },
    /// A system call on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// The file system filled up while the set was written. The incomplete set was removed;
    /// whatever was at the destination is unchanged.
    #[error(
        "no space left on the file system while writing {path}: the incomplete snapshot set was \
         removed and the destination is unchanged"
    )]
    NoSpace { path: PathBuf },
    /// `manifest.json` cannot be read as a manifest of this format version, or contradicts
    /// itself.
    #[error("snapshot set {dir}: manifest.json: {message}")]
    Manifest { dir: PathBuf, message: String },
    /// The writer was used in a way the format does not allow (a caller bug).
    #[error("snapshot set being written to {dest}: partition {partition:?}: {message}")]
    Usage {
        dest: PathBuf,
        partition: String,
        message: String,
    },
    /// A partition's disk could not be restored (the set has none, or the destination
    /// file failed).
    #[error("snapshot set {dir}: partition {partition}: disk: {message}")]
    Disk {
        dir: PathBuf,
        partition: String,
        message: String,
    },
    /// Guest memory could not be created for a restore.
    #[error("snapshot set {dir}: partition {partition}: guest memory: {message}")]
    Memory {
        dir: PathBuf,
        partition: String,
        message: String,
    },
}

impl SnapshotError {
    /// An I/O error on `path`; ENOSPC and EDQUOT become [`SnapshotError::NoSpace`].
    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => SnapshotError::NoSpace {
                path: path.to_path_buf(),
            },
            _ => SnapshotError::Io {
                path: path.to_path_buf(),
                op,
                source,
            },
        }
    }

    /// A manifest error for the set at `dir`.
    pub(crate) fn manifest(dir: &Path, message: impl Into<String>) -> Self {
        SnapshotError::Manifest {
            dir: dir.to_path_buf(),
            message: message.into(),
        }
    }

    /// A parent-chain error for the set at `dir`.
    pub(crate) fn parent(dir: &Path, reason: impl Into<String>) -> Self {
        SnapshotError::Parent {
            dir: dir.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// True if this is the file system filling up.
    pub fn is_no_space(&self) -> bool {
        matches!(self, SnapshotError::NoSpace { .. })
    }
}
