//! The monitor's private runtime directory, where its sockets live: the default control
//! socket (`<rundir>/duplex.sock`) and the vsock bridge's guest-initiated sockets.
//!
//! It is `$XDG_RUNTIME_DIR/duplex` when `XDG_RUNTIME_DIR` is set (an absolute path), else
//! `/run/duplex` for root; any other user must name the control socket (`--api-sock`).
//! [`runtime_dir`] creates it (mode 0700) when missing and refuses one that is a symlink,
//! not a directory, not ours, or open to group or others, naming the path and what is
//! wrong: a socket there can then be reached, or planted, by its owner only.

use std::ffi::OsStr;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The runtime directory's name inside `$XDG_RUNTIME_DIR`.
pub const XDG_SUBDIR: &str = "duplex";
/// The runtime directory of root when `XDG_RUNTIME_DIR` is not set.
pub const ROOT_RUNDIR: &str = "/run/duplex";
/// The control socket's name inside the runtime directory.
pub const API_SOCK_NAME: &str = "duplex.sock";

/// Why the runtime directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// Neither `XDG_RUNTIME_DIR` nor root: there is no private place to default to.
    #[error(
        "no runtime directory for the control socket: XDG_RUNTIME_DIR is not set and the \
         monitor is not root (uid {uid}); set XDG_RUNTIME_DIR or pass --api-sock PATH \
         (in a directory only you can write)"
    )]
    NoPlace { uid: u32 },
    /// `XDG_RUNTIME_DIR` is not an absolute path.
    #[error("XDG_RUNTIME_DIR {0:?} is not an absolute path; fix it or pass --api-sock PATH")]
    RelativeXdg(PathBuf),
    /// The directory could not be created or examined.
    #[error("runtime directory {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    /// Something other than a directory is at the path (a symlink is refused too).
    #[error("runtime directory {path}: is {found}, not a directory (refusing to use it)")]
    NotADirectory { path: PathBuf, found: &'static str },
    /// The directory belongs to another user.
    #[error(
        "runtime directory {path}: owned by uid {owner}, not by us (uid {uid}); \
         refusing to use it"
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    /// Group or others have permissions on the directory.
    #[error(
        "runtime directory {path}: mode {mode:04o} gives group or others access; \
         it must be 0700 (chmod 700 it, or remove it)"
    )]
    NotPrivate { path: PathBuf, mode: u32 },
}

fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Where the runtime directory is for a process with `XDG_RUNTIME_DIR` = `xdg` (None:
/// unset) and effective uid `uid`. An empty `XDG_RUNTIME_DIR` counts as unset.
pub fn runtime_dir_for(xdg: Option<&OsStr>, uid: u32) -> Result<PathBuf, RunDirError> {
    match xdg.filter(|x| !x.is_empty()).map(Path::new) {
        Some(x) if x.is_absolute() => Ok(x.join(XDG_SUBDIR)),
        Some(x) => Err(RunDirError::RelativeXdg(x.to_path_buf())),
        None if uid == 0 => Ok(PathBuf::from(ROOT_RUNDIR)),
        None => Err(RunDirError::NoPlace { uid }),
    }
}

/// This process's runtime directory's path (not created or checked).
pub fn runtime_dir_path() -> Result<PathBuf, RunDirError> {
    runtime_dir_for(std::env::var_os("XDG_RUNTIME_DIR").as_deref(), euid())
}

/// This process's runtime directory, created (mode 0700) if missing and checked to be a
/// private directory of ours.
pub fn runtime_dir() -> Result<PathBuf, RunDirError> {
    let dir = runtime_dir_path()?;
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// The default control socket: `<runtime dir>/duplex.sock`, the directory created and
/// checked (for `duplex run`).
pub fn default_api_sock() -> Result<PathBuf, RunDirError> {
    runtime_dir().map(|d| d.join(API_SOCK_NAME))
}

/// The default control socket for a client (`duplex ctl`): the directory is checked when
/// it exists (a client never connects through a directory others control), not created.
pub fn client_api_sock() -> Result<PathBuf, RunDirError> {
    let dir = runtime_dir_path()?;
    match check_private_dir(&dir) {
        Err(RunDirError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        other => other?,
    }
    Ok(dir.join(API_SOCK_NAME))
}

/// Creates `dir` with mode 0700 if it is missing (not its parents), then checks it with
/// [`check_private_dir`].
pub fn ensure_private_dir(dir: &Path) -> Result<(), RunDirError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(RunDirError::Io {
                path: dir.to_path_buf(),
                what: "cannot create it",
                source,
            })
        }
    }
    check_private_dir(dir)
}

/// Checks that `dir` is a directory (not a symlink to one: `lstat`) owned by this
/// process's effective user with no group or other permissions.
pub fn check_private_dir(dir: &Path) -> Result<(), RunDirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| RunDirError::Io {
        path: dir.to_path_buf(),
        what: "cannot examine it",
        source,
    })?;
    let kind = meta.file_type();
    if !kind.is_dir() {
        let found = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "not a directory"
        };
        return Err(RunDirError::NotADirectory {
            path: dir.to_path_buf(),
            found,
        });
    }
    let uid = euid();
    if meta.uid() != uid {
        return Err(RunDirError::NotOwned {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RunDirError::NotPrivate {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn the_place_follows_xdg_then_root_else_refuses() {
        let xdg = OsStr::new("/run/user/1000");
        assert_eq!(
            runtime_dir_for(Some(xdg), 1000).expect("xdg"),
            PathBuf::from("/run/user/1000/duplex")
        );
        assert_eq!(
            runtime_dir_for(Some(xdg), 0).expect("xdg wins for root too"),
            PathBuf::from("/run/user/1000/duplex")
        );
        assert_eq!(
            runtime_dir_for(None, 0).expect("root"),
            PathBuf::from("/run/duplex")
        );
        assert_eq!(
            runtime_dir_for(Some(OsStr::new("")), 0).expect("empty is unset"),
            PathBuf::from("/run/duplex")
        );
        let err = runtime_dir_for(None, 1000).expect_err("no place");
        assert!(err.to_string().contains("--api-sock"), "{err}");
        assert!(matches!(
            runtime_dir_for(Some(OsStr::new("rel/dir")), 1000),
            Err(RunDirError::RelativeXdg(_))
        ));
    }

    #[test]
    fn a_missing_dir_is_made_private_and_bad_ones_are_refused() {
        let tmp = TempDir::new().expect("temp dir");
        let base = tmp.as_path();
        let dir = base.join("duplex");
        ensure_private_dir(&dir).expect("created");
        let mode = std::fs::metadata(&dir).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        ensure_private_dir(&dir).expect("an existing private dir is fine");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let err = ensure_private_dir(&dir).expect_err("group access");
        assert!(
            matches!(err, RunDirError::NotPrivate { mode: 0o750, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );

        let target = base.join("elsewhere");
        std::fs::create_dir(&target).expect("dir");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let link = base.join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = ensure_private_dir(&link).expect_err("symlink");
        assert!(
            matches!(
                err,
                RunDirError::NotADirectory {
                    found: "a symbolic link",
                    ..
                }
            ),
            "{err}"
        );

        let file = base.join("file");
        std::fs::write(&file, "x").expect("file");
        assert!(matches!(
            ensure_private_dir(&file),
            Err(RunDirError::NotADirectory {
                found: "a regular file",
                ..
            })
        ));

        let other = base.join("other");
        std::fs::create_dir(&other).expect("dir");
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let c = std::ffi::CString::new(other.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
        let chowned = unsafe { libc::chown(c.as_ptr(), 4242, 4242) };
        if chowned == 0 {
            // Only root can give a directory away; then it is refused as not ours.
            assert!(matches!(
                ensure_private_dir(&other),
                Err(RunDirError::NotOwned { owner: 4242, .. })
            ));
        }
    }
}
