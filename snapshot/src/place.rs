//! Where a set goes: the destination's name and folder, whether an existing directory
//! there may be replaced, and the cleanup of what earlier writers left beside it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::manifest::MANIFEST_FILE;
use crate::{sys, SnapshotError};

pub(crate) fn file_name_of(dest: &Path) -> Result<String, SnapshotError> {
    dest.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| SnapshotError::Usage {
            dest: dest.to_path_buf(),
            partition: String::new(),
            message: "the destination must end in a UTF-8 directory name".into(),
        })
}

pub(crate) fn parent_dir_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// True if `dest` can be replaced: it is a snapshot set (has a manifest) or an empty dir.
pub(crate) fn replaceable(dest: &Path) -> Result<bool, SnapshotError> {
    match fs::symlink_metadata(dest) {
        Err(_) => Ok(true),
        Ok(md) if md.is_dir() => {
            if dest.join(MANIFEST_FILE).exists() {
                return Ok(true);
            }
            let mut entries =
                fs::read_dir(dest).map_err(|e| SnapshotError::io(dest, "reading directory", e))?;
            Ok(entries.next().is_none())
        }
        Ok(_) => Ok(false),
    }
}

/// Removes temporary directories left by writers that died (`<name>.tmp-*` not locked by a
/// live writer), and set directories moved aside by a finished fallback commit
/// (`<name>.old-*`, only while `<name>` itself exists).
pub(crate) fn remove_stale(parent: &Path, name: &str, dest: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let tmp_prefix = format!("{name}.tmp-");
    let old_prefix = format!("{name}.old-");
    for e in entries.flatten() {
        let fname = e.file_name();
        let Some(f) = fname.to_str() else { continue };
        let path = e.path();
        if f.starts_with(&tmp_prefix) {
            let unlocked = File::open(&path)
                .and_then(|d| sys::try_lock(&d))
                .unwrap_or(false);
            if unlocked {
                let _ = fs::remove_dir_all(&path);
            }
        } else if f.starts_with(&old_prefix) && dest.join(MANIFEST_FILE).exists() {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Removes a directory tree on a thread of its own (in place if no thread can be had).
pub(crate) fn remove_in_background(dir: PathBuf) {
    let d = dir.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshot-remove".into())
        .spawn(move || {
            let _ = fs::remove_dir_all(&d);
        });
    if spawned.is_err() {
        let _ = fs::remove_dir_all(&dir);
    }
}
