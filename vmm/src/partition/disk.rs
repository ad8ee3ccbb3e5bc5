//! A partition's disk on the monitor's side (`docs/blk.md`): the virtio-blk device of a run,
//! over the partition's backing file, wired at [`layout::BLK_MMIO`] / [`layout::BLK_GSI`],
//! built new for a cold boot or restored (and validated) from a saved state, and what
//! `status` shows of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use duplex_devices::blk::{BlkMmio, BlkMmioArgs, BlkMmioState, BlkStats, DiskFile};
use duplex_devices::persist::Persist;
use duplex_devices::virtio::Interrupt;
use duplex_devices::GuestMemoryMmap;

use super::shared::Shared;
use super::PartitionError;
use crate::config::{DiskConfig, PartitionConfig};
use crate::layout;

/// A run's disk: a virtio-mmio window in front of the backing file.
pub type Disk = BlkMmio<DiskFile>;

/// The `GET_ID` string of partition `name`'s disk: `duplex-<name>`, printable ASCII, at most
/// 20 bytes.
fn disk_id(name: &str) -> String {
    format!("duplex-{name}")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(20)
        .collect()
}

/// Opens the disk file of `config` (at `path`: the configured file, or a restored copy of
/// it), creating it sparse when missing; an existing file must have the configured size.
pub fn open_file(name: &str, config: &DiskConfig, path: &Path) -> Result<DiskFile, PartitionError> {
    let err = |message: String| PartitionError::Disk {
        name: name.to_owned(),
        message,
    };
    let file = DiskFile::open(path, Some(config.bytes())).map_err(|e| err(e.to_string()))?;
    let len = file
        .as_file()
        .metadata()
        .map_err(|e| err(e.to_string()))?
        .len();
    if len != config.bytes() {
        return Err(err(format!(
            "{} is {len} bytes, the config says {} MiB",
            path.display(),
            config.size_mib
        )));
    }
    Ok(file)
}

/// The run's disk, when the partition has one: `file` its backing file (opened by
/// [`open_file`]), its interrupt wired to [`layout::BLK_GSI`]; new for a cold boot
/// (`saved` is `None`), restored from `saved` otherwise.
pub fn build(
    config: &PartitionConfig,
    file: Option<DiskFile>,
    saved: Option<&BlkMmioState>,
    restoring: bool,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    shared: &Arc<Shared>,
) -> Result<Option<Arc<Disk>>, PartitionError> {
    let name = config.name.clone();
    let err = |message: String| PartitionError::Disk {
        name: name.clone(),
        message,
    };
    let file = match (&config.disk, file, saved) {
        (None, _, Some(_)) => return Err(err("the state has a disk, the config none".into())),
        (None, _, None) => return Ok(None),
        (Some(_), None, _) => return Err(err("the disk file is not open".into())),
        (Some(_), Some(_), None) if restoring => {
            return Err(err("the config has a disk, the state none".into()))
        }
        (Some(_), Some(file), _) => file,
    };
    let irqfd = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| err(format!("creating the disk's eventfd: {e}")))?;
    vm.register_irqfd(&irqfd, layout::BLK_GSI)
        .map_err(|e| err(format!("wiring the disk's interrupt: {e}")))?;
    let waker = Arc::downgrade(shared);
    let wake = Arc::new(move || {
        if let Some(s) = waker.upgrade() {
            s.wake_guest();
        }
    });
    let irq = Interrupt::new(irqfd, wake);
    let disk = match saved {
        None => BlkMmio::new(file, &disk_id(&name), mem.clone(), irq),
        Some(state) => {
            let args = BlkMmioArgs {
                backend: file,
                id: disk_id(&name),
                mem: mem.clone(),
                irq,
            };
            BlkMmio::restore(args, state)
        }
    }
    .map_err(|e| err(e.to_string()))?;
    Ok(Some(Arc::new(disk)))
}

/// A disk restored from a set into a file beside the partition's backing file, put in its
/// place ([`commit`](Self::commit), an atomic rename) only when the restore commits: until
/// then the running partition keeps its disk, and a restore that fails leaves it untouched.
/// Dropped without a commit, the file is removed.
#[derive(Debug)]
pub struct RestoredDisk {
    /// The restored copy (`<file>.restore-<set_id>`).
    pub path: PathBuf,
    /// The partition's backing file.
    target: PathBuf,
    committed: bool,
}

impl RestoredDisk {
    /// Writes partition `name`'s disk from `set` into a new file beside `config.file`.
    pub fn write(
        name: &str,
        config: &DiskConfig,
        set: &duplex_snapshot::SnapshotSet,
    ) -> Result<Self, PartitionError> {
        let err = |message: String| PartitionError::Disk {
            name: name.to_owned(),
            message,
        };
        let mut os = config.file.clone().into_os_string();
        os.push(format!(".restore-{}", set.manifest.set_id));
        let restored = RestoredDisk {
            path: PathBuf::from(os),
            target: config.file.clone(),
            committed: false,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&restored.path)
            .map_err(|e| err(format!("creating {}: {e}", restored.path.display())))?;
        set.restore_disk(name, &file)
            .map_err(|e| err(format!("restoring it from the set: {e}")))?;
        Ok(restored)
    }

    /// Puts the restored disk in place of the partition's backing file (the run built on
    /// it keeps its open file).
    pub fn commit(mut self) -> Result<(), std::io::Error> {
        std::fs::rename(&self.path, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for RestoredDisk {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What `status` shows of a partition's disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    /// The backing file.
    pub file: String,
    /// Its size in MiB.
    pub size_mib: u64,
    /// The device's counters in the current run (or the last one).
    pub counters: BlkStats,
}

impl DiskStatus {
    pub fn new(config: &DiskConfig, counters: BlkStats) -> Self {
        DiskStatus {
            file: config.file.display().to_string(),
            size_mib: config.size_mib,
            counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids_fit_in_twenty_bytes() {
        assert_eq!(disk_id("controller"), "duplex-controller");
        assert_eq!(disk_id("a-very-long-partition-name").len(), 20);
        assert_eq!(disk_id("é"), "duplex-_");
    }
}
