//! Shared helpers of the end-to-end tests: build the reference guests, boot a device
//! through the real `duplex` binary, talk to its control socket, read consoles.
//!
//! KVM tests call [`require_kvm`] first: without `/dev/kvm` they fail loudly (they are
//! never reported as passed); `scripts/test` skips them by name (`kvm_` prefix) and
//! counts them as skipped when `/dev/kvm` is missing.

#![allow(dead_code)]

pub mod livecut;
pub mod netns;
pub mod relay_scene;
pub mod relaynet;
pub mod site;
pub mod snap;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// CPU time (user + system, clock ticks) of thread `tid` of process `pid`.
pub fn thread_ticks(pid: u32, tid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .unwrap_or_else(|e| panic!("thread {tid} of {pid}: {e}"));
    // Fields after the command name: state is 3rd, utime 14th, stime 15th.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// The id of the thread of process `pid` named `comm`.
pub fn thread_named(pid: u32, comm: &str) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| t.ok())
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.trim() == comm))
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| panic!("no thread {comm} in process {pid}"))
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Panics (loudly) when /dev/kvm is missing: KVM tests are never reported as passed
/// without KVM.
pub fn require_kvm() {
    if !Path::new("/dev/kvm").exists() {
        panic!("SKIPPED-BY-ENVIRONMENT: /dev/kvm is missing; this KVM test cannot run here (scripts/test skips kvm_ tests and counts them as skipped)");
    }
}

static GUESTS: Once = Once::new();

/// Path of a reference guest image, building the guests once if needed.
pub fn guest(name: &str) -> PathBuf {
    GUESTS.call_once(|| {
        let status = Command::new("cargo")
            .args(["build", "--release", "--quiet"])
            .current_dir(root().join("guests"))
            .status()
            .expect("running cargo to build the guests");
        assert!(status.success(), "building the reference guests failed");
    });
    let p = root()
        .join("guests/target/x86_64-unknown-none/release")
        .join(name);
    assert!(p.exists(), "guest image {} missing", p.display());
    p
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("duplex-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A partition entry for a config.
pub fn partition(name: &str, role: &str, image: &str, mib: u64, cmdline: &str) -> Value {
    json!({
        "name": name, "role": role, "kernel": guest(image), "memory_mib": mib,
        "vcpus": 1, "cmdline": cmdline, "console": "stdout"
    })
}

/// The reference printer: engine (CID 3, calibrating 16 MiB) and controller (CID 4)
/// whose host bridge socket is `uds` (relative paths: next to the config file).
pub fn printer_partitions(uds: &Path) -> Vec<Value> {
    let mut engine = partition(
        "engine",
        "engine",
        "engine",
        96,
        "calib_mib=16 heartbeat_ms=100",
    );
    engine["vsock"] = json!({"cid": 3});
    let mut controller = partition(
        "controller",
        "controller",
        "controller",
        64,
        "engine_cid=3 heartbeat_ms=100",
    );
    controller["vsock"] = json!({"cid": 4, "uds": uds});
    vec![engine, controller]
}

/// A running `duplex run` process.
pub struct Device {
    child: Child,
    pub sock: PathBuf,
    pub dir: TempDir,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(reader: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            into.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
}

impl Device {
    /// Boots a device from `config` (written to a temp dir) and waits for its socket.
    pub fn boot(config: &Value) -> Device {
        let dir = TempDir::new("dev");
        let cfg = dir.0.join("device.json");
        std::fs::write(&cfg, serde_json::to_vec_pretty(config).expect("json")).expect("write");
        Device::boot_file(&cfg, dir)
    }

    /// Boots a device from a config file.
    pub fn boot_file(cfg: &Path, dir: TempDir) -> Device {
        Device::boot_file_with(cfg, dir, &[])
    }

    /// Boots a device from a config file, with more `duplex run` arguments.
    pub fn boot_file_with(cfg: &Path, dir: TempDir, extra: &[String]) -> Device {
        Device::boot_file_env(cfg, dir, extra, &[])
    }

    /// Boots a device from a config file, with more `duplex run` arguments and
    /// environment variables (e.g. `DUPLEX_FAULTS`).
    pub fn boot_file_env(
        cfg: &Path,
        dir: TempDir,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Device {
        Device::boot_file_prefixed(&[], cfg, dir, extra, env)
    }

    /// Boots a device from a config file with `duplex` run through a command prefix that
    /// execs it (e.g. `ip netns exec NS`, so that the child's pid is the monitor's).
    pub fn boot_file_prefixed(
        prefix: &[String],
        cfg: &Path,
        dir: TempDir,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Device {
        let sock = dir.0.join("api.sock");
        let duplex = env!("CARGO_BIN_EXE_duplex");
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(duplex);
                c
            }
            None => Command::new(duplex),
        };
        let mut child = cmd
            .envs(env.iter().copied())
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn duplex");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("stdout"), stdout.clone());
        collect(child.stderr.take().expect("stderr"), stderr.clone());
        let dev = Device {
            child,
            sock,
            dir,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&dev.sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "control socket never appeared; stderr: {:?}",
                dev.stderr_lines()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        dev
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new control connection.
    pub fn connect(&self) -> Conn {
        Conn::new(&self.sock)
    }

    /// Sends one request on a fresh connection; returns the whole response.
    pub fn request(&self, req: Value) -> Value {
        self.connect().request(&req)
    }

    /// Sends one request and returns its `result`, panicking on an error response.
    pub fn ok(&self, req: Value) -> Value {
        let resp = self.request(req.clone());
        assert_eq!(resp["ok"], true, "request {req} failed: {resp}");
        resp["result"].clone()
    }

    /// The status entry of one partition.
    pub fn status_of(&self, name: &str) -> Value {
        self.ok(json!({"cmd": "status", "partition": name}))["partitions"][0].clone()
    }

    /// The console lines of one partition.
    pub fn console(&self, name: &str) -> Vec<String> {
        let r = self.ok(json!({"cmd": "console", "partition": name, "lines": 10000}));
        r["lines"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until a console line of `name` contains `needle`; returns it.
    pub fn wait_line(&self, name: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.console(name).into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never printed {needle:?}; console: {:?}; stderr: {:?}",
                self.console(name),
                self.stderr_lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The latest heartbeat counter `name` printed (`<word> heartbeat N`).
    pub fn heartbeat(&self, name: &str) -> Option<u64> {
        self.console(name).iter().rev().find_map(|l| {
            l.split("heartbeat ")
                .nth(1)
                .and_then(|n| n.trim().parse().ok())
        })
    }

    /// Waits until `name`'s heartbeat reaches at least `n`; returns it.
    pub fn wait_heartbeat(&self, name: &str, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) = self.heartbeat(name).filter(|h| *h >= n) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "{name} heartbeat never reached {n}; console: {:?}; stderr: {:?}",
                self.console(name),
                self.stderr_lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `name` is in `state`; returns its status.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status_of(name);
            if s["state"] == state {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never became {state}: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the monitor to shut down and waits for the process to exit.
    pub fn shutdown(&mut self) -> std::process::ExitStatus {
        let _ = self.connect().request(&json!({"cmd": "shutdown"}));
        self.wait_exit(Duration::from_secs(20))
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "duplex did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One control connection, reused for many requests.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    pub fn new(sock: &Path) -> Conn {
        let s = UnixStream::connect(sock).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Conn {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    /// Sends raw bytes (a newline is not added) and reads one response line.
    pub fn raw(&mut self, bytes: &[u8]) -> Value {
        self.writer.write_all(bytes).expect("write");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read response");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("response {line:?} is not JSON: {e}"))
    }

    pub fn request(&mut self, req: &Value) -> Value {
        let mut bytes = serde_json::to_vec(req).expect("json");
        bytes.push(b'\n');
        self.raw(&bytes)
    }
}
