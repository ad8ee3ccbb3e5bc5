//! Bounded control clients, fds and threads (issue 11, items 4 and 5): a private runtime
//! directory for the default control socket, the monitor's open-file limit raised, and a
//! control socket that answers `status` while thousands of malformed lines and idle clients
//! arrive, its fds and threads under the documented caps.
//!
//! The bulk runs against an in-process [`ApiServer`] with a test handler (no KVM); the
//! `kvm_` tests drive the real `duplex` binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use duplex_devices::health::process_limits;
use duplex_vmm::api::{
    ApiError, ApiServer, ApiServerOptions, Command as ApiCommand, ControlHandler, MAX_CLIENTS,
};
use serde_json::{json, Value};

/// The in-process tests count this process's fds and threads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers `status`; every other command is `invalid_state`.
struct StatusOnly;

impl ControlHandler for StatusOnly {
    fn handle(&self, cmd: ApiCommand) -> Result<Value, ApiError> {
        match cmd {
            ApiCommand::Status { .. } => Ok(json!({"partitions": []})),
            other => Err(ApiError::invalid_state(format!(
                "{} not here",
                other.name()
            ))),
        }
    }
}

/// Threads of this process whose name starts with `api-client`.
fn client_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|n| n.starts_with("api-client"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// One response line from `stream` (None at end of stream).
fn read_response(reader: &mut impl BufRead) -> Option<Value> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(serde_json::from_str(&line).expect("a JSON response")),
        Err(e) => panic!("reading a response: {e}"),
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

/// A client asking `status` over and over on one connection until told to stop.
struct StatusLoop {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusLoop {
    fn start(sock: &Path) -> StatusLoop {
        let stream = UnixStream::connect(sock).expect("status client");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            while !s.load(Ordering::SeqCst) {
                (&stream)
                    .write_all(b"{\"cmd\":\"status\"}\n")
                    .expect("status request");
                let r = read_response(&mut reader).expect("a status answer");
                assert_eq!(r["ok"], true, "{r}");
                a.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Connected and served before anything else arrives.
        let deadline = Instant::now() + Duration::from_secs(20);
        while answered.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no first status answer");
            std::thread::sleep(Duration::from_millis(5));
        }
        StatusLoop {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Stops the loop; panics if any status went unanswered.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("every status was answered");
        }
        self.answered()
    }
}

/// The malformed lines, cycled: (bytes with newline, expected code).
fn malformed() -> Vec<(Vec<u8>, &'static str)> {
    let mut long = b"{\"cmd\":\"status\",\"pad\":\"".to_vec();
    long.resize(70 * 1024, b'a');
    long.extend_from_slice(b"\"}\n");
    vec![
        (b"not json\n".to_vec(), "parse_error"),
        (b"{\"cmd\":\n".to_vec(), "parse_error"),
        (b"\n".to_vec(), "parse_error"),
        (b"[1,2,3]\n".to_vec(), "invalid_request"),
        (b"{\"cmd\":5}\n".to_vec(), "invalid_request"),
        (b"{\"cmd\":\"fly\"}\n".to_vec(), "unknown_command"),
        (
            b"{\"cmd\":\"status\",\"bogus\":1}\n".to_vec(),
            "invalid_request",
        ),
        (b"{\"cmd\":\"st\xff\"}\n".to_vec(), "not_utf8"),
        (long, "line_too_long"),
    ]
}

/// Sends `count` malformed lines on each of `conns` connections (pipelined, read by a
/// thread per connection) and checks every answer; returns how many were answered.
fn flood_malformed(sock: &Path, conns: usize, count: usize) -> u64 {
    let lines = Arc::new(malformed());
    let mut threads = Vec::new();
    for c in 0..conns {
        let stream = UnixStream::connect(sock).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let reader_stream = stream.try_clone().expect("clone");
        let l = lines.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..count {
                let (bytes, _) = &l[(i + c) % l.len()];
                (&stream).write_all(bytes).expect("send a malformed line");
            }
            stream
        });
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(reader_stream);
            for i in 0..count {
                let (_, expect) = &l[(i + c) % l.len()];
                let v = read_response(&mut r).expect("an answer to every line");
                assert_eq!(v["ok"], false, "{v}");
                assert_eq!(code(&v), *expect, "line {i} of connection {c}: {v}");
            }
            count as u64
        });
        threads.push((writer, reader));
    }
    let mut answered = 0;
    for (w, r) in threads {
        let _stream = w.join().expect("writer");
        answered += r.join().expect("reader");
    }
    answered
}

#[test]
fn ten_thousand_malformed_lines_are_answered_and_status_goes_on() {
    let _serial = serial();
    let dir = TempDir::new("limits-malformed");
    let sock = dir.0.join("api.sock");
    let server = ApiServer::bind(&sock, Arc::new(StatusOnly)).expect("bind");
    let before = process_limits();
    let status = StatusLoop::start(&sock);
    let during = status.answered();
    let answered = flood_malformed(&sock, 4, 2_500);
    let peak = process_limits();
    assert_eq!(answered, 10_000);
    assert!(
        status.answered() > during,
        "status answered while the flood ran"
    );
    let total = status.finish();
    assert!(total >= 2, "{total}");
    // Server side: 5 clients (4 + status), each a thread and one fd; the test's own side
    // adds the client ends and a writer and a reader thread per connection.
    assert!(
        peak.open_fds <= before.open_fds + 2 * 5 + 8,
        "{before:?} -> {peak:?}"
    );
    assert!(client_threads() <= MAX_CLIENTS);
    assert_eq!(server.stats().refused_clients, 0);
}

#[test]
fn a_thousand_idle_clients_are_capped_or_closed_by_the_idle_timeout() {
    let _serial = serial();
    let dir = TempDir::new("limits-idle");
    let sock = dir.0.join("api.sock");
    let options = ApiServerOptions {
        max_clients: 16,
        idle_timeout: Duration::from_millis(300),
        ..ApiServerOptions::default()
    };
    let server = ApiServer::bind_with(&sock, Arc::new(StatusOnly), options).expect("bind");
    let before = process_limits();
    let status = StatusLoop::start(&sock);
    let (mut refused, mut timed_out) = (0, 0);
    let (mut max_fds, mut max_threads) = (0, 0);
    for wave in 0..10 {
        let clients: Vec<UnixStream> = (0..100)
            .map(|_| {
                let s = UnixStream::connect(&sock).expect("connect");
                // A hang guard only: each one is answered or closed long before.
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                s
            })
            .collect();
        max_fds = max_fds.max(process_limits().open_fds);
        max_threads = max_threads.max(client_threads());
        let mut accepted = 0;
        for c in &clients {
            match read_response(&mut BufReader::new(c)) {
                Some(v) => {
                    assert_eq!(code(&v), "too_many_clients", "{v}");
                    assert!(v.get("id").is_none());
                    refused += 1;
                }
                None => {
                    accepted += 1;
                    timed_out += 1;
                }
            }
        }
        // The status client holds one place; the previous wave's are all closed.
        assert_eq!(accepted, 15, "wave {wave}");
    }
    let stats = server.stats();
    assert_eq!((refused, timed_out), (850, 150));
    assert_eq!((stats.refused_clients, stats.idle_closed), (850, 150));
    assert!(status.finish() >= 10);
    // At most 16 clients are served at once; a closed client's thread may still be on its
    // way out (it leaves the table first) when the next wave's threads start, so on a
    // loaded machine up to one wave's worth more may show in /proc for a moment.
    assert!(max_threads <= 2 * 16, "{max_threads} client threads");
    // 100 client ends of the test, at most 16 server ends, the status client's two.
    assert!(
        max_fds <= before.open_fds + 100 + 16 + 2 + 8,
        "{} -> {max_fds}",
        before.open_fds
    );
}

#[test]
fn bytes_trickling_in_without_a_newline_do_not_keep_a_client_open() {
    let _serial = serial();
    let dir = TempDir::new("limits-trickle");
    let sock = dir.0.join("api.sock");
    let idle = Duration::from_millis(300);
    let options = ApiServerOptions {
        idle_timeout: idle,
        ..ApiServerOptions::default()
    };
    let server = ApiServer::bind_with(&sock, Arc::new(StatusOnly), options).expect("bind");
    let client = UnixStream::connect(&sock).expect("connect");
    let start = Instant::now();
    // One byte every 50 ms: never a whole line. Bounded: 200 bytes (10 s).
    let mut closed = false;
    for _ in 0..200 {
        if (&client).write_all(b"x").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if server.stats().idle_closed == 1 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickling client was never closed");
    assert!(start.elapsed() >= idle);
    assert_eq!(server.stats().clients, 0);
}

fn one_partition_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("device.json");
    let config = json!({"partitions": [
        partition("engine", "engine", "engine", 16, "heartbeat_ms=100"),
    ]});
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
    cfg
}

/// Kills the child when dropped (a failed assertion must not leave a monitor running).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn kvm_the_default_socket_is_in_the_private_runtime_dir() {
    require_kvm();
    // The in-process tests count this process's fds and threads: not meanwhile.
    let _serial = serial();
    let dir = TempDir::new("limits-rundir");
    let xdg = dir.0.join("xdg");
    std::fs::create_dir(&xdg).expect("xdg dir");
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let cfg = one_partition_config(&dir.0);
    let duplex = env!("CARGO_BIN_EXE_duplex");
    let child = Command::new(duplex)
        .env("XDG_RUNTIME_DIR", &xdg)
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--seconds", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn duplex");
    let mut child = Reap(child);
    let sock = xdg.join("duplex/duplex.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        let exited = child.0.try_wait().expect("wait");
        assert!(exited.is_none(), "duplex exited: {exited:?}");
        assert!(
            Instant::now() < deadline,
            "no control socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&xdg.join("duplex")), 0o700, "runtime dir mode");
    assert_eq!(mode(&sock), 0o600, "socket mode");
    // `duplex ctl` finds the same socket by default.
    let ctl = |cmd: &str| {
        Command::new(duplex)
            .env("XDG_RUNTIME_DIR", &xdg)
            .args(["ctl", cmd])
            .output()
            .expect("duplex ctl")
    };
    let status = ctl("status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"engine\""));
    assert!(ctl("shutdown").status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "duplex did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "socket removed at exit");
}

/// The soft and hard limits of open files of process `pid`.
fn nofile_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_owned(), f[4].to_owned())
}

#[test]
fn kvm_the_monitor_raises_its_open_file_limit() {
    require_kvm();
    // The in-process tests count this process's fds and threads: not meanwhile.
    let _serial = serial();
    let dir = TempDir::new("limits-nofile");
    let cfg = one_partition_config(&dir.0);
    let prefix = [
        "prlimit".to_owned(),
        "--nofile=256:".to_owned(),
        "--".to_owned(),
    ];
    let mut dev = Device::boot_file_prefixed(&prefix, &cfg, dir, &[], &[]);
    let (soft, hard) = nofile_limits(dev.pid());
    assert_eq!(
        soft, hard,
        "soft limit of open files not raised to the hard one"
    );
    assert_ne!(soft, "256");
    assert!(dev.shutdown().success());
}

/// Open fds and threads of process `pid`.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("/proc/{pid}/{what}: {e}"))
    };
    (count("fd"), count("task"))
}

#[test]
fn kvm_the_monitor_answers_status_through_malformed_lines_and_idle_clients() {
    require_kvm();
    // The in-process tests count this process's fds and threads: not meanwhile.
    let _serial = serial();
    let _ = duplex_devices::health::raise_fd_limit();
    let dir = TempDir::new("limits-monitor");
    let cfg = one_partition_config(&dir.0);
    let mut dev = Device::boot_file(&cfg, dir);
    dev.wait_heartbeat("engine", 1, Duration::from_secs(30));
    let pid = dev.pid();
    let (fds0, threads0) = fds_and_threads(pid);
    let status = StatusLoop::start(&dev.sock);

    // 10 000 malformed lines over 4 connections, held open afterwards (5 clients with
    // the status loop).
    let held: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&dev.sock).expect("connect"))
        .collect();
    for c in &held {
        let mut w: &UnixStream = c;
        w.write_all(b"{\"cmd\":\"status\"}\n").expect("write");
        let v = read_response(&mut BufReader::new(c)).expect("answer");
        assert_eq!(v["ok"], true, "{v}");
    }
    let answered_before = status.answered();
    assert_eq!(flood_malformed(&dev.sock, 4, 2_500), 10_000);
    let (fds1, threads1) = fds_and_threads(pid);
    assert!(
        status.answered() > answered_before,
        "status during the flood"
    );

    // The flood's connections are closed: wait for the monitor to let their threads go.
    wait_threads_at_most(pid, threads0 + 5);
    // 1 000 idle clients: the first 59 fill the cap (64 with the status loop and the 4
    // held connections), the rest are refused.
    let idle: Vec<UnixStream> = (0..1_000)
        .map(|_| {
            let s = UnixStream::connect(&dev.sock).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            s
        })
        .collect();
    let (fds2, threads2) = fds_and_threads(pid);
    // Each asks once: the accepted ones are answered, the refused ones read their error.
    let (mut ok, mut refused) = (0, 0);
    for c in &idle {
        let mut w: &UnixStream = c;
        let _ = w.write_all(b"{\"cmd\":\"status\"}\n");
        let v = read_response(&mut BufReader::new(c)).expect("a line for every client");
        match (v["ok"].as_bool(), code(&v)) {
            (Some(true), _) => ok += 1,
            (Some(false), "too_many_clients") => refused += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!((ok, refused), (MAX_CLIENTS - 5, 1_000 - (MAX_CLIENTS - 5)));
    let (fds3, threads3) = fds_and_threads(pid);
    let answered = status.finish();
    assert!(answered >= 3, "{answered}");

    // The control socket's share: at most MAX_CLIENTS fds and threads (+ a few for the
    // `status` connections the test helpers open).
    for (at, fds, threads) in [
        ("flood", fds1, threads1),
        ("idle connected", fds2, threads2),
        ("idle answered", fds3, threads3),
    ] {
        assert!(
            fds <= fds0 + MAX_CLIENTS + 4,
            "{at}: {fds} fds (from {fds0}), cap {MAX_CLIENTS}"
        );
        assert!(
            threads <= threads0 + MAX_CLIENTS + 4,
            "{at}: {threads} threads (from {threads0}), cap {MAX_CLIENTS}"
        );
    }
    drop(idle);
    drop(held);
    wait_threads_at_most(pid, threads0);
    assert_eq!(dev.status_of("engine")["state"], "running");
    assert!(dev.shutdown().success());
}

/// Waits (bounded) until process `pid` has at most `n` threads.
fn wait_threads_at_most(pid: u32, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, threads) = fds_and_threads(pid);
        if threads <= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{threads} threads, expected at most {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
