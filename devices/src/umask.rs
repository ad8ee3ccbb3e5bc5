//! Private Unix sockets: [`bind_unix_listener`] binds a listening socket whose file has
//! exactly the wanted mode from the moment it exists, without touching the process's umask.
//!
//! The umask is one value per process, shared by every thread. Changing it around a `bind`
//! would also apply to files other threads create meanwhile, and two binds at once would
//! restore each other's masks wrongly. So the bind runs on a short-lived thread that first
//! `unshare(CLONE_FS)`s (its umask, cwd and root become its own), then sets the umask to
//! `!mode` and binds: the socket file appears with `mode` and no more. Every Unix socket
//! Duplex listens on is bound this way: the control socket (`vmm/src/api/server.rs`) and the
//! vsock bridge's `uds` listeners (`vsock/uds.rs`).
//!
//! Nothing at the path is removed here: a bind over an existing file fails with
//! `EADDRINUSE`; callers decide what a stale socket is.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The most permissive mode a socket may be given (`rwx` for owner, group and others).
pub const MAX_MODE: u32 = 0o777;

/// Why [`bind_unix_listener`] failed: the step and the system's error.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct BindError {
    /// The step that failed (`socket path`, `mode`, `thread`, `unshare`, `bind`).
    pub what: &'static str,
    /// The system's error.
    pub source: io::Error,
}

/// A Unix stream socket listening at `path`, its file created with mode `mode` (at most
/// [`MAX_MODE`]) and close-on-exec. The bind happens on a thread of its own with a private
/// umask of `!mode` (see the module doc). Nothing at `path` is removed.
pub fn bind_unix_listener(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    if mode > MAX_MODE {
        return Err(BindError {
            what: "mode",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{mode:o} is more than {MAX_MODE:o}"),
            ),
        });
    }
    // sun_path is 108 bytes with its NUL.
    let len = path.as_os_str().len();
    if len == 0 || len >= 108 {
        return Err(BindError {
            what: "socket path",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "must be 1 to 107 bytes without NUL",
            ),
        });
    }
    let owned = path.to_path_buf();
    std::thread::Builder::new()
        .name("bind-private".into())
        .spawn(move || -> Result<UnixListener, BindError> {
            // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd, root and umask from
            // the process's; no memory is involved; the result is checked.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(BindError {
                    what: "unshare",
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: umask cannot fail; after the unshare it is this thread's alone.
            unsafe { libc::umask(!mode & MAX_MODE) };
            UnixListener::bind(&owned).map_err(|source| BindError {
                what: "bind",
                source,
            })
        })
        .map_err(|source| BindError {
            what: "thread",
            source,
        })?
        .join()
        .map_err(|_| BindError {
            what: "thread",
            source: io::Error::other("the bind thread panicked"),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn process_umask() -> libc::mode_t {
        // SAFETY: umask cannot fail; the value read is put back at once (tests of this
        // module are the only ones that look at it).
        unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m
        }
    }

    #[test]
    fn the_socket_has_the_mode_from_the_start_and_the_process_umask_is_untouched() {
        let dir = std::env::temp_dir().join(format!("duplex-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("dir");
        let before = process_umask();
        let mut modes = Vec::new();
        for (i, mode) in [0o600, 0o660, 0o700].into_iter().enumerate() {
            let path = dir.join(format!("s{i}.sock"));
            let listener = bind_unix_listener(&path, mode).expect("bind");
            modes.push(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777);
            assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
            drop(listener);
        }
        let after = process_umask();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(modes, vec![0o600, 0o660, 0o700]);
        assert_eq!(before, after, "the process's umask did not change");
    }

    #[test]
    fn a_file_is_never_replaced_and_bad_input_is_named() {
        let dir = std::env::temp_dir().join(format!("duplex-bind2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("dir");
        let path = dir.join("s.sock");
        let listener = bind_unix_listener(&path, 0o600).expect("bind");
        let again = bind_unix_listener(&path, 0o600).map(|_| ());
        let too_long = bind_unix_listener(&dir.join("x".repeat(200)), 0o600).map(|_| ());
        let bad_mode = bind_unix_listener(&dir.join("m.sock"), 0o4777).map(|_| ());
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
        let again = again.expect_err("a live socket is not replaced");
        assert_eq!(again.what, "bind");
        assert_eq!(again.source.raw_os_error(), Some(libc::EADDRINUSE));
        assert_eq!(too_long.expect_err("too long").what, "socket path");
        assert_eq!(bad_mode.expect_err("bad mode").what, "mode");
    }
}
