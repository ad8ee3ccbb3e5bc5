//! Helpers of the mediator's integration tests: temporary directories, keys, the
//! `duplex-mediator` and `duplex-cloud` binaries as child processes (waiting for their
//! `listening` lines, their logs in files), configurations, API calls and bounded waits.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use duplex_mediator::http;
use duplex_mediator::sim::device::FakeDevice;
use duplex_mediator::sim::{RelaySim, SimConfig};
use duplex_mediator::util::{hex, random_u64};
use serde_json::{json, Value};

pub const TOKEN: &str = "cloud-token-1";
pub const TICKET_KEY: [u8; 32] = [0x5a; 32];
pub const SECRET: [u8; 32] = [0x11; 32];

/// A directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("duplex-{tag}-{:x}", random_u64()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("DUPLEX_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed at drop, with its stderr in a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    /// Lines printed on stdout before `listening`.
    pub lines: Vec<String>,
}

impl Proc {
    /// Starts `bin args`, waits (30 s at most) for a stdout line starting `listening`.
    pub fn start(bin: &str, args: &[&str], log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn the server");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let done = line.starts_with("listening");
                    lines.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "{bin} did not start: {lines:?}\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        Proc { child, log, lines }
    }

    /// The value of `key=` on the `listening` line.
    pub fn addr(&self, key: &str) -> SocketAddr {
        let line = self.lines.last().expect("a listening line");
        let prefix = format!("{key}=");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&prefix))
            .expect("address on the listening line")
            .parse()
            .expect("a socket address")
    }

    /// The pin printed at start.
    pub fn pin(&self) -> [u8; 32] {
        let line = self
            .lines
            .iter()
            .find(|l| l.starts_with("pin "))
            .expect("a pin line");
        duplex_tunnel::parse_key(&line[4..]).expect("64 hex digits")
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay entry of a mediator configuration.
pub fn relay(id: &str, devices: &[&str]) -> Value {
    json!({"id": id, "secret": hex(&SECRET), "devices": devices})
}

/// What a test's mediator looks like.
pub struct MediatorSpec {
    pub relays: Vec<Value>,
    pub heartbeat_ms: u32,
    pub heartbeat_timeout_ms: u32,
    pub ticket_ttl_ms: u64,
    pub db: bool,
    /// Fixed listen addresses (a restart on the same ports); `127.0.0.1:0` if `None`.
    pub relay_listen: Option<SocketAddr>,
    pub api_listen: Option<SocketAddr>,
    /// `wake_timeout_ms`, `wake_retry_ms`, `wake_attempts` (the server's defaults if `None`).
    pub wake: Option<(u64, u64, u32)>,
}

impl MediatorSpec {
    pub fn new(relays: Vec<Value>) -> Self {
        MediatorSpec {
            relays,
            heartbeat_ms: 1000,
            heartbeat_timeout_ms: 3000,
            ticket_ttl_ms: 30_000,
            db: true,
            relay_listen: None,
            api_listen: None,
            wake: None,
        }
    }
}

/// Keys in `dir/<name>/`; returns the directory.
pub fn keys(dir: &TempDir, name: &str) -> PathBuf {
    let d = dir.path(name);
    duplex_mediator::pin::keygen(&d, "127.0.0.1").expect("keygen");
    d
}

/// Writes the mediator's configuration into `dir` (keys made once) and starts it.
pub fn start_mediator(dir: &TempDir, spec: &MediatorSpec) -> Proc {
    let keydir = dir.path("mediator-keys");
    if !keydir.join("cert.pem").exists() {
        keys(dir, "mediator-keys");
    }
    let mut cfg = json!({
        "relay_listen": spec.relay_listen.map_or("127.0.0.1:0".to_string(), |a| a.to_string()),
        "api_listen": spec.api_listen.map_or("127.0.0.1:0".to_string(), |a| a.to_string()),
        "cert": keydir.join("cert.pem"),
        "key": keydir.join("key.pem"),
        "heartbeat_ms": spec.heartbeat_ms,
        "heartbeat_timeout_ms": spec.heartbeat_timeout_ms,
        "ticket_ttl_ms": spec.ticket_ttl_ms,
        "clouds": [{"name": "cloud-1", "token": TOKEN, "ticket_key": hex(&TICKET_KEY)}],
        "relays": spec.relays,
    });
    if spec.db {
        cfg["db"] = json!(dir.path("mediator.db"));
    }
    if let Some((timeout, retry, attempts)) = spec.wake {
        cfg["wake_timeout_ms"] = json!(timeout);
        cfg["wake_retry_ms"] = json!(retry);
        cfg["wake_attempts"] = json!(attempts);
    }
    let path = dir.path("mediator.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json"))
        .expect("write the config");
    let log = dir.path(&format!("mediator-{:x}.log", random_u64() & 0xffff));
    Proc::start(
        env!("CARGO_BIN_EXE_duplex-mediator"),
        &["serve", "--config", path.to_str().expect("UTF-8 path")],
        log,
    )
}

/// Starts a cloud service talking to the mediator at `api`.
pub fn start_cloud(dir: &TempDir, api: SocketAddr) -> Proc {
    let keydir = keys(dir, "cloud-keys");
    let cfg = json!({
        "listen": "127.0.0.1:0",
        "api_listen": "127.0.0.1:0",
        "cert": keydir.join("cert.pem"),
        "key": keydir.join("key.pem"),
        "mediator": format!("http://{api}"),
        "token": TOKEN,
        "ticket_key": hex(&TICKET_KEY),
        "retry_base_ms": 100,
        "retry_max_ms": 1000,
        "poll_ms": 200,
    });
    let path = dir.path("cloud.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json"))
        .expect("write the config");
    Proc::start(
        env!("CARGO_BIN_EXE_duplex-cloud"),
        &["serve", "--config", path.to_str().expect("UTF-8 path")],
        dir.path("cloud.log"),
    )
}

/// A simulated relay with quick reconnects.
pub fn sim_relay(
    mediator: &Proc,
    cloud_pin: [u8; 32],
    id: &str,
    devices: &[&str],
    device: Arc<FakeDevice>,
) -> RelaySim {
    sim_relay_with(mediator, cloud_pin, id, devices, device, |_| {})
}

/// A simulated relay with quick reconnects, set up further by `setup` (sleep, LAN).
pub fn sim_relay_with(
    mediator: &Proc,
    cloud_pin: [u8; 32],
    id: &str,
    devices: &[&str],
    device: Arc<FakeDevice>,
    setup: impl FnOnce(&mut SimConfig),
) -> RelaySim {
    let mut cfg = SimConfig::new(
        mediator.addr("relays"),
        mediator.pin(),
        cloud_pin,
        id,
        SECRET,
        devices,
    );
    cfg.backoff_base_ms = 100;
    cfg.backoff_max_ms = 500;
    setup(&mut cfg);
    RelaySim::spawn(cfg, device).expect("start the simulated relay")
}

/// `GET` on the mediator's API with the cloud's token.
pub async fn api_get(api: SocketAddr, path: &str) -> http::Response {
    http::request(
        &format!("http://{api}"),
        "GET",
        path,
        Some(TOKEN),
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("mediator API")
}

/// The mediator's `/v1/relays` entry of `relay_id`.
pub async fn relay_status(api: SocketAddr, relay_id: &str) -> Value {
    let r = api_get(api, "/v1/relays").await;
    r.body["relays"]
        .as_array()
        .expect("relays list")
        .iter()
        .find(|r| r["relay_id"] == relay_id)
        .cloned()
        .expect("relay in /v1/relays")
}

/// Submits a job to the cloud's local API and waits for its report.
pub async fn submit(cloud: &Proc, body: Value) -> Value {
    let base = format!("http://{}", cloud.addr("api"));
    let r = http::request(
        &base,
        "POST",
        "/v1/jobs",
        None,
        Some(&body),
        Duration::from_secs(120),
    )
    .await
    .expect("cloud API");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// The cloud's tunnels.
pub async fn cloud_tunnels(cloud: &Proc) -> Vec<Value> {
    let base = format!("http://{}", cloud.addr("api"));
    let r = http::request(
        &base,
        "GET",
        "/v1/tunnels",
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("cloud API");
    r.body["tunnels"].as_array().expect("tunnels list").clone()
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the mediator's log contains `text`.
pub async fn wait_for_log(p: &Proc, text: &str) {
    let t = text.to_string();
    wait_for(
        Duration::from_secs(10),
        &format!("log line {text:?}"),
        || {
            let found = p.log_text().contains(&t);
            async move { found }
        },
    )
    .await
}

/// A path's string.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Starts a cloud service talking to the mediator at `api`, its configuration (in
/// `dir/cloud.json`, keys in `dir/cloud-keys`, both kept across restarts) with `extra`'s
/// keys added (`users`, `share_db`, ...).
pub fn start_cloud_with(dir: &TempDir, api: SocketAddr, extra: Value) -> Proc {
    let keydir = dir.path("cloud-keys");
    if !keydir.join("cert.pem").exists() {
        keys(dir, "cloud-keys");
    }
    let mut cfg = json!({
        "listen": "127.0.0.1:0",
        "api_listen": "127.0.0.1:0",
        "cert": keydir.join("cert.pem"),
        "key": keydir.join("key.pem"),
        "mediator": format!("http://{api}"),
        "token": TOKEN,
        "ticket_key": hex(&TICKET_KEY),
        "retry_base_ms": 100,
        "retry_max_ms": 1000,
        "poll_ms": 200,
    });
    if let (Some(cfg), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            cfg.insert(k.clone(), v.clone());
        }
    }
    let path = dir.path("cloud.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json"))
        .expect("write the config");
    let log = dir.path(&format!("cloud-{:x}.log", random_u64() & 0xffff));
    Proc::start(
        env!("CARGO_BIN_EXE_duplex-cloud"),
        &["serve", "--config", path.to_str().expect("UTF-8 path")],
        log,
    )
}

/// A plain HTTP/1.1 request (`Connection: close`) to `addr` with an optional bearer token:
/// the status and the raw body (for answers that are not JSON).
pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    (status, raw[split + 4..].to_vec())
}
