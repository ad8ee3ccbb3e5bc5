//! The relay's configuration, from `key=value` words of its command line
//! (`docs/relay.md`). Parsing takes a lookup function, so the firmware passes
//! `BootInfo::arg` and the tests a table.
//!
//! Every problem is reported with the key it concerns ([`ConfigError`]); all of them are
//! collected, so one boot shows everything that is wrong.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use duplex_tunnel::{
    parse_key, valid_id, Endpoint, DEFAULT_CONTROL_PORT, KEY_LEN, MAX_DEVICES_PER_RELAY,
};

use crate::backoff::{DEFAULT_BASE_MS, DEFAULT_CAP_MS};

/// The controller's vsock CID when the command line has no `controller_cid=`.
pub const DEFAULT_CONTROLLER_CID: u64 = 4;
/// Heartbeat interval until the server's `Welcome` says otherwise.
pub const DEFAULT_HEARTBEAT_MS: u32 = 30_000;
/// Heartbeat timeout until the server's `Welcome` says otherwise.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u32 = 45_000;
/// How long a login may take, from the dial to `Welcome`.
pub const DEFAULT_LOGIN_TIMEOUT_MS: u64 = 15_000;
/// Shortest `sleep_idle_ms=` (other than `0`, never).
pub const MIN_SLEEP_IDLE_MS: u64 = 1_000;
/// Longest `sleep_idle_ms=` (a day).
pub const MAX_SLEEP_IDLE_MS: u64 = 86_400_000;

/// A configuration problem: the key and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The command-line key, without `=`.
    pub key: &'static str,
    /// What is wrong.
    pub why: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=: {}", self.key, self.why)
    }
}

/// What the relay logic needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// `relay_id=`: this relay's identity at the mediation server.
    pub relay_id: String,
    /// `secret=`: the 32-byte login secret (64 hex digits).
    pub secret: [u8; KEY_LEN],
    /// `devices=`: the devices this relay serves, comma-separated.
    pub devices: Vec<String>,
    /// `mediator=IP[:PORT]`: the mediation server (port 7443 by default).
    pub mediator: Endpoint,
    /// `mediator_pin=`: SHA-256 of the mediation server's SubjectPublicKeyInfo.
    pub mediator_pin: [u8; 32],
    /// `cloud_pin=`: SHA-256 of the cloud servers' SubjectPublicKeyInfo.
    pub cloud_pin: [u8; 32],
    /// `controller_cid=`: the controller partition's vsock CID (4).
    pub controller_cid: u64,
    /// `backoff_base_ms=` (250).
    pub backoff_base_ms: u64,
    /// `backoff_max_ms=` (30 000).
    pub backoff_max_ms: u64,
    /// `heartbeat_ms=` (30 000): used until a `Welcome` sets it, and when a `Welcome`'s
    /// values are unusable.
    pub heartbeat_ms: u32,
    /// `heartbeat_timeout_ms=` (45 000), likewise.
    pub heartbeat_timeout_ms: u32,
    /// `login_timeout_ms=` (15 000): dial to `Welcome`.
    pub login_timeout_ms: u64,
    /// `segment=`: the LAN segment the relay is on (a `valid_id`; relays on one segment can
    /// wake each other with a broadcast). Without it the relay is no substitute and never
    /// sleeps.
    pub segment: Option<String>,
    /// `sleep_idle_ms=`: sleep after this long without tunnel work (at least
    /// [`MIN_SLEEP_IDLE_MS`]); absent or `0`: never.
    pub sleep_idle_ms: Option<u64>,
    /// The network card's MAC: not on the command line; the firmware sets it from its
    /// card before [`crate::Relay::new`]. Without it the relay never sleeps.
    pub mac: Option<[u8; 6]>,
}

impl Default for RelayConfig {
    /// Empty identity, zero secret and pins, mediator `0.0.0.0:7443`, and the defaults of
    /// the optional keys: for building a configuration in code with
    /// `RelayConfig { relay_id, secret, .., ..Default::default() }`.
    fn default() -> Self {
        RelayConfig {
            relay_id: String::new(),
            secret: [0; KEY_LEN],
            devices: Vec::new(),
            mediator: Endpoint {
                ip: [0; 4],
                port: DEFAULT_CONTROL_PORT,
            },
            mediator_pin: [0; 32],
            cloud_pin: [0; 32],
            controller_cid: DEFAULT_CONTROLLER_CID,
            backoff_base_ms: DEFAULT_BASE_MS,
            backoff_max_ms: DEFAULT_CAP_MS,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
            login_timeout_ms: DEFAULT_LOGIN_TIMEOUT_MS,
            segment: None,
            sleep_idle_ms: None,
            mac: None,
        }
    }
}

/// The relay's network address: `ip=A.B.C.D/N` and `gw=A.B.C.D` (optional).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub ip: [u8; 4],
    pub prefix_len: u8,
    pub gateway: Option<[u8; 4]>,
}

/// Parses a dotted-quad IPv4 address.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Parses `IP[:PORT]`; the port defaults to `default_port` and must not be 0.
pub fn parse_endpoint(s: &str, default_port: u16) -> Option<Endpoint> {
    let (ip, port) = match s.split_once(':') {
        Some((ip, port)) => (ip, port.parse().ok().filter(|p| *p != 0)?),
        None => (s, default_port),
    };
    Some(Endpoint {
        ip: parse_ipv4(ip)?,
        port,
    })
}

/// `a.b.c.d:port`.
pub fn endpoint_string(e: &Endpoint) -> String {
    format!("{}.{}.{}.{}:{}", e.ip[0], e.ip[1], e.ip[2], e.ip[3], e.port)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Collects errors while reading keys.
struct Reader<F> {
    arg: F,
    errors: Vec<ConfigError>,
}

impl<'a, F: Fn(&str) -> Option<&'a str>> Reader<F> {
    fn fail(&mut self, key: &'static str, why: impl ToString) {
        self.errors.push(ConfigError {
            key,
            why: why.to_string(),
        });
    }

    /// A required key's value.
    fn required(&mut self, key: &'static str) -> Option<&'a str> {
        match (self.arg)(key) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.fail(key, "missing (required)");
                None
            }
        }
    }

    fn key32(&mut self, key: &'static str) -> [u8; 32] {
        let Some(v) = self.required(key) else {
            return [0; 32];
        };
        parse_key(v).unwrap_or_else(|| {
            self.fail(key, "must be 64 hex digits");
            [0; 32]
        })
    }

    /// An optional number with a default, within `min..=max`.
    fn number(&mut self, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
        let Some(v) = (self.arg)(key) else {
            return default;
        };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.fail(key, format!("must be a number from {min} to {max}"));
                default
            }
        }
    }
}

/// Reads the relay's configuration; `Err` lists every problem.
pub fn parse_config<'a, F>(arg: F) -> Result<RelayConfig, Vec<ConfigError>>
where
    F: Fn(&str) -> Option<&'a str>,
{
    let mut r = Reader {
        arg,
        errors: Vec::new(),
    };
    let relay_id = r.required("relay_id").unwrap_or_default();
    if !relay_id.is_empty() && !valid_id(relay_id) {
        r.fail(
            "relay_id",
            "must be 1-64 ASCII letters, digits, '-', '_', '.', ':' or '@'",
        );
    }
    let secret = r.key32("secret");
    let mut devices = Vec::new();
    if let Some(list) = r.required("devices") {
        for d in list.split(',') {
            if !valid_id(d) {
                r.fail("devices", format!("{d:?} is not a valid device id"));
            } else if devices.iter().any(|x: &String| x == d) {
                r.fail("devices", format!("{d} is listed twice"));
            } else {
                devices.push(d.to_string());
            }
        }
        if devices.len() > MAX_DEVICES_PER_RELAY {
            r.fail(
                "devices",
                format!("at most {MAX_DEVICES_PER_RELAY} devices per relay"),
            );
        }
    }
    let mediator = r.required("mediator").and_then(|v| {
        let e = parse_endpoint(v, DEFAULT_CONTROL_PORT);
        if e.is_none() {
            r.fail("mediator", "must be IP or IP:PORT (IPv4, port 1-65535)");
        }
        e
    });
    let mediator_pin = r.key32("mediator_pin");
    let cloud_pin = r.key32("cloud_pin");
    let controller_cid = r.number(
        "controller_cid",
        DEFAULT_CONTROLLER_CID,
        3,
        u64::from(u32::MAX),
    );
    let backoff_base_ms = r.number("backoff_base_ms", DEFAULT_BASE_MS, 1, 3_600_000);
    let backoff_max_ms = r.number("backoff_max_ms", DEFAULT_CAP_MS, 1, 3_600_000);
    if backoff_max_ms < backoff_base_ms {
        r.fail("backoff_max_ms", "must be at least backoff_base_ms");
    }
    let heartbeat_ms = r.number("heartbeat_ms", DEFAULT_HEARTBEAT_MS.into(), 1, 3_600_000);
    let heartbeat_timeout_ms = r.number(
        "heartbeat_timeout_ms",
        DEFAULT_HEARTBEAT_TIMEOUT_MS.into(),
        2,
        3_600_000,
    );
    if heartbeat_timeout_ms <= heartbeat_ms {
        r.fail("heartbeat_timeout_ms", "must exceed heartbeat_ms");
    }
    let login_timeout_ms = r.number("login_timeout_ms", DEFAULT_LOGIN_TIMEOUT_MS, 100, 3_600_000);
    let segment = (r.arg)("segment").and_then(|v| {
        if valid_id(v) {
            Some(v.to_string())
        } else {
            r.fail(
                "segment",
                "must be 1-64 ASCII letters, digits, '-', '_', '.', ':' or '@'",
            );
            None
        }
    });
    let sleep_idle_ms = match (r.arg)("sleep_idle_ms").map(str::parse::<u64>) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) if (MIN_SLEEP_IDLE_MS..=MAX_SLEEP_IDLE_MS).contains(&n) => Some(n),
        Some(_) => {
            r.fail(
                "sleep_idle_ms",
                format!(
                    "must be 0 (never sleep) or a number from {MIN_SLEEP_IDLE_MS} to {MAX_SLEEP_IDLE_MS}"
                ),
            );
            None
        }
    };
    match (r.errors.is_empty(), mediator) {
        (true, Some(mediator)) => Ok(RelayConfig {
            relay_id: relay_id.to_string(),
            secret,
            devices,
            mediator,
            mediator_pin,
            cloud_pin,
            controller_cid,
            backoff_base_ms,
            backoff_max_ms,
            // Both were range-checked to at most 3 600 000.
            heartbeat_ms: heartbeat_ms as u32,
            heartbeat_timeout_ms: heartbeat_timeout_ms as u32,
            login_timeout_ms,
            segment,
            sleep_idle_ms,
            mac: None,
        }),
        _ => Err(r.errors),
    }
}

/// Reads `ip=A.B.C.D/N` (required) and `gw=A.B.C.D` (optional).
pub fn parse_net<'a, F>(arg: F) -> Result<NetConfig, Vec<ConfigError>>
where
    F: Fn(&str) -> Option<&'a str>,
{
    let mut r = Reader {
        arg,
        errors: Vec::new(),
    };
    let ip = r.required("ip").and_then(|v| {
        let parsed = v.split_once('/').and_then(|(ip, len)| {
            let len: u8 = len.parse().ok().filter(|l| (1..=32).contains(l))?;
            Some((parse_ipv4(ip)?, len))
        });
        if parsed.is_none() {
            r.fail(
                "ip",
                "must be A.B.C.D/N (IPv4 address and prefix length 1-32)",
            );
        }
        parsed
    });
    let gateway = match (r.arg)("gw") {
        None => None,
        Some(v) => {
            let gw = parse_ipv4(v);
            if gw.is_none() {
                r.fail("gw", "must be an IPv4 address A.B.C.D");
            }
            gw
        }
    };
    match (r.errors.is_empty(), ip) {
        (true, Some((ip, prefix_len))) => Ok(NetConfig {
            ip,
            prefix_len,
            gateway,
        }),
        _ => Err(r.errors),
    }
}
