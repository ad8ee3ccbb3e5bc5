//! The relay's network for end-to-end tests: `scripts/relay-net` namespaces made per test
//! and removed on drop, and commands run inside them (docs/relay-network.md).
//!
//! Tests that use it call [`require_netns`] first: without root, `/dev/net/tun`, `ip` or
//! `nft` they fail loudly (never reported as passed); `scripts/test` skips them by name
//! (`netns_` in the name) and counts them as skipped there.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::root;

/// Mediation server's address on the WAN side.
pub const MEDIATOR_IP: &str = "10.77.0.2";
/// Cloud server's address on the WAN side.
pub const CLOUD_IP: &str = "10.77.0.3";
/// The plain LAN host.
pub const LAN_HOST_IP: &str = "10.77.1.2";

/// Whether this process can build the relay's network: root, `/dev/net/tun`, `ip`, `nft`.
pub fn netns_missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is missing (scripts/setup installs it)"));
        }
    }
    None
}

/// Panics (loudly) when the relay's network cannot be built here.
pub fn require_netns() {
    if let Some(why) = netns_missing() {
        panic!("SKIPPED-BY-ENVIRONMENT: {why}; this network-namespace test cannot run here (scripts/test skips netns_ tests and counts them as skipped)");
    }
}

/// One `scripts/relay-net` network, removed on drop.
pub struct RelayNet {
    pub prefix: String,
}

impl RelayNet {
    /// Builds a network with `taps` TAP devices, under a prefix unique to this process.
    pub fn up(taps: u32) -> RelayNet {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        // 8 characters at most: 'd' + 5 digits of the pid + 2 of the counter.
        let prefix = format!("d{:05}{:02}", std::process::id() % 100_000, n % 100);
        let out = Command::new(root().join("scripts/relay-net"))
            .args(["up", &prefix, "--taps", &taps.to_string()])
            .output()
            .expect("running scripts/relay-net");
        assert!(
            out.status.success(),
            "scripts/relay-net up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        RelayNet { prefix }
    }

    /// The namespace of one side: `lan`, `host` or `wan`.
    pub fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.prefix)
    }

    /// A command that runs `program` inside `side`.
    pub fn command(&self, side: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(side)]).arg(program);
        c
    }

    /// Runs a shell snippet in `side`; its stdout, or a panic with its stderr.
    pub fn sh(&self, side: &str, script: &str) -> String {
        let out = self
            .command(side, "sh")
            .args(["-c", script])
            .output()
            .expect("running a command in a namespace");
        assert!(
            out.status.success(),
            "`{script}` in {side} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Spawns `program args` in `side` with piped output.
    pub fn spawn(&self, side: &str, program: &Path, args: &[&str]) -> Child {
        self.command(side, program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning in a namespace")
    }
}

impl Drop for RelayNet {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/relay-net"))
            .args(["down", &self.prefix])
            .stdout(Stdio::null())
            .status();
    }
}

/// Runs `f` inside network namespace `ns` on a fresh thread (setns affects only the
/// calling thread), and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("opening the namespace");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd, for this thread only (a fresh thread that
        // only runs `f` and ends).
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {ns}");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// Whether a TCP connection from namespace `from` to `to` is accepted within `timeout`.
pub fn can_connect(from: &str, to: SocketAddr, timeout: Duration) -> bool {
    in_netns(from, move || {
        TcpStream::connect_timeout(&to, timeout).is_ok()
    })
}

/// A TCP listener bound inside namespace `ns` (the socket stays in that namespace).
pub fn listen_in(ns: &str, addr: SocketAddr) -> TcpListener {
    in_netns(ns, move || {
        TcpListener::bind(addr).expect("bind in namespace")
    })
}
