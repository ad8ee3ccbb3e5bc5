//! Writing a snapshot set: every file goes into a temporary sibling directory
//! `<dest>.tmp-<set_id>`, and `commit` fsyncs it and puts it at `<dest>` atomically, so that
//! a crash at any point leaves either the old or the new set valid at `<dest>`.

mod image;

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::manifest::{
    self, DiskEntry, FileEntry, Manifest, ParentRef, PartitionEntry, RamRegion, FORMAT_VERSION,
    MANIFEST_FILE, MIN_FORMAT_VERSION,
};
use crate::memfile::MemoryWriteStats;
use crate::place::{
    file_name_of, parent_dir_of, remove_in_background, remove_stale, replaceable, WRITER_MARK,
};
use crate::{sys, SnapshotError, SnapshotSet};
use image::ImageKind;

/// What `commit` did and how long it took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommitStats {
    /// Time spent in fsync (every file, then the temporary directory).
    pub fsync: Duration,
    /// Time spent putting the set in place (rename, parent directory fsync, removing the
    /// old set).
    pub rename: Duration,
    /// Time `commit` took in all.
    pub total: Duration,
    /// Bytes written for the whole set: page data, state, pages files, manifest.
    pub bytes_written: u64,
    /// Sum of the files' lengths (holes included).
    pub file_bytes: u64,
}

/// A point in `commit` where a test stops as if the process had died (only tests set it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// Everything written and fsynced, nothing renamed.
    BeforeRename,
    /// New set exchanged into place, old set not yet removed.
    AfterExchange,
    /// (Fallback path) old set moved aside, new set not yet in place.
    AfterMoveOld,
}

/// A partition as written so far.
struct Part {
    name: String,
    /// The guest RAM layout, once its memory is written.
    ram: Option<Vec<RamRegion>>,
    memory: Option<image::Image>,
    disk: Option<image::Image>,
    state: bool,
}

/// The parent of the set being written.
struct ParentInfo {
    set_id: String,
    path: String,
    partitions: Vec<PartitionEntry>,
}

/// A snapshot set being written; see the crate docs.
pub struct SetWriter {
    dest: PathBuf,
    tmp: PathBuf,
    /// The temporary directory, kept open with an exclusive `flock` so that another
    /// writer's stale-directory cleanup leaves it alone.
    _lock: File,
    set_id: String,
    parent: Option<ParentInfo>,
    parts: Vec<Part>,
    files: BTreeMap<String, FileEntry>,
    device_states: BTreeMap<String, String>,
    open: Vec<(PathBuf, File)>,
    bytes_written: u64,
    done: bool,
    /// Tests: stop `commit` at this point as if the process died.
    pub(crate) crash: Option<CrashPoint>,
    /// Tests: behave as if the file system had no `RENAME_EXCHANGE`.
    pub(crate) no_exchange: bool,
}

impl SetWriter {
    /// Starts a set to be committed at `dest`: writes into a temporary sibling directory
    /// `<dest>.tmp-<set_id>`. With a `parent` the set is incremental: its memory files hold
    /// only the pages dirtied since `parent`.
    pub fn create(dest: &Path, parent: Option<&SnapshotSet>) -> Result<SetWriter, SnapshotError> {
        let name = file_name_of(dest)?;
        let usage = |message: String| SnapshotError::Usage {
            dest: dest.to_path_buf(),
            partition: String::new(),
            message,
        };
        if !replaceable(dest)? {
            return Err(usage(
                "the destination exists and is neither a snapshot set nor an empty directory; \
                 refusing to replace it"
                    .into(),
            ));
        }
        let pdir = parent_dir_of(dest);
        fs::create_dir_all(&pdir).map_err(|e| SnapshotError::io(&pdir, "creating", e))?;
        remove_stale(&pdir, &name, dest);

        let parent = match parent {
            None => None,
            Some(p) => Some(Self::parent_info(dest, &pdir, p, &usage)?),
        };
        let set_id =
            sys::random_hex(16).map_err(|e| SnapshotError::io(dest, "getrandom for", e))?;
        let tmp = pdir.join(format!("{name}.tmp-{set_id}"));
        DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| SnapshotError::io(&tmp, "creating", e))?;
        let lock = match File::open(&tmp).and_then(|d| sys::try_lock(&d).map(|_| d)) {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(SnapshotError::io(&tmp, "locking", e));
            }
        };
        // The mark that makes the directory a writer's leftover should this writer die.
        let mark = tmp.join(WRITER_MARK);
        if let Err(e) = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&mark)
        {
            let _ = fs::remove_dir_all(&tmp);
            return Err(SnapshotError::io(&mark, "creating", e));
        }
        Ok(SetWriter {
            dest: dest.to_path_buf(),
            tmp,
            _lock: lock,
            set_id,
            parent,
            parts: Vec::new(),
            files: BTreeMap::new(),
            device_states: BTreeMap::new(),
            open: Vec::new(),
            bytes_written: 0,
            done: false,
            crash: None,
            no_exchange: false,
        })
    }

    fn parent_info(
        dest: &Path,
        pdir: &Path,
        p: &SnapshotSet,
        usage: &dyn Fn(String) -> SnapshotError,
    ) -> Result<ParentInfo, SnapshotError> {
        let canon =
            |d: &Path| fs::canonicalize(d).map_err(|e| SnapshotError::io(d, "resolving", e));
        let pcanon = canon(&p.dir)?;
        if let Ok(dcanon) = fs::canonicalize(dest) {
            let mut s = Some(p);
            while let Some(set) = s {
                if canon(&set.dir)? == dcanon {
                    return Err(usage(format!(
                        "an incremental set cannot replace a set of its own parent chain ({})",
                        set.dir.display()
                    )));
                }
                s = set.parent.as_deref();
            }
        }
        // The parent is recorded as a sibling, `../<name>` (so that sets move together);
        // readers accept nothing else (see `manifest::parent_dir_name`).
        let same_dir = pcanon.parent().map(Path::to_path_buf) == Some(canon(pdir)?);
        let path = match (same_dir, pcanon.file_name().and_then(|n| n.to_str())) {
            (true, Some(n)) => format!("../{n}"),
            _ => {
                return Err(usage(format!(
                    "the parent set {} is not in the destination's directory {}: an incremental \
                     set's parent must be a sibling of it",
                    p.dir.display(),
                    pdir.display()
                )))
            }
        };
        manifest::parent_dir_name(&path).map_err(usage)?;
        Ok(ParentInfo {
            set_id: p.manifest.set_id.clone(),
            path,
            partitions: p.manifest.partitions.clone(),
        })
    }

    /// The new set's id.
    pub fn set_id(&self) -> &str {
        &self.set_id
    }

    /// The temporary directory the set is written into.
    pub fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    fn usage(&self, partition: &str, message: impl Into<String>) -> SnapshotError {
        SnapshotError::Usage {
            dest: self.dest.clone(),
            partition: partition.to_string(),
            message: message.into(),
        }
    }

    fn part(&mut self, name: &str) -> Result<usize, SnapshotError> {
        manifest::check_name(name).map_err(|m| self.usage(name, m))?;
        if let Some(i) = self.parts.iter().position(|p| p.name == name) {
            return Ok(i);
        }
        self.parts.push(Part {
            name: name.to_string(),
            ram: None,
            memory: None,
            disk: None,
            state: false,
        });
        Ok(self.parts.len() - 1)
    }

    fn new_file(&mut self, fname: &str) -> Result<(PathBuf, File), SnapshotError> {
        let path = self.tmp.join(fname);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SnapshotError::io(&path, "creating", e))?;
        Ok((path, f))
    }

    fn write_small(&mut self, fname: &str, bytes: &[u8]) -> Result<(), SnapshotError> {
        let (path, mut f) = self.new_file(fname)?;
        f.write_all(bytes)
            .map_err(|e| SnapshotError::io(&path, "writing", e))?;
        self.files.insert(
            fname.to_string(),
            FileEntry {
                len: bytes.len() as u64,
                crc32: crc32fast::hash(bytes),
            },
        );
        self.bytes_written += bytes.len() as u64;
        self.open.push((path, f));
        Ok(())
    }

    /// Writes a partition's memory: every resident non-zero page (full set), or only the
    /// pages set in `dirty` (incremental set: one bitmap per RAM region, in `mem`'s region
    /// order, bit `i % 64` of word `i / 64` for page `i`, as KVM's dirty log gives it).
    /// For a stop-and-copy set the partition is paused meanwhile. A live snapshot calls it
    /// while the partition runs, then [`update_memory`](Self::update_memory) paused with
    /// every page written since this call began (KVM's dirty log and the devices' bitmap,
    /// both cleared before it).
    pub fn write_memory<B: Bitmap>(
        &mut self,
        partition: &str,
        mem: &GuestMemoryMmap<B>,
        dirty: Option<&[Vec<u64>]>,
    ) -> Result<MemoryWriteStats, SnapshotError> {
        let i = self.part(partition)?;
        self.check_new_image(i, ImageKind::Memory, dirty.is_some())?;
        if let Some(p) = &self.parent {
            let ram = ram_layout(mem);
            match p.partitions.iter().find(|e| e.name == partition) {
                None => return Err(self.usage(partition, "the parent set has no such partition")),
                Some(e) if e.ram != ram => {
                    return Err(self.usage(
                        partition,
                        "the guest RAM layout differs from the parent set's",
                    ))
                }
                Some(_) => {}
            }
        }
        let (stats, ram) = self.write_image(i, ImageKind::Memory, mem, dirty)?;
        self.parts[i].ram = Some(ram);
        Ok(stats)
    }

    /// Writes again the pages set in `delta` (one bitmap per RAM region, as for
    /// [`write_memory`](Self::write_memory)) over the partition's memory file: the second
    /// pass of a live snapshot. `write_memory` may run while the guest runs, as long as
    /// every page written meanwhile is in `delta` (KVM's dirty log and the devices' bitmap,
    /// both cleared before `write_memory` started); `update_memory` runs with the partition
    /// paused. The set then holds memory as it was at the pause. For an incremental set the
    /// pages of `delta` join those it holds.
    pub fn update_memory<B: Bitmap>(
        &mut self,
        partition: &str,
        mem: &GuestMemoryMmap<B>,
        delta: &[Vec<u64>],
    ) -> Result<MemoryWriteStats, SnapshotError> {
        let i = self.part(partition)?;
        if let Some(ram) = &self.parts[i].ram {
            if *ram != ram_layout(mem) {
                return Err(self.usage(partition, "the guest RAM layout changed between passes"));
            }
        }
        self.update_image(i, ImageKind::Memory, mem, delta)
    }

    /// Writes a device-wide state (one that belongs to no single partition, such as the
    /// vsock switch's table) as `<component>.devstate`, checksummed like a state file;
    /// [`SnapshotSet::read_device_state`] reads it back.
    pub fn write_device_state(
        &mut self,
        component: &str,
        state: &[u8],
    ) -> Result<(), SnapshotError> {
        manifest::check_name(component).map_err(|m| self.usage("", m))?;
        if self.device_states.contains_key(component) {
            return Err(self.usage("", format!("device state {component} written twice")));
        }
        let file = format!("{component}.devstate");
        self.write_small(&file, state)?;
        self.device_states.insert(component.to_string(), file);
        Ok(())
    }

    /// Writes a partition's state: opaque bytes (the monitor's JSON of vCPU/VM/device state).
    pub fn write_state(&mut self, partition: &str, state: &[u8]) -> Result<(), SnapshotError> {
        let i = self.part(partition)?;
        if self.parts[i].state {
            return Err(self.usage(partition, "state written twice"));
        }
        self.write_small(&format!("{partition}.state"), state)?;
        self.parts[i].state = true;
        Ok(())
    }

    fn manifest(&self, device_config: Value, extra: Value) -> Result<Manifest, SnapshotError> {
        if self.parts.is_empty() {
            return Err(self.usage("", "no partition was written"));
        }
        let mut partitions = Vec::new();
        let incremental = self.parent.is_some();
        for p in &self.parts {
            let (Some(ram), Some(memory)) = (p.ram.clone(), &p.memory) else {
                return Err(self.usage(&p.name, "its memory was not written"));
            };
            if !p.state {
                return Err(self.usage(&p.name, "its state was not written"));
            }
            partitions.push(PartitionEntry {
                name: p.name.clone(),
                memory_file: memory.file.clone(),
                state_file: format!("{}.state", p.name),
                pages_file: memory.pages_file_name(),
                ram,
                memory_bytes_written: memory.bytes_written,
                incremental,
                disk: p.disk.as_ref().map(|d| DiskEntry {
                    file: d.file.clone(),
                    pages_file: d.pages_file_name(),
                    len: d.len,
                    bytes_written: d.bytes_written,
                    incremental,
                }),
            });
        }
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The oldest version that describes the set, so that a monitor of version 2 still
        // restores a set without disks.
        let format_version = if partitions.iter().any(|p| p.disk.is_some()) {
            FORMAT_VERSION
        } else {
            MIN_FORMAT_VERSION
        };
        Ok(Manifest {
            format_version,
            set_id: self.set_id.clone(),
            created_unix_ms,
            device_config,
            partitions,
            parent: self.parent.as_ref().map(|p| ParentRef {
                set_id: p.set_id.clone(),
                path: p.path.clone(),
            }),
            files: self.files.clone(),
            device_states: self.device_states.clone(),
            extra,
        })
    }

    /// Writes the manifest, fsyncs every file and the temporary directory, then puts the set
    /// at `dest` atomically (an existing set there is swapped out with
    /// `renameat2(RENAME_EXCHANGE)` and removed), and fsyncs `dest`'s parent directory.
    /// On any error before the set is in place the temporary directory is removed and
    /// `dest` is unchanged.
    pub fn commit(
        mut self,
        device_config: Value,
        extra: Value,
    ) -> Result<CommitStats, SnapshotError> {
        let started = Instant::now();
        self.finish_images()?;
        let m = self.manifest(device_config, extra)?;
        manifest::validate(&self.tmp, &m)?;
        let sealed = manifest::seal(&m)
            .map_err(|e| SnapshotError::manifest(&self.tmp, format!("serializing: {e}")))?;
        let (mpath, mut mfile) = self.new_file(MANIFEST_FILE)?;
        mfile
            .write_all(&sealed)
            .map_err(|e| SnapshotError::io(&mpath, "writing", e))?;
        self.bytes_written += sealed.len() as u64;
        self.open.push((mpath, mfile));
        // Sealed: the directory is a set now, which is what tells it from foreign ones.
        let mark = self.tmp.join(WRITER_MARK);
        fs::remove_file(&mark).map_err(|e| SnapshotError::io(&mark, "removing", e))?;

        let t = Instant::now();
        for (path, f) in &self.open {
            f.sync_all()
                .map_err(|e| SnapshotError::io(path, "fsync", e))?;
        }
        sys::fsync_dir(&self.tmp).map_err(|e| SnapshotError::io(&self.tmp, "fsync", e))?;
        let fsync = t.elapsed();

        let t = Instant::now();
        self.put_in_place()?;
        let stats = CommitStats {
            fsync,
            rename: t.elapsed(),
            total: started.elapsed(),
            bytes_written: self.bytes_written,
            file_bytes: m.files.values().map(|f| f.len).sum::<u64>() + sealed.len() as u64,
        };
        Ok(stats)
    }

    /// True if a test asked to stop here; the directories are then left as they are.
    fn crash_at(&mut self, point: CrashPoint) -> bool {
        if self.crash == Some(point) {
            self.done = true;
            return true;
        }
        false
    }

    fn put_in_place(&mut self) -> Result<(), SnapshotError> {
        use CrashPoint::*;
        let pdir = parent_dir_of(&self.dest);
        if !replaceable(&self.dest)? {
            return Err(self.usage(
                "",
                "the destination appeared meanwhile and is not a snapshot set; refusing to \
                 replace it",
            ));
        }
        if self.crash_at(BeforeRename) {
            return Ok(());
        }
        let sync_parent =
            |d: &Path| sys::fsync_dir(d).map_err(|e| SnapshotError::io(d, "fsync", e));
        if fs::symlink_metadata(&self.dest).is_err() {
            fs::rename(&self.tmp, &self.dest)
                .map_err(|e| SnapshotError::io(&self.dest, "renaming the new set to", e))?;
            self.done = true;
            return sync_parent(&pdir);
        }
        let exchanged = if self.no_exchange {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            sys::rename_exchange(&self.tmp, &self.dest)
        };
        match exchanged {
            Ok(()) => {
                // `tmp` now names the old set.
                self.done = true;
                if self.crash_at(AfterExchange) {
                    return Ok(());
                }
                sync_parent(&pdir)?;
                // The old set is no longer needed; removing its files takes milliseconds
                // (more for large sets), so it goes on a thread of its own. Should the process
                // die first, the directory is a stale `<name>.tmp-*` that the next writer
                // removes.
                remove_in_background(self.tmp.clone());
                Ok(())
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                // No RENAME_EXCHANGE here: move the old set aside first. A crash between the
                // two renames leaves no `dest` but `<dest>.old-<id>`, which `open` renames back.
                let name = file_name_of(&self.dest)?;
                let old = pdir.join(format!("{name}.old-{}", self.set_id));
                fs::rename(&self.dest, &old)
                    .map_err(|e| SnapshotError::io(&self.dest, "moving the old set aside", e))?;
                if self.crash_at(AfterMoveOld) {
                    return Ok(());
                }
                if let Err(e) = fs::rename(&self.tmp, &self.dest) {
                    let _ = fs::rename(&old, &self.dest);
                    return Err(SnapshotError::io(&self.dest, "renaming the new set to", e));
                }
                self.done = true;
                sync_parent(&pdir)?;
                remove_in_background(old);
                Ok(())
            }
            Err(e) => Err(SnapshotError::io(
                &self.dest,
                "exchanging the new set with",
                e,
            )),
        }
    }
}

/// The RAM regions of `mem`, in order, as a manifest records them.
fn ram_layout<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<RamRegion> {
    mem.iter()
        .map(|r| RamRegion {
            gpa: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

impl Drop for SetWriter {
    /// An uncommitted (or failed) writer removes its temporary directory.
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}
