//! A partition's disk in the device config (`docs/config.md`, `docs/blk.md`): the host file
//! that backs its virtio-blk device, and the disk's size when the file is created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest disk, in MiB (1 TiB).
pub const MAX_DISK_MIB: u64 = 1 << 20;

/// A partition's virtio-blk disk, backed by a regular host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The backing file, relative to the config file's directory or absolute; unique among
    /// partitions. Created (sparse, of `size_mib`) when it does not exist; an existing file
    /// keeps its contents and must be `size_mib` long.
    pub file: PathBuf,
    /// The disk's size in MiB, 1 to [`MAX_DISK_MIB`].
    pub size_mib: u64,
}

impl DiskConfig {
    /// The disk's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.size_mib << 20
    }
}

/// Checks one partition's disk: the field at fault and the problem, if any.
pub(super) fn check(disk: &DiskConfig) -> Result<(), (&'static str, String)> {
    if disk.file.as_os_str().is_empty() {
        return Err(("disk.file", "must not be empty".into()));
    }
    if disk.size_mib == 0 || disk.size_mib > MAX_DISK_MIB {
        return Err((
            "disk.size_mib",
            format!("{} is out of range 1..={MAX_DISK_MIB}", disk.size_mib),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_needs_a_file_and_a_size_in_range() {
        let d = |file: &str, size_mib| DiskConfig {
            file: file.into(),
            size_mib,
        };
        assert_eq!(check(&d("c.disk", 256)), Ok(()));
        assert_eq!(d("c.disk", 256).bytes(), 256 << 20);
        assert_eq!(check(&d("", 1)).map_err(|e| e.0), Err("disk.file"));
        assert_eq!(check(&d("c", 0)).map_err(|e| e.0), Err("disk.size_mib"));
        assert_eq!(
            check(&d("c", MAX_DISK_MIB + 1)).map_err(|e| e.0),
            Err("disk.size_mib")
        );
    }
}
