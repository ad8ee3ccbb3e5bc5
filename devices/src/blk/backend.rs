//! Where a disk's contents live: [`BlkBackend`] (positioned reads and writes, a flush), a
//! host file ([`DiskFile`]: `pread`, `pwrite`, `fdatasync`), and [`MemDisk`], an in-memory
//! disk whose clones a test (or a monitor test without files) inspects.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::SECTOR_SIZE;

/// A disk's contents.
pub trait BlkBackend: Send {
    /// The disk's length in bytes: a non-zero multiple of 512, fixed for the backend's life.
    fn disk_len(&self) -> u64;
    /// Fills `buf` from byte `offset` (inside the disk; the device checks).
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at byte `offset` (inside the disk). When it returns, a read sees the
    /// data; it is durable only after [`flush`](Self::flush).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The file behind the disk, if there is one (the snapshot code reads blocks from it).
    fn file(&self) -> Option<&File> {
        None
    }
}

/// Why a disk file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file could not be opened (or created).
    #[error("disk {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// The file does not exist and no size was given to create it.
    #[error("disk {path}: no such file, and no size to create it with")]
    Missing { path: PathBuf },
    /// The path is not a regular file (a directory, a device...).
    #[error("disk {path}: not a regular file")]
    NotRegular { path: PathBuf },
    /// The file's length (or the size asked for) is 0 or not a multiple of 512.
    #[error("disk {path}: {len} bytes is not a non-zero multiple of 512")]
    BadSize { path: PathBuf, len: u64 },
    /// The new file could not be given its size.
    #[error("disk {path}: setting its size to {len} bytes: {source}")]
    SetLen {
        path: PathBuf,
        len: u64,
        source: io::Error,
    },
}

/// A disk in a regular host file, opened read-write (and close-on-exec).
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    len: u64,
}

fn size_ok(len: u64) -> bool {
    len > 0 && len.is_multiple_of(SECTOR_SIZE)
}

impl DiskFile {
    /// Opens the disk at `path`. A missing file is created, sparse, of `size` bytes when a
    /// size is given (an error otherwise); an existing file keeps its length, whatever
    /// `size` says (a warning is logged when they differ). The length must be a non-zero
    /// multiple of 512.
    pub fn open(path: &Path, size: Option<u64>) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let created = match size {
            Some(len) => {
                if !size_ok(len) {
                    return Err(DiskError::BadSize {
                        path: path.to_owned(),
                        len,
                    });
                }
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                {
                    Ok(file) => Some((file, len)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                    Err(e) => return Err(open_err(e)),
                }
            }
            None => None,
        };
        let file = match created {
            Some((file, len)) => {
                file.set_len(len).map_err(|source| DiskError::SetLen {
                    path: path.to_owned(),
                    len,
                    source,
                })?;
                log::info!("disk {}: created, {len} bytes (sparse)", path.display());
                file
            }
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        DiskError::Missing {
                            path: path.to_owned(),
                        }
                    } else {
                        open_err(e)
                    }
                })?,
        };
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(DiskError::NotRegular {
                path: path.to_owned(),
            });
        }
        let len = meta.len();
        if !size_ok(len) {
            return Err(DiskError::BadSize {
                path: path.to_owned(),
                len,
            });
        }
        if let Some(size) = size.filter(|&s| s != len) {
            log::warn!(
                "disk {}: exists with {len} bytes; the configured {size} is ignored",
                path.display()
            );
        }
        Ok(DiskFile {
            file,
            path: path.to_owned(),
            len,
        })
    }

    /// Where the disk is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// Another handle on the same open file (`dup`): a restored device in the same process
    /// can take it while the old one still holds its own.
    pub fn try_clone(&self) -> io::Result<DiskFile> {
        Ok(DiskFile {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            len: self.len,
        })
    }
}

impl BlkBackend for DiskFile {
    fn disk_len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

#[derive(Debug, Default)]
struct MemInner {
    data: Vec<u8>,
    flushes: u64,
    failing: bool,
    /// What was flushed last: the contents a crash would leave.
    durable: Vec<u8>,
}

/// An in-memory disk. Clones share the contents: keep one to look at what the device wrote,
/// count its flushes, or make it fail.
#[derive(Debug, Clone)]
pub struct MemDisk {
    inner: Arc<Mutex<MemInner>>,
}

impl MemDisk {
    /// A zeroed disk of `len` bytes (give a non-zero multiple of 512).
    pub fn new(len: usize) -> Self {
        MemDisk {
            inner: Arc::new(Mutex::new(MemInner {
                data: vec![0; len],
                durable: vec![0; len],
                ..MemInner::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The disk's contents now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// The contents as of the last flush (what survives a crash).
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Overwrites bytes at `offset` (a test preparing the disk).
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        let mut inner = self.lock();
        if let Some(dst) = inner.data.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Flushes done.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// From now on every read, write and flush fails with `EIO` (or works again).
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }
}

fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|o| Some(o..o.checked_add(n)?))
        .filter(|r| r.end <= len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the disk"))
}

impl BlkBackend for MemDisk {
    fn disk_len(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = self.lock();
        if inner.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let r = range(inner.data.len(), offset, buf.len())?;
        buf.copy_from_slice(&inner.data[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let r = range(inner.data.len(), offset, buf.len())?;
        inner.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        inner.flushes += 1;
        inner.durable = inner.data.clone();
        Ok(())
    }
}
