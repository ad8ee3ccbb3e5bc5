//! The relay scene of the end-to-end tests, as `scripts/demo_relay.py` plays it: the
//! relay's network (`scripts/relay-net`, a prefix per test), `duplex-mediator serve` and
//! `duplex-cloud serve` in the WAN namespace (fresh keys, secrets and configurations in the
//! scene's directory, logs in files there), and the real device (engine, controller and
//! relay partitions under KVM) with its monitor in the LAN namespace.
//!
//! Helpers for the tests: `duplex-cloud submit` (at once or in the background) returning
//! its JSON report, the cloud's `GET /v1/tunnels`, the mediator's `GET /v1/tunnels/{id}`,
//! the servers' logs, the controller's job table and the engine's page counter, restarts of
//! the mediator and of the monitor (from a snapshot set), and bounded waits.
//! `DUPLEX_KEEP_TEST_DIRS=1` keeps the scene's directory (configurations, logs, database).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use duplex_link::{HostReply, HostRequest, JobInfo};
use duplex_vmm::job::JobClient;
use serde_json::{json, Value};

use super::relaynet::{in_netns, RelayNet, CLOUD_IP, MEDIATOR_IP};
use super::{guest, Device, TempDir};

/// The device the relay serves.
pub const DEVICE_ID: &str = "mfp-1";
/// The relay's identity at the mediator.
pub const RELAY_ID: &str = "relay-1";
/// The cloud's bearer token at the mediator.
pub const TOKEN: &str = "test-token-5b1c9e0d";
/// The mediator's HTTP API (in the WAN namespace).
pub const MEDIATOR_API: &str = "10.77.0.2:8080";
/// The cloud's local API (loopback of the WAN namespace).
pub const CLOUD_API: &str = "127.0.0.1:9080";
/// Heartbeat interval and timeout the mediator gives the relay (small: outages end fast).
pub const HEARTBEAT_MS: u64 = 500;
pub const HEARTBEAT_TIMEOUT_MS: u64 = 1500;
/// The relay's reconnect backoff cap (its command line).
pub const BACKOFF_MAX_MS: u64 = 2000;

/// What a test changes in the scene.
#[derive(Clone, Debug)]
pub struct SceneOpts {
    /// The relay's `secret=`: `None` is the registry's (right) one.
    pub relay_secret: Option<String>,
    /// The relay's `devices=`.
    pub relay_devices: String,
    /// The mediator's `pending_ttl_ms`.
    pub pending_ttl_ms: u64,
    /// The cloud's `users` (SCIM users with tokens; `Null`: none).
    pub cloud_users: Value,
    /// A disk of this many MiB for the controller (its documents).
    pub controller_disk_mib: Option<u64>,
}

impl Default for SceneOpts {
    fn default() -> Self {
        SceneOpts {
            relay_secret: None,
            relay_devices: DEVICE_ID.into(),
            pending_ttl_ms: 120_000,
            cloud_users: Value::Null,
            controller_disk_mib: None,
        }
    }
}

/// Directory of the test's `duplex` binary, where `duplex-mediator` and `duplex-cloud`
/// are built too.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_duplex"))
        .parent()
        .expect("binary directory")
        .to_path_buf()
}

static MEDIATOR_BUILD: Once = Once::new();

/// Path of a `duplex-mediator` binary, building the package once per test binary.
pub fn mediator_bin(name: &str) -> PathBuf {
    let dir = bin_dir();
    MEDIATOR_BUILD.call_once(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--quiet", "-p", "duplex-mediator", "--bins"])
            .current_dir(super::root());
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd
            .status()
            .expect("running cargo build -p duplex-mediator");
        assert!(status.success(), "building duplex-mediator failed");
    });
    let p = dir.join(name);
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// 32 random bytes in hex.
pub fn random_hex32() -> String {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits until `f` gives a value, checking every 50 ms; panics with `what` (and the
/// scene's state from `ctx`) after `limit`.
pub fn wait_for<T>(
    limit: Duration,
    what: &str,
    ctx: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process in the WAN namespace, its stdout and stderr in one log file; killed
/// at drop.
pub struct Server {
    child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Starts `bin args` in the WAN namespace, its output appended to `log`, and waits for
    /// it to print one more `listening` line.
    pub fn start(net: &RelayNet, bin: &Path, args: &[&str], log: PathBuf) -> Server {
        // A restarted server appends to its log: wait for one more `listening` line.
        let before = std::fs::read_to_string(&log)
            .map(|t| t.matches("listening").count())
            .unwrap_or(0);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("server log file");
        let err = out.try_clone().expect("log file handle");
        let child = net
            .command("wan", bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning a server");
        let mut s = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.count("listening") <= before {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{} exited ({st}): {}", bin.display(), s.text());
            }
            assert!(
                Instant::now() < deadline,
                "{} never printed `listening`: {}",
                bin.display(),
                s.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// The whole log.
    pub fn text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn lines(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines(needle).len()
    }

    /// SIGKILL, and the exit reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `duplex-cloud submit` running in the background.
pub struct Submit {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    limit: Duration,
    started: Instant,
}

impl Submit {
    /// `duplex-cloud submit --device DEVICE ARGS --timeout-s TIMEOUT` in the WAN of `net`,
    /// its output in `dir` (`submit-N.out`, `submit-N.err`).
    pub fn start(
        net: &RelayNet,
        dir: &Path,
        n: u32,
        device: &str,
        args: &[&str],
        timeout_s: u64,
    ) -> Submit {
        let out = dir.join(format!("submit-{n}.out"));
        let err = dir.join(format!("submit-{n}.err"));
        let child = net
            .command("wan", mediator_bin("duplex-cloud"))
            .args(["submit", "--device", device, "--server"])
            .arg(format!("http://{CLOUD_API}"))
            .args(args)
            .args(["--timeout-s", &timeout_s.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("submit output file"))
            .stderr(std::fs::File::create(&err).expect("submit error file"))
            .spawn()
            .expect("spawning duplex-cloud submit");
        Submit {
            child,
            out,
            err,
            limit: Duration::from_secs(timeout_s),
            started: Instant::now(),
        }
    }

    /// Whether it has ended.
    pub fn done(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its report (the JSON object it printed), once it ended; killed after its own
    /// timeout and a margin.
    pub fn wait(mut self) -> Value {
        let deadline = self.started + self.limit + Duration::from_secs(45);
        loop {
            if self.done() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("duplex-cloud submit did not end within {:?}", self.limit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        let err = std::fs::read_to_string(&self.err).unwrap_or_default();
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("duplex-cloud submit printed no JSON ({e}): {out:?} {err}"))
    }
}

/// The scene: network, servers, device.
pub struct Scene {
    pub opts: SceneOpts,
    pub device: Option<Device>,
    pub mediator: Option<Server>,
    pub cloud: Option<Server>,
    pub net: RelayNet,
    pub work: TempDir,
    /// The registry's secret of the relay.
    pub secret: String,
    pub mediator_pin: String,
    pub cloud_pin: String,
    submits: u32,
}

impl Scene {
    /// Network, servers and device up; the relay logged in unless its options make that
    /// impossible (then only `relay READY` is waited for).
    pub fn up(opts: SceneOpts) -> Scene {
        let net = RelayNet::up(1);
        let work = TempDir::new("relay-scene");
        let mediator_pin = keygen(&work.0.join("keys/mediator"), MEDIATOR_IP);
        let cloud_pin = keygen(&work.0.join("keys/cloud"), CLOUD_IP);
        let secret = random_hex32();
        let ticket_key = random_hex32();
        write_server_configs(
            &work.0,
            &ticket_key,
            json!([{"id": RELAY_ID, "secret": secret, "devices": [DEVICE_ID]}]),
            json!({
                "heartbeat_ms": HEARTBEAT_MS,
                "heartbeat_timeout_ms": HEARTBEAT_TIMEOUT_MS,
                "pending_ttl_ms": opts.pending_ttl_ms,
            }),
        );
        if !opts.cloud_users.is_null() {
            let path = work.0.join("cloud.json");
            let mut cloud: Value =
                serde_json::from_slice(&std::fs::read(&path).expect("cloud.json")).expect("json");
            cloud["users"] = opts.cloud_users.clone();
            std::fs::write(&path, serde_json::to_vec_pretty(&cloud).expect("json"))
                .expect("writing cloud.json");
        }
        let mut scene = Scene {
            opts,
            device: None,
            mediator: None,
            cloud: None,
            net,
            work,
            secret,
            mediator_pin,
            cloud_pin,
            submits: 0,
        };
        scene.start_mediator();
        let cloud = Server::start(
            &scene.net,
            &mediator_bin("duplex-cloud"),
            &["serve", "--config", &scene.path("cloud.json")],
            scene.work.0.join("cloud.log"),
        );
        scene.cloud = Some(cloud);
        scene.device = Some(scene.boot(None));
        scene.dev().wait_line("relay", "relay READY", T);
        if scene.opts.relay_secret.is_none() && scene.opts.relay_devices == DEVICE_ID {
            scene.dev().wait_line("relay", "session up", T);
        }
        scene
    }

    fn path(&self, name: &str) -> String {
        self.work.0.join(name).display().to_string()
    }

    /// The running device.
    pub fn dev(&self) -> &Device {
        self.device.as_ref().expect("the device is running")
    }

    /// The mediator server.
    pub fn mediator(&self) -> &Server {
        self.mediator.as_ref().expect("the mediator is running")
    }

    /// The cloud server.
    pub fn cloud(&self) -> &Server {
        self.cloud.as_ref().expect("the cloud server is running")
    }

    /// Starts `duplex-mediator serve` on the scene's configuration (and database); a
    /// restarted mediator appends to the same log.
    pub fn start_mediator(&mut self) {
        let log = self.work.0.join("mediator.log");
        let m = Server::start(
            &self.net,
            &mediator_bin("duplex-mediator"),
            &["serve", "--config", &self.path("mediator.json")],
            log,
        );
        self.mediator = Some(m);
    }

    /// SIGKILLs the mediator (its database and log stay).
    pub fn kill_mediator(&mut self) {
        let mut m = self.mediator.take().expect("the mediator is running");
        m.kill();
    }

    /// The relay partition's command line.
    pub fn relay_cmdline(&self) -> String {
        format!(
            "role=relay ip=10.77.1.10/24 gw=10.77.1.1 relay_id={RELAY_ID} secret={} devices={} \
             mediator={MEDIATOR_IP}:7443 mediator_pin={} cloud_pin={} controller_cid=4 \
             backoff_base_ms=250 backoff_max_ms={BACKOFF_MAX_MS}",
            self.opts.relay_secret.as_deref().unwrap_or(&self.secret),
            self.opts.relay_devices,
            self.mediator_pin,
            self.cloud_pin,
        )
    }

    /// The device's configuration: engine, controller (host bridge `controller.vsock` next
    /// to the config) and relay (TAP `dxtap0` of the LAN namespace).
    pub fn device_config(&self) -> Value {
        let part = |name: &str, mib: u64, cmdline: String| {
            json!({"name": name, "role": name, "kernel": guest(name), "memory_mib": mib,
                   "vcpus": 1, "cmdline": cmdline, "console": "stdout"})
        };
        let mut engine = part("engine", 96, "role=engine calib_mib=16".into());
        engine["vsock"] = json!({"cid": 3});
        let mut controller = part("controller", 64, "role=controller engine_cid=3".into());
        controller["vsock"] = json!({"cid": 4, "uds": "controller.vsock"});
        if let Some(mib) = self.opts.controller_disk_mib {
            controller["disk"] =
                json!({"file": self.work.0.join("controller.disk"), "size_mib": mib});
        }
        let mut relay = part("relay", 32, self.relay_cmdline());
        relay["vsock"] = json!({"cid": 5});
        relay["net"] = json!({"tap": "dxtap0", "mac": "52:54:00:77:01:0a"});
        json!({"device": DEVICE_ID, "partitions": [engine, controller, relay]})
    }

    /// A new monitor in the LAN namespace (cold, or restored from `restore`), in a fresh
    /// directory of its own (config, control socket, vsock bridge).
    pub fn boot(&self, restore: Option<&Path>) -> Device {
        boot_in_lan(&self.net, &self.device_config(), restore)
    }

    /// The controller's host bridge socket of the running device.
    pub fn uds(&self) -> PathBuf {
        self.dev().dir.0.join("controller.vsock")
    }

    /// A connection to the controller's job port.
    pub fn job_client(&self) -> JobClient {
        JobClient::connect(&self.uds()).expect("connecting to the controller's job port")
    }

    /// The engine's `pages_printed`.
    pub fn engine_pages(&self) -> u64 {
        match self
            .job_client()
            .call(&HostRequest::EngineStatus)
            .expect("engine status")
        {
            HostReply::Engine(info) => info.pages_printed,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Every job the controller remembers.
    pub fn controller_jobs(&self) -> Vec<JobInfo> {
        self.job_client().jobs(None).expect("the controller's jobs")
    }

    /// Relay console lines containing `needle`.
    pub fn relay_lines(&self, needle: &str) -> Vec<String> {
        self.dev()
            .console("relay")
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// A server's log (`mediator` or `cloud`), also while it is not running.
    pub fn log(&self, server: &str) -> String {
        std::fs::read(self.work.0.join(format!("{server}.log")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Mediator log lines containing `needle` (every run of it).
    pub fn mediator_lines(&self, needle: &str) -> Vec<String> {
        self.log("mediator")
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Everything worth seeing when a wait fails.
    pub fn context(&self) -> String {
        let tail =
            |lines: Vec<String>, n: usize| lines[lines.len().saturating_sub(n)..].join("\n  ");
        let relay = self
            .device
            .as_ref()
            .map(|d| tail(d.console("relay"), 25))
            .unwrap_or_default();
        let log = |name: &str| tail(self.log(name).lines().map(str::to_owned).collect(), 25);
        format!(
            "relay console:\n  {relay}\nmediator log:\n  {}\ncloud log:\n  {}",
            log("mediator"),
            log("cloud")
        )
    }

    /// Waits for a relay console line with `needle`; returns it.
    pub fn wait_relay(&self, needle: &str, limit: Duration) -> String {
        self.wait_relay_count(needle, 1, limit)
    }

    /// Waits until `n` relay console lines contain `needle`; returns the `n`-th.
    pub fn wait_relay_count(&self, needle: &str, n: usize, limit: Duration) -> String {
        wait_for(
            limit,
            &format!("relay console line {n} with {needle:?}"),
            || self.context(),
            || self.relay_lines(needle).into_iter().nth(n - 1),
        )
    }

    /// Waits until `n` mediator log lines contain `needle`; returns the `n`-th.
    pub fn wait_mediator(&self, needle: &str, n: usize, limit: Duration) -> String {
        wait_for(
            limit,
            &format!("mediator log line {n} with {needle:?}"),
            || self.context(),
            || self.mediator_lines(needle).into_iter().nth(n - 1),
        )
    }

    /// `duplex-cloud submit --device mfp-1 ARGS --timeout-s TIMEOUT` in the background.
    pub fn submit_bg(&mut self, args: &[&str], timeout_s: u64) -> Submit {
        self.submits += 1;
        Submit::start(
            &self.net,
            &self.work.0,
            self.submits,
            DEVICE_ID,
            args,
            timeout_s,
        )
    }

    /// `duplex-cloud submit ...`: its report.
    pub fn submit(&mut self, args: &[&str], timeout_s: u64) -> Value {
        self.submit_bg(args, timeout_s).wait()
    }

    /// A plain HTTP/1.1 GET from the WAN namespace: status and JSON body.
    pub fn http_get(&self, addr: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        http_get(&self.net, addr, path, token)
    }

    /// The cloud's `GET /v1/tunnels`.
    pub fn cloud_tunnels(&self) -> Vec<Value> {
        let (status, v) = self.http_get(CLOUD_API, "/v1/tunnels", None);
        assert_eq!(status, 200, "cloud /v1/tunnels: {v}");
        v["tunnels"].as_array().cloned().unwrap_or_default()
    }

    /// The cloud's record of tunnel `id`.
    pub fn cloud_tunnel(&self, id: u64) -> Option<Value> {
        self.cloud_tunnels()
            .into_iter()
            .find(|t| t["tunnel_id"].as_u64() == Some(id))
    }

    /// The mediator's `GET /v1/tunnels/{id}`.
    pub fn mediator_tunnel(&self, id: u64) -> Value {
        let (status, v) = self.http_get(MEDIATOR_API, &format!("/v1/tunnels/{id}"), Some(TOKEN));
        assert_eq!(status, 200, "mediator /v1/tunnels/{id}: {v}");
        v
    }

    /// Waits until the cloud records tunnel `id` closed by itself (`Close` answered by
    /// `Closed`) and the mediator's record is `closed` with `job` in its jobs.
    pub fn wait_tunnel_closed(&self, id: u64, job: &str) {
        wait_for(
            T,
            &format!("tunnel {id} closed by the cloud"),
            || format!("{:?}\n{}", self.cloud_tunnel(id), self.context()),
            || (self.cloud_tunnel(id)?["closed_by"] == "cloud").then_some(()),
        );
        wait_for(
            T,
            &format!("the mediator's record of tunnel {id} closed with job {job}"),
            || format!("{}\n{}", self.mediator_tunnel(id), self.context()),
            || {
                let r = self.mediator_tunnel(id);
                let has_job = r["jobs"]
                    .as_array()
                    .is_some_and(|j| j.iter().any(|x| x == job));
                (r["state"] == "closed" && has_job).then_some(())
            },
        );
    }

    /// Stops the running monitor with SIGKILL.
    pub fn kill_device(&mut self) {
        if let Some(mut d) = self.device.take() {
            d.kill();
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.kill_device();
        self.cloud.take();
        self.mediator.take();
        if std::env::var_os("DUPLEX_KEEP_TEST_DIRS").is_some() {
            let kept = self.work.0.with_extension("kept");
            let _ = std::fs::rename(&self.work.0, &kept);
            eprintln!("kept {}", kept.display());
        }
    }
}

/// A plain HTTP/1.1 GET from the WAN namespace of `net`: status and JSON body.
pub fn http_get(net: &RelayNet, addr: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let (status, body) = http_get_raw(net, addr, path, token);
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "GET {path}: body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, json)
}

/// A plain HTTP/1.1 GET from the WAN namespace of `net`: status and body bytes.
pub fn http_get_raw(net: &RelayNet, addr: &str, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let addr: SocketAddr = addr.parse().expect("address");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    let resp = in_netns(&net.ns("wan"), move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    })
    .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no header end in {resp:?}"));
    let head = String::from_utf8_lossy(&resp[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status line in {head:?}"));
    (status, resp[head_end + 4..].to_vec())
}

/// A new monitor in the LAN namespace of `net` running `config` (cold, or restored from
/// `restore`), in a fresh directory of its own (config, control socket, vsock bridge).
pub fn boot_in_lan(net: &RelayNet, config: &Value, restore: Option<&Path>) -> Device {
    let dir = TempDir::new("relay-dev");
    let cfg = dir.0.join("device.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(config).expect("json"))
        .expect("writing the device config");
    let mut extra = Vec::new();
    if let Some(set) = restore {
        extra.push("--restore".to_string());
        extra.push(set.display().to_string());
    }
    let prefix = [
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        net.ns("lan"),
    ];
    Device::boot_file_prefixed(&prefix, &cfg, dir, &extra, &[])
}

/// Writes the scene's `mediator.json` (the keys every scene shares, the relay registry
/// `relays`, then the keys of `extra` over them) and `cloud.json` into `dir`.
pub fn write_server_configs(dir: &Path, ticket_key: &str, relays: Value, extra: Value) {
    let mut mediator = json!({
        "relay_listen": format!("{MEDIATOR_IP}:7443"),
        "api_listen": MEDIATOR_API,
        "db": "mediator.db",
        "cert": "keys/mediator/cert.pem",
        "key": "keys/mediator/key.pem",
        "heartbeat_ms": HEARTBEAT_MS,
        "heartbeat_timeout_ms": HEARTBEAT_TIMEOUT_MS,
        "ticket_ttl_ms": 30_000,
        "pending_ttl_ms": 120_000,
        "login_timeout_ms": 5_000,
        "clouds": [{"name": "cloud-1", "token": TOKEN, "ticket_key": ticket_key}],
        "relays": relays,
    });
    if let (Some(m), Some(e)) = (mediator.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    let cloud = json!({
        "listen": format!("{CLOUD_IP}:9443"),
        "dial": format!("{CLOUD_IP}:9443"),
        "api_listen": CLOUD_API,
        "cert": "keys/cloud/cert.pem",
        "key": "keys/cloud/key.pem",
        "mediator": format!("http://{MEDIATOR_API}"),
        "token": TOKEN,
        "ticket_key": ticket_key,
        "user": "test-user",
        "retry_base_ms": 200,
        "retry_max_ms": 1000,
        "poll_ms": 200,
    });
    for (name, v) in [("mediator.json", &mediator), ("cloud.json", &cloud)] {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).expect("json"))
            .expect("writing a server configuration");
    }
}

/// Patience for anything the scene does (a busy 2-core machine).
pub const T: Duration = Duration::from_secs(60);

/// `duplex-mediator keygen --out DIR --name NAME`; returns the pin.
pub fn keygen(dir: &Path, name: &str) -> String {
    let out = Command::new(mediator_bin("duplex-mediator"))
        .args(["keygen", "--out"])
        .arg(dir)
        .args(["--name", name])
        .output()
        .expect("running duplex-mediator keygen");
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("pin "))
        .map(|p| p.trim().to_string())
        .unwrap_or_else(|| panic!("keygen printed no pin: {text}"))
}

/// A job's report is `done` with `pages` checksums, which the cloud found right
/// (`checksums_ok`) and which are checked here too against
/// `duplex_link::expected_page_checksum`: every page of a short job, 40 pages spread over a
/// long one (a debug build computes a 512x512 page in about 15 ms).
pub fn assert_done(report: &Value, pages: u32, seed: u64, width: u16, height: u16) {
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["checksums_ok"], true, "{report}");
    let got: Vec<u64> = report["checksums"]
        .as_array()
        .unwrap_or_else(|| panic!("no checksums: {report}"))
        .iter()
        .map(|c| c.as_u64().expect("checksum"))
        .collect();
    assert_eq!(got.len(), pages as usize, "one checksum a page: {report}");
    let step = (pages / 40).max(1);
    let mut checked: Vec<u32> = (0..pages).step_by(step as usize).collect();
    checked.push(pages - 1);
    for p in checked {
        let want = duplex_link::expected_page_checksum(seed, p, width, height);
        assert_eq!(
            got[p as usize],
            u64::from(want),
            "page {p} of job {}",
            report["job_id"]
        );
    }
}
