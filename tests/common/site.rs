//! The substitute-relay scene of the end-to-end tests, as `scripts/demo_relays.py` plays it:
//! one LAN (segment `lan-1`, `scripts/relay-net --taps 2`) with two relay partitions,
//! `relay-a` (device `mfp-a`, TAP `dxtap0`) and `relay-b` (device `mfp-b`, TAP `dxtap1`),
//! beside the engine and the controller; `duplex-mediator serve` (registry of both, short
//! wake deadlines) and `duplex-cloud serve` in the WAN. Either relay may be told to sleep
//! after an idle time (`sleep_idle_ms=`).
//!
//! It shares the servers, `duplex-cloud submit`, keys and HTTP helpers of
//! [`super::relay_scene`].

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::relay_scene::{
    boot_in_lan, http_get, keygen, mediator_bin, random_hex32, wait_for, write_server_configs,
    Server, Submit, MEDIATOR_API, T, TOKEN,
};
use super::relaynet::{RelayNet, CLOUD_IP, MEDIATOR_IP};
use super::{guest, Device, TempDir};

/// The LAN segment both relays announce.
pub const SEGMENT: &str = "lan-1";

/// One relay of the site: partition name (= relay id), device, TAP, MAC, address, CID.
pub struct RelaySpec {
    pub id: &'static str,
    pub device: &'static str,
    pub tap: &'static str,
    pub mac: &'static str,
    pub ip: &'static str,
    pub cid: u32,
}

/// The substitute.
pub const A: RelaySpec = RelaySpec {
    id: "relay-a",
    device: "mfp-a",
    tap: "dxtap0",
    mac: "52:54:00:77:01:0a",
    ip: "10.77.1.10",
    cid: 5,
};
/// The sleeper.
pub const B: RelaySpec = RelaySpec {
    id: "relay-b",
    device: "mfp-b",
    tap: "dxtap1",
    mac: "52:54:00:77:01:0b",
    ip: "10.77.1.11",
    cid: 6,
};

/// What a test changes.
#[derive(Clone, Debug)]
pub struct SiteOpts {
    /// `sleep_idle_ms=` of relay-a and relay-b (`None`: never sleeps).
    pub a_sleep_idle_ms: Option<u64>,
    pub b_sleep_idle_ms: Option<u64>,
    /// The mediator's wake deadline, retry interval and attempts.
    pub wake_timeout_ms: u64,
    pub wake_retry_ms: u64,
    pub wake_attempts: u32,
}

impl Default for SiteOpts {
    fn default() -> Self {
        SiteOpts {
            a_sleep_idle_ms: None,
            b_sleep_idle_ms: Some(2_000),
            wake_timeout_ms: 8_000,
            wake_retry_ms: 2_000,
            wake_attempts: 3,
        }
    }
}

/// The site: network, servers, device.
pub struct Site {
    pub opts: SiteOpts,
    pub device: Option<Device>,
    pub mediator: Option<Server>,
    pub cloud: Option<Server>,
    pub net: RelayNet,
    pub work: TempDir,
    secrets: [String; 2],
    mediator_pin: String,
    cloud_pin: String,
    submits: u32,
}

impl Site {
    /// Network, servers and device up; both relays logged in once.
    pub fn up(opts: SiteOpts) -> Site {
        let net = RelayNet::up(2);
        let work = TempDir::new("relays-site");
        let mediator_pin = keygen(&work.0.join("keys/mediator"), MEDIATOR_IP);
        let cloud_pin = keygen(&work.0.join("keys/cloud"), CLOUD_IP);
        let secrets = [random_hex32(), random_hex32()];
        let ticket_key = random_hex32();
        write_server_configs(
            &work.0,
            &ticket_key,
            json!([
                {"id": A.id, "secret": secrets[0], "devices": [A.device]},
                {"id": B.id, "secret": secrets[1], "devices": [B.device]},
            ]),
            json!({
                "wake_timeout_ms": opts.wake_timeout_ms,
                "wake_retry_ms": opts.wake_retry_ms,
                "wake_attempts": opts.wake_attempts,
            }),
        );
        let mut site = Site {
            opts,
            device: None,
            mediator: None,
            cloud: None,
            net,
            work,
            secrets,
            mediator_pin,
            cloud_pin,
            submits: 0,
        };
        for (name, config) in [("mediator", "mediator.json"), ("cloud", "cloud.json")] {
            let config = site.work.0.join(config).display().to_string();
            let server = Server::start(
                &site.net,
                &mediator_bin(&format!("duplex-{name}")),
                &["serve", "--config", &config],
                site.work.0.join(format!("{name}.log")),
            );
            if name == "mediator" {
                site.mediator = Some(server);
            } else {
                site.cloud = Some(server);
            }
        }
        site.device = Some(site.boot(None));
        for r in [&A, &B] {
            site.wait_console(r.id, "session up", T);
        }
        site
    }

    fn cmdline(&self, r: &RelaySpec, secret: &str, sleep_idle_ms: Option<u64>) -> String {
        let sleep = sleep_idle_ms
            .map(|ms| format!(" sleep_idle_ms={ms}"))
            .unwrap_or_default();
        format!(
            "role=relay ip={}/24 gw=10.77.1.1 relay_id={} secret={secret} devices={} \
             mediator={MEDIATOR_IP}:7443 mediator_pin={} cloud_pin={} controller_cid=4 \
             backoff_base_ms=250 backoff_max_ms=2000 segment={SEGMENT}{sleep}",
            r.ip, r.id, r.device, self.mediator_pin, self.cloud_pin,
        )
    }

    /// The device's configuration: engine, controller, relay-a and relay-b.
    pub fn device_config(&self) -> Value {
        let part = |name: &str, role: &str, image: &str, mib: u64, cmdline: String| {
            json!({"name": name, "role": role, "kernel": guest(image), "memory_mib": mib,
                   "vcpus": 1, "cmdline": cmdline, "console": "stdout"})
        };
        let mut engine = part(
            "engine",
            "engine",
            "engine",
            96,
            "role=engine calib_mib=16".into(),
        );
        engine["vsock"] = json!({"cid": 3});
        let mut controller = part(
            "controller",
            "controller",
            "controller",
            64,
            "role=controller engine_cid=3".into(),
        );
        controller["vsock"] = json!({"cid": 4, "uds": "controller.vsock"});
        let mut parts = vec![engine, controller];
        for (r, secret, sleep) in [
            (&A, &self.secrets[0], self.opts.a_sleep_idle_ms),
            (&B, &self.secrets[1], self.opts.b_sleep_idle_ms),
        ] {
            let mut p = part(r.id, "relay", "relay", 32, self.cmdline(r, secret, sleep));
            p["vsock"] = json!({"cid": r.cid});
            p["net"] = json!({"tap": r.tap, "mac": r.mac});
            parts.push(p);
        }
        json!({"device": "mfp-site", "partitions": parts})
    }

    /// A new monitor in the LAN namespace (cold, or restored from `restore`).
    pub fn boot(&self, restore: Option<&Path>) -> Device {
        boot_in_lan(&self.net, &self.device_config(), restore)
    }

    /// The running device.
    pub fn dev(&self) -> &Device {
        self.device.as_ref().expect("the device is running")
    }

    /// Console lines of partition `name` containing `needle`.
    pub fn console(&self, name: &str, needle: &str) -> Vec<String> {
        self.dev()
            .console(name)
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// A server's log (`mediator` or `cloud`).
    pub fn log(&self, server: &str) -> String {
        std::fs::read(self.work.0.join(format!("{server}.log")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The relays' consoles and the servers' logs' tails, for failure messages.
    pub fn context(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        let mut s = String::new();
        if let Some(d) = &self.device {
            for r in [&A, &B] {
                s += &format!(
                    "--- {} console:\n{}\n",
                    r.id,
                    tail(d.console(r.id).join("\n"))
                );
            }
        }
        for server in ["mediator", "cloud"] {
            s += &format!("--- {server} log:\n{}\n", tail(self.log(server)));
        }
        s
    }

    /// Waits until a console line of partition `name` contains `needle`; returns it.
    pub fn wait_console(&self, name: &str, needle: &str, limit: Duration) -> String {
        self.wait_console_count(name, needle, 1, limit)
    }

    /// Waits until `n` console lines of `name` contain `needle`; returns the `n`-th.
    pub fn wait_console_count(
        &self,
        name: &str,
        needle: &str,
        n: usize,
        limit: Duration,
    ) -> String {
        wait_for(
            limit,
            &format!("{name} console line {n} with {needle:?}"),
            || self.context(),
            || self.console(name, needle).into_iter().nth(n - 1),
        )
    }

    /// The mediator's record of relay `id` (`GET /v1/relays`).
    pub fn relay_record(&self, id: &str) -> Value {
        let (status, v) = http_get(&self.net, MEDIATOR_API, "/v1/relays", Some(TOKEN));
        assert_eq!(status, 200, "mediator /v1/relays: {v}");
        v["relays"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["relay_id"] == id).cloned())
            .unwrap_or_else(|| panic!("relay {id} not in {v}"))
    }

    /// The mediator's `GET /v1/tunnels/{id}`.
    pub fn mediator_tunnel(&self, id: u64) -> Value {
        let (status, v) = http_get(
            &self.net,
            MEDIATOR_API,
            &format!("/v1/tunnels/{id}"),
            Some(TOKEN),
        );
        assert_eq!(status, 200, "mediator /v1/tunnels/{id}: {v}");
        v
    }

    /// Waits until relay `r` sleeps: its console says so, the monitor shows it `sleeping`
    /// and the mediator too. Returns the monitor's status of it.
    pub fn wait_asleep(&self, r: &RelaySpec, n: usize) -> Value {
        self.wait_console_count(r.id, "relay: asleep", n, T);
        let status = self.dev().wait_state(r.id, "sleeping", T);
        wait_for(
            T,
            &format!("the mediator's {} sleeping", r.id),
            || format!("{}\n{}", self.relay_record(r.id), self.context()),
            || (self.relay_record(r.id)["state"] == "sleeping").then_some(()),
        );
        status
    }

    /// `duplex-cloud submit --device DEVICE ARGS --timeout-s TIMEOUT` in the background.
    pub fn submit_bg(&mut self, device: &str, args: &[&str], timeout_s: u64) -> Submit {
        self.submits += 1;
        Submit::start(
            &self.net,
            &self.work.0,
            self.submits,
            device,
            args,
            timeout_s,
        )
    }

    /// `duplex-cloud submit ...`: its report.
    pub fn submit(&mut self, device: &str, args: &[&str], timeout_s: u64) -> Value {
        self.submit_bg(device, args, timeout_s).wait()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut d) = self.device.take() {
            d.kill();
        }
        self.cloud.take();
        self.mediator.take();
        if std::env::var_os("DUPLEX_KEEP_TEST_DIRS").is_some() {
            let kept = self.work.0.with_extension("kept");
            let _ = std::fs::rename(&self.work.0, &kept);
            eprintln!("kept {}", kept.display());
        }
    }
}
