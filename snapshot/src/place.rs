//! Where a set goes: the destination's name and folder, whether an existing directory
//! there may be replaced, and the cleanup of what earlier writers left beside it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::{manifest, sys, SnapshotError};

/// The file a writer creates first in its temporary directory (and removes at commit): what
/// tells a dead writer's directory from anything else that happens to be named
/// `<dest>.tmp-*`.
pub(crate) const WRITER_MARK: &str = ".duplex-writing";

/// True if `dir` is a directory (not a symbolic link to one) whose `manifest.json` is a
/// Duplex manifest: a regular file within the size cap, its seal well formed and matching
/// (see `manifest::is_sealed`). A directory that merely holds a file of that name is not.
pub(crate) fn is_set_dir(dir: &Path) -> bool {
    fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
        && crate::set::manifest_bytes(dir).is_ok_and(|b| manifest::is_sealed(&b))
}

/// True if `dir` is what a writer leaves behind: a directory (not a symbolic link) that
/// holds the writer's mark, or a set (an old set moved aside by a commit).
fn is_leftover(dir: &Path) -> bool {
    fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
        && (fs::symlink_metadata(dir.join(WRITER_MARK)).is_ok_and(|m| m.is_file())
            || is_set_dir(dir))
}

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

/// True if `dest` can be replaced: nothing is there, or a directory that is a snapshot set
/// (its manifest unseals, see [`is_set_dir`]) or empty. Never a symbolic link, a file, or a
/// directory that only holds a file named `manifest.json`.
pub(crate) fn replaceable(dest: &Path) -> Result<bool, SnapshotError> {
    match fs::symlink_metadata(dest) {
        Err(_) => Ok(true),
        Ok(md) if md.is_dir() => {
            if is_set_dir(dest) {
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
/// (`<name>.old-*`, only while `<name>` itself holds a set). Only writers' leftovers go
/// (directories holding the writer's mark, or sets): never a symbolic link, a file, or a
/// directory of someone else's that happens to have such a name.
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
        if !(f.starts_with(&tmp_prefix) || f.starts_with(&old_prefix)) || !is_leftover(&path) {
            continue;
        }
        if f.starts_with(&tmp_prefix) {
            let unlocked = File::open(&path)
                .and_then(|d| sys::try_lock(&d))
                .unwrap_or(false);
            if unlocked {
                let _ = fs::remove_dir_all(&path);
            }
        } else if is_set_dir(dest) {
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
