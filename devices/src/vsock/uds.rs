//! Unix socket helpers of the host bridge: binding a listener with a private umask and
//! without ever unlinking a live socket, the `<uds>_<port>` naming and the check that the
//! socket there is to be trusted, a connect that never blocks, and the `CONNECT <port>`
//! line. Depends on nothing else of the switch but its error type.

use std::ffi::OsString;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::limits::VsockError;

/// Listens on `path` with a socket file of `mode` (`0 ..= 0o777`), bound by
/// [`crate::umask::bind_unix_listener`] (the mode is right from the start; no other
/// thread's umask changes). A stale socket file
/// at `path` (nobody accepts on it) is replaced; a live one is an error
/// ([`VsockError::UdsInUse`]), as is anything that is not a socket (a symlink included).
pub(crate) fn bind_listener(path: &Path, mode: u32) -> Result<UnixListener, VsockError> {
    if mode > 0o777 {
        return Err(VsockError::UdsMode(mode));
    }
    let uds_err = |source| VsockError::Uds {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match connect_nonblocking(path) {
            Ok(_) => return Err(VsockError::UdsInUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(VsockError::UdsInUse(path.to_path_buf()))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(uds_err)?
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(uds_err(e)),
        },
        Ok(_) => return Err(VsockError::UdsNotSocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(uds_err(e)),
    }
    let sock = crate::umask::bind_unix_listener(path, mode).map_err(|e| uds_err(e.source))?;
    if let Err(e) = sock.set_nonblocking(true) {
        let _ = std::fs::remove_file(path);
        return Err(uds_err(e));
    }
    Ok(sock)
}

/// Whether the Unix socket at `path` may be connected to for a guest: it is a socket (not
/// a symlink) owned by us or by root, in a directory that only its owner (us or root) may
/// write to; in a directory others may write to, only if the directory is sticky and the
/// socket is ours (nobody else can then replace it). Returns why not.
pub(crate) fn check_trusted(path: &Path) -> Result<(), Trust> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    let m = std::fs::symlink_metadata(path).map_err(Trust::Io)?;
    if !m.file_type().is_socket() {
        return Err(Trust::Untrusted("not a socket".into()));
    }
    if m.uid() != me && m.uid() != 0 {
        return Err(Trust::Untrusted(format!("owned by uid {}", m.uid())));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let d = std::fs::metadata(dir).map_err(Trust::Io)?;
    let private = (d.uid() == me || d.uid() == 0) && d.mode() & 0o022 == 0;
    let sticky_and_ours = d.mode() & 0o1000 != 0 && m.uid() == me;
    if private || sticky_and_ours {
        Ok(())
    } else {
        Err(Trust::Untrusted(format!(
            "its directory {} may be written by others (mode {:o}, uid {})",
            dir.display(),
            d.mode() & 0o7777,
            d.uid()
        )))
    }
}

/// Why a socket is not connected to.
#[derive(Debug)]
pub(crate) enum Trust {
    /// It cannot be looked at (absent...).
    Io(io::Error),
    /// It is not to be trusted: why.
    Untrusted(String),
}

/// The uid of the process at the other end of a connected Unix socket.
pub(crate) fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the result is
    // checked.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// `<uds>_<port>`: where a guest's connection to host port `port` goes.
pub(crate) fn uds_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to a Unix stream socket without blocking (a full listen backlog fails with
/// `WouldBlock` instead of stalling the vCPU thread that asked).
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else; OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` does not
    // exceed its size (checked above); the result is checked.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// `CONNECT <port>` (decimal, optionally followed by `\r`) → the port.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT  5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn uds_port_paths() {
        assert_eq!(
            uds_port_path(Path::new("/run/x/engine.vsock"), 5000),
            PathBuf::from("/run/x/engine.vsock_5000")
        );
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener_and_fails_cleanly_without_one() {
        let dir = std::env::temp_dir().join(format!("duplex-vsock-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let mut c = connect_nonblocking(&path).expect("connects");
        let (mut s, _) = listener.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let err = connect_nonblocking(&dir.join("absent.sock")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let long = PathBuf::from("/".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
