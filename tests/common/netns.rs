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
use std::os::fd::{AsRawFd, OwnedFd};
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
            Wire(
                duplex_devices::net::wire::Wire::open(name, proto)
                    .expect("the wire side of the TAP"),
            )
        })
    }
}

/// The host's end of a TAP: a raw packet socket on its interface.
pub struct Wire(duplex_devices::net::wire::Wire);

impl Wire {
    /// Sends one Ethernet frame onto the interface (the TAP's reader, the monitor, gets it).
    pub fn send(&self, frame: &[u8]) {
        self.0.send(frame).expect("send(AF_PACKET)");
    }

    /// The next frame on the interface for which `keep` is true, within `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        self.0
            .recv_matching(timeout, keep)
            .expect("recv(AF_PACKET)")
    }
}
