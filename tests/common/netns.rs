//! Network namespaces for the TAP tests: a namespace the test makes for itself (a thread
//! unshares its network namespace and keeps a handle on it), processes started inside it
//! (a child forked by a thread in the namespace is in it), and the wire side of a TAP there:
//! the interface set up, and a raw packet socket on it. No address is used anywhere; the
//! namespace goes away with its last process and handle.
//!
//! TAP tests are named `kvm_tap_*` and call [`require_tap`]: without root or
//! `/dev/net/tun` they fail loudly (`SKIPPED-BY-ENVIRONMENT`), and `scripts/test` skips them
//! by name and counts them as skipped.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// Panics (loudly) unless this process may make TAP devices in a namespace.
pub fn require_tap() {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/net/tun").exists() {
        panic!("SKIPPED-BY-ENVIRONMENT: TAP tests need root and /dev/net/tun (scripts/test skips kvm_tap_ tests and counts them as skipped)");
    }
}

fn check(rc: libc::c_int, what: &str) {
    if rc < 0 {
        panic!("{what}: {}", io::Error::last_os_error());
    }
}

/// A network namespace of the test's own.
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// A new namespace, with IPv6 off for the interfaces made in it (so that the kernel
    /// sends no frames of its own on them: the tests count frames exactly).
    pub fn new() -> NetNs {
        let fd = std::thread::spawn(|| {
            // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread.
            check(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                "unshare(CLONE_NEWNET)",
            );
            for conf in ["all", "default"] {
                let p = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                if Path::new(&p).exists() {
                    std::fs::write(&p, "1").expect("turning IPv6 off in the namespace");
                }
            }
            let f = std::fs::File::open("/proc/thread-self/ns/net").expect("namespace handle");
            OwnedFd::from(f)
        })
        .join()
        .expect("namespace thread");
        NetNs { fd }
    }

    /// Runs `f` on a thread inside the namespace (processes it starts are in it, sockets it
    /// opens belong to it).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns takes an fd this process owns; it moves only this thread.
                check(
                    unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) },
                    "setns",
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Waits (in the namespace) for interface `name` to appear, sets it up and returns a raw
    /// packet socket on it for frames of EtherType `proto`.
    pub fn wire(&self, name: &str, proto: u16) -> Wire {
        self.run(|| {
            let deadline = Instant::now() + Duration::from_secs(20);
            let cname = std::ffi::CString::new(name).expect("name");
            loop {
                // SAFETY: `cname` is a NUL-terminated string that lives through the call.
                if unsafe { libc::if_nametoindex(cname.as_ptr()) } != 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "interface {name} never appeared");
                std::thread::sleep(Duration::from_millis(10));
            }
            set_up(name);
            Wire {
                sock: packet_socket(name, proto),
            }
        })
    }
}

/// Sets the interface up (`SIOCSIFFLAGS`), through a datagram socket of this namespace.
fn set_up(name: &str) {
    // SAFETY: socket() takes no pointers; the result is checked and owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket(AF_INET)");
    // SAFETY: `fd` is a socket just opened and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero bytes are a valid `ifreq` (a name array and a union of plain data).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads and writes one `ifreq`, which lives through the call.
    check(
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) },
        "SIOCGIFFLAGS",
    );
    // SAFETY: SIOCGIFFLAGS filled the union's `ifru_flags` member.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one `ifreq`, which lives through the call.
    check(
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) },
        "SIOCSIFFLAGS",
    );
}

/// A raw packet socket on interface `name` that receives frames of EtherType `proto`.
fn packet_socket(name: &str, proto: u16) -> OwnedFd {
    let cname = std::ffi::CString::new(name).expect("name");
    // SAFETY: `cname` is a NUL-terminated string that lives through the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(ifindex, 0, "{name} exists");
    // SAFETY: socket() takes no pointers; the result is checked and owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    check(fd, "socket(AF_PACKET)");
    // SAFETY: `fd` is a socket just opened and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero bytes are a valid `sockaddr_ll`.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a `sockaddr_ll` of the length given, living through the call.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, "bind(AF_PACKET)");
    sock
}

/// The host's end of a TAP: a raw packet socket on its interface.
pub struct Wire {
    sock: OwnedFd,
}

impl Wire {
    /// Sends one Ethernet frame onto the interface (the TAP's reader, the monitor, gets it).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a readable buffer of the length given, living through the call.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        check(n as libc::c_int, "send(AF_PACKET)");
        assert_eq!(n as usize, frame.len(), "whole frame sent");
    }

    /// The next frame on the interface for which `keep` is true, within `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd that lives through the call.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if r <= 0 {
                continue;
            }
            // SAFETY: `buf` is a writable buffer of the length given, living through the call.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            check(n as libc::c_int, "recv(AF_PACKET)");
            let frame = &buf[..n as usize];
            if keep(frame) {
                return Some(frame.to_vec());
            }
        }
    }
}
