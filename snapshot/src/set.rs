//! Opening a committed snapshot set: the manifest's seal and consistency, the files'
//! presence and lengths, and the parent chain of an incremental set; verifying every
//! checksum; reading a partition's state.

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::manifest::{
    self, Manifest, PartitionEntry, MANIFEST_FILE, MAX_CHAIN, MAX_MANIFEST_BYTES,
};
use crate::memfile::PageBits;
use crate::sys::PAGE;
use crate::SnapshotError;
use crate::{crc, sys};

/// A committed, opened snapshot set (and, for an incremental set, its parent chain).
#[derive(Debug, Clone)]
pub struct SnapshotSet {
    /// The set's directory.
    pub dir: PathBuf,
    /// Its manifest, sealed and validated.
    pub manifest: Manifest,
    /// The opened parent set, for an incremental set.
    pub parent: Option<Box<SnapshotSet>>,
}

/// What `verify` checked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyStats {
    /// Sets checked (1 + the parents).
    pub sets: usize,
    /// Files checked, manifests included.
    pub files: usize,
    /// Bytes read (memory files: their data extents only).
    pub bytes_read: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Opens `dir/file` once, without following a symbolic link (`O_NOFOLLOW`) or blocking on
/// a FIFO, and checks with `fstat` on that descriptor that it is a regular file: whatever
/// is then read is read from this descriptor, never from the path again.
fn open_file(dir: &Path, file: &str) -> Result<File, SnapshotError> {
    let path = dir.join(file);
    let corrupt = |message: &str| SnapshotError::Corrupt {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        message: message.into(),
    };
    let f = sys::open_nofollow(&path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => SnapshotError::Missing {
            dir: dir.to_path_buf(),
            file: file.to_string(),
        },
        _ if e.raw_os_error() == Some(libc::ELOOP) => {
            corrupt("is a symbolic link (a set's files are regular files)")
        }
        _ => SnapshotError::io(&path, "opening", e),
    })?;
    let md = f
        .metadata()
        .map_err(|e| SnapshotError::io(&path, "stat", e))?;
    if !md.is_file() {
        return Err(corrupt("is not a regular file"));
    }
    Ok(f)
}

/// Opens `dir/file` (see `open_file`) and checks its length against the manifest.
pub(crate) fn open_checked(dir: &Path, file: &str, expected: u64) -> Result<File, SnapshotError> {
    let f = open_file(dir, file)?;
    let md = f
        .metadata()
        .map_err(|e| SnapshotError::io(&dir.join(file), "stat", e))?;
    if md.len() != expected {
        return Err(SnapshotError::Truncated {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            expected,
            found: md.len(),
        });
    }
    Ok(f)
}

/// Reads `dir/file`, opened once (see `open_file`), whole: at most `cap` bytes.
fn read_file_capped(dir: &Path, file: &str, cap: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = open_file(dir, file)?;
    sys::read_capped(&f, cap).map_err(|e| match e {
        sys::ReadCapped::TooLong(len) => SnapshotError::Corrupt {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            message: format!("is {len} bytes long, over the cap of {cap} bytes"),
        },
        sys::ReadCapped::Io(e) => SnapshotError::io(&dir.join(file), "reading", e),
    })
}

/// The bytes of `dir/manifest.json`: a regular file (no symbolic link) of at most
/// [`MAX_MANIFEST_BYTES`], read from the descriptor that was checked.
pub(crate) fn manifest_bytes(dir: &Path) -> Result<Vec<u8>, SnapshotError> {
    read_file_capped(dir, MANIFEST_FILE, MAX_MANIFEST_BYTES)
}

/// Reads and unseals `dir/manifest.json`.
pub(crate) fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    manifest::unseal(dir, &manifest_bytes(dir)?)
}

/// If `dir` is missing but a fallback commit left the previous set at `<dir>.old-<id>`
/// (a crash between its two renames), renames that set back to `dir`.
fn recover(dir: &Path) {
    if fs::symlink_metadata(dir).is_ok() {
        return;
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
    else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!("{name}.old-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let mut olds: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|f| f.starts_with(&prefix))
        })
        .map(|e| e.path())
        // A directory, not a symbolic link to one.
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
        .filter(|p| read_manifest(p).is_ok())
        .collect();
    if olds.len() == 1 {
        if let Some(old) = olds.pop() {
            if fs::rename(&old, dir).is_ok() {
                let _ = crate::sys::fsync_dir(parent);
            }
        }
    }
}

impl SnapshotSet {
    /// Opens a set and validates it without reading memory: the manifest's seal, version
    /// and fields; every listed file exists with its recorded length; the parent chain is
    /// present, has the recorded set ids and the same RAM layout (and, for a partition with
    /// a disk, a disk of the same length) per partition.
    pub fn open(dir: &Path) -> Result<SnapshotSet, SnapshotError> {
        recover(dir);
        Self::open_depth(dir, 0)
    }

    fn open_depth(dir: &Path, depth: usize) -> Result<SnapshotSet, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::Io {
                path: dir.to_path_buf(),
                op: "opening snapshot set",
                source: io::Error::new(ErrorKind::NotFound, "no such directory"),
            });
        }
        let manifest = read_manifest(dir)?;
        for (file, entry) in &manifest.files {
            open_checked(dir, file, entry.len)?;
        }
        let parent = match &manifest.parent {
            None => None,
            Some(pref) => {
                if depth + 1 >= MAX_CHAIN {
                    return Err(SnapshotError::parent(
                        dir,
                        format!("the parent chain is longer than {MAX_CHAIN} sets"),
                    ));
                }
                let pdir = parent_dir(dir, &pref.path)?;
                let p = Self::open_depth(&pdir, depth + 1).map_err(|e| {
                    SnapshotError::parent(dir, format!("{} cannot be used: {e}", pdir.display()))
                })?;
                if p.manifest.set_id != pref.set_id {
                    return Err(SnapshotError::parent(
                        dir,
                        format!(
                            "{} is set {}, this set was taken on top of set {}",
                            pdir.display(),
                            p.manifest.set_id,
                            pref.set_id
                        ),
                    ));
                }
                for part in &manifest.partitions {
                    match p.partition(&part.name) {
                        None => {
                            return Err(SnapshotError::parent(
                                dir,
                                format!("{} has no partition {:?}", pdir.display(), part.name),
                            ))
                        }
                        Some(pp) if pp.ram != part.ram => {
                            return Err(SnapshotError::parent(
                                dir,
                                format!(
                                    "partition {:?} has another RAM layout in {}",
                                    part.name,
                                    pdir.display()
                                ),
                            ))
                        }
                        Some(pp) => check_parent_disk(dir, &pdir, part, pp)?,
                    }
                }
                Some(Box::new(p))
            }
        };
        Ok(SnapshotSet {
            dir: dir.to_path_buf(),
            manifest,
            parent,
        })
    }

    /// This set followed by its parents, the full set last.
    pub fn chain(&self) -> Vec<&SnapshotSet> {
        let mut v = vec![self];
        let mut s = self.parent.as_deref();
        while let Some(p) = s {
            v.push(p);
            s = p.parent.as_deref();
        }
        v
    }

    /// A partition's entry.
    pub fn partition(&self, name: &str) -> Option<&PartitionEntry> {
        self.manifest.partitions.iter().find(|p| p.name == name)
    }

    pub(crate) fn partition_or_err(&self, name: &str) -> Result<&PartitionEntry, SnapshotError> {
        self.partition(name)
            .ok_or_else(|| SnapshotError::NoPartition {
                dir: self.dir.clone(),
                name: name.to_string(),
            })
    }

    /// Verifies every checksum of the set and its parent chain: each manifest's seal, each
    /// state and pages file's CRC-32, each memory and disk file's page CRC.
    pub fn verify(&self) -> Result<VerifyStats, SnapshotError> {
        let started = Instant::now();
        let mut stats = VerifyStats::default();
        for set in self.chain() {
            let dir = &set.dir;
            if read_manifest(dir)? != set.manifest {
                return Err(SnapshotError::manifest(
                    dir,
                    "changed on disk since the set was opened",
                ));
            }
            stats.sets += 1;
            stats.files += 1;
            for (name, entry) in &set.manifest.files {
                let f = open_checked(dir, name, entry.len)?;
                let is_mem = set
                    .manifest
                    .partitions
                    .iter()
                    .any(|p| p.images().iter().any(|(image, _, _)| image == name));
                let path = dir.join(name);
                let (crc, read) = if is_mem {
                    crc::checksum(&f, entry.len)
                } else {
                    crc::whole_file_crc(&f)
                }
                .map_err(|e| SnapshotError::io(&path, "reading", e))?;
                if read != entry.len && !is_mem {
                    return Err(SnapshotError::Truncated {
                        dir: dir.clone(),
                        file: name.clone(),
                        expected: entry.len,
                        found: read,
                    });
                }
                if crc != entry.crc32 {
                    return Err(SnapshotError::Checksum {
                        dir: dir.clone(),
                        file: name.clone(),
                        expected: entry.crc32,
                        found: crc,
                    });
                }
                stats.files += 1;
                stats.bytes_read += read;
            }
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    /// Reads a partition's state file, checking its length and CRC-32.
    pub fn read_state(&self, name: &str) -> Result<Vec<u8>, SnapshotError> {
        let p = self.partition_or_err(name)?;
        self.read_small(&p.state_file)
    }

    /// Reads a device-wide state file (see [`SetWriter::write_device_state`]), checking its
    /// length and CRC-32; `None` when the set has no state for `component`.
    ///
    /// [`SetWriter::write_device_state`]: crate::SetWriter::write_device_state
    pub fn read_device_state(&self, component: &str) -> Result<Option<Vec<u8>>, SnapshotError> {
        match self.manifest.device_states.get(component) {
            None => Ok(None),
            Some(file) => self.read_small(file).map(Some),
        }
    }

    /// Reads a small file of the set whole, checking its length and CRC-32.
    /// The file is read from the descriptor whose length was checked, and never beyond
    /// that length (which the manifest's caps bound).
    pub(crate) fn read_small(&self, file: &str) -> Result<Vec<u8>, SnapshotError> {
        let entry = self.manifest.files.get(file).copied().ok_or_else(|| {
            SnapshotError::manifest(&self.dir, format!("file {file} is not in field files"))
        })?;
        let f = open_checked(&self.dir, file, entry.len)?;
        let bytes = sys::read_capped(&f, entry.len).map_err(|e| match e {
            sys::ReadCapped::TooLong(found) => SnapshotError::Truncated {
                dir: self.dir.clone(),
                file: file.to_string(),
                expected: entry.len,
                found,
            },
            sys::ReadCapped::Io(e) => SnapshotError::io(&self.dir.join(file), "reading", e),
        })?;
        if bytes.len() as u64 != entry.len {
            return Err(SnapshotError::Truncated {
                dir: self.dir.clone(),
                file: file.to_string(),
                expected: entry.len,
                found: bytes.len() as u64,
            });
        }
        let crc = crc32fast::hash(&bytes);
        if crc != entry.crc32 {
            return Err(SnapshotError::Checksum {
                dir: self.dir.clone(),
                file: file.to_string(),
                expected: entry.crc32,
                found: crc,
            });
        }
        Ok(bytes)
    }

    /// The pages of a partition's memory file this (incremental) set holds; `None` for a
    /// full set, which holds them all.
    pub fn present_pages(&self, name: &str) -> Result<Option<PageBits>, SnapshotError> {
        let p = self.partition_or_err(name)?;
        self.present_bits(p.pages_file.as_deref(), p.memory_len())
    }

    /// Reads a pages file (`None`: a full set's image, which holds every page) of an image
    /// of `len` bytes, checking its length, CRC-32, header and bits.
    pub(crate) fn present_bits(
        &self,
        pages_file: Option<&str>,
        len: u64,
    ) -> Result<Option<PageBits>, SnapshotError> {
        let Some(pf) = pages_file else {
            return Ok(None);
        };
        let bytes = self.read_small(pf)?;
        PageBits::decode(&bytes, len / PAGE as u64)
            .map(Some)
            .map_err(|message| SnapshotError::Corrupt {
                dir: self.dir.clone(),
                file: pf.to_string(),
                message,
            })
    }
}

/// The directory of the parent set named by `path` (`../<name>`, checked by the manifest's
/// rules): `<name>` next to `dir` itself, resolved without `..` (so a set reached through
/// a symbolic link still finds its parent beside the link), and refused if it is a
/// symbolic link (the parent must be a directory of the set's own directory's parent).
fn parent_dir(dir: &Path, path: &str) -> Result<PathBuf, SnapshotError> {
    let name = manifest::parent_dir_name(path).map_err(|e| SnapshotError::manifest(dir, e))?;
    let pdir = crate::place::parent_dir_of(dir).join(name);
    if fs::symlink_metadata(&pdir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(SnapshotError::parent(
            dir,
            format!(
                "{} is a symbolic link: a parent set must be a directory beside the set",
                pdir.display()
            ),
        ));
    }
    Ok(pdir)
}

/// A partition's disk in an incremental set at `dir` needs one of the same length in the
/// parent at `pdir` (its blocks are resolved against the parent's).
fn check_parent_disk(
    dir: &Path,
    pdir: &Path,
    part: &PartitionEntry,
    parent: &PartitionEntry,
) -> Result<(), SnapshotError> {
    let Some(d) = &part.disk else {
        return Ok(());
    };
    match &parent.disk {
        Some(pd) if pd.len == d.len => Ok(()),
        Some(pd) => Err(SnapshotError::parent(
            dir,
            format!(
                "partition {:?} has a disk of {} bytes, {} one of {} bytes",
                part.name,
                d.len,
                pdir.display(),
                pd.len
            ),
        )),
        None => Err(SnapshotError::parent(
            dir,
            format!(
                "partition {:?} has a disk, in {} it has none",
                part.name,
                pdir.display()
            ),
        )),
    }
}
