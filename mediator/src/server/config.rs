//! The mediation server's configuration file (JSON; `docs/mediator.md#configuration`),
//! read and checked: every problem is an error naming the field.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use duplex_tunnel::{parse_key, valid_id, KEY_LEN, MAX_DEVICES_PER_RELAY};
use serde::Deserialize;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {field}: {why}")]
    Invalid {
        path: PathBuf,
        field: String,
        why: String,
    },
}

fn default_relay_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], duplex_tunnel::DEFAULT_CONTROL_PORT))
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_heartbeat_ms() -> u32 {
    30_000
}
fn default_heartbeat_timeout_ms() -> u32 {
    45_000
}
fn default_ticket_ttl_ms() -> u64 {
    30_000
}
fn default_pending_ttl_ms() -> u64 {
    300_000
}
fn default_login_timeout_ms() -> u64 {
    10_000
}
fn default_wake_timeout_ms() -> u64 {
    15_000
}
fn default_wake_retry_ms() -> u64 {
    3_000
}
fn default_wake_attempts() -> u32 {
    3
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_relay_listen")]
    relay_listen: SocketAddr,
    #[serde(default = "default_api_listen")]
    api_listen: SocketAddr,
    #[serde(default)]
    db: Option<PathBuf>,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    heartbeat_ms: u32,
    #[serde(default = "default_heartbeat_timeout_ms")]
    heartbeat_timeout_ms: u32,
    #[serde(default = "default_ticket_ttl_ms")]
    ticket_ttl_ms: u64,
    #[serde(default = "default_pending_ttl_ms")]
    pending_ttl_ms: u64,
    #[serde(default = "default_login_timeout_ms")]
    login_timeout_ms: u64,
    #[serde(default = "default_wake_timeout_ms")]
    wake_timeout_ms: u64,
    #[serde(default = "default_wake_retry_ms")]
    wake_retry_ms: u64,
    #[serde(default = "default_wake_attempts")]
    wake_attempts: u32,
    #[serde(default)]
    clouds: Vec<RawCloud>,
    #[serde(default)]
    relays: Vec<RawRelay>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    name: String,
    token: String,
    ticket_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    id: String,
    secret: String,
    #[serde(default)]
    devices: Vec<String>,
}

/// A cloud server allowed to use the API.
#[derive(Clone, Debug)]
pub struct CloudEntry {
    pub name: String,
    pub token: String,
    pub ticket_key: [u8; KEY_LEN],
}

/// A relay of the registry.
#[derive(Clone, Debug)]
pub struct RelayEntry {
    pub id: String,
    pub secret: [u8; KEY_LEN],
    pub devices: Vec<String>,
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub relay_listen: SocketAddr,
    pub api_listen: SocketAddr,
    /// The SQLite file; `None` keeps everything in memory.
    pub db: Option<PathBuf>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub heartbeat_ms: u32,
    pub heartbeat_timeout_ms: u32,
    pub ticket_ttl_ms: u64,
    pub pending_ttl_ms: u64,
    pub login_timeout_ms: u64,
    /// How long a sleeping relay has to log in after the first `WakeRelay` for it.
    pub wake_timeout_ms: u64,
    /// How often `WakeRelay` is sent again while the relay has not logged in.
    pub wake_retry_ms: u64,
    /// Most `WakeRelay` messages per wake.
    pub wake_attempts: u32,
    pub clouds: Vec<CloudEntry>,
    pub relays: Vec<RelayEntry>,
    /// Device id → the relay that serves it.
    pub device_relay: HashMap<String, String>,
}

impl Config {
    /// Reads and checks `path`; relative paths in it are taken from its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            ConfigError::Invalid { field, why, .. } => ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                why,
            },
            other => other,
        })
    }

    /// Checks the JSON text of a configuration; relative paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        let invalid = |field: String, why: &str| ConfigError::Invalid {
            path: PathBuf::new(),
            field,
            why: why.to_string(),
        };
        if raw.heartbeat_ms == 0 {
            return Err(invalid("heartbeat_ms".into(), "must be over 0"));
        }
        if raw.heartbeat_timeout_ms <= raw.heartbeat_ms {
            return Err(invalid(
                "heartbeat_timeout_ms".into(),
                &format!(
                    "{} must be greater than heartbeat_ms ({})",
                    raw.heartbeat_timeout_ms, raw.heartbeat_ms
                ),
            ));
        }
        if raw.ticket_ttl_ms == 0 || raw.pending_ttl_ms == 0 || raw.login_timeout_ms == 0 {
            return Err(invalid(
                "ticket_ttl_ms/pending_ttl_ms/login_timeout_ms".into(),
                "must be over 0",
            ));
        }
        if raw.wake_timeout_ms == 0 {
            return Err(invalid("wake_timeout_ms".into(), "must be over 0"));
        }
        if raw.wake_retry_ms == 0 || raw.wake_retry_ms >= raw.wake_timeout_ms {
            return Err(invalid(
                "wake_retry_ms".into(),
                &format!(
                    "{} must be over 0 and less than wake_timeout_ms ({})",
                    raw.wake_retry_ms, raw.wake_timeout_ms
                ),
            ));
        }
        if raw.wake_attempts == 0 {
            return Err(invalid("wake_attempts".into(), "must be 1 or more"));
        }
        let mut clouds = Vec::new();
        let mut names = HashSet::new();
        let mut tokens = HashSet::new();
        for (i, c) in raw.clouds.into_iter().enumerate() {
            let at = |f: &str| format!("clouds[{i}].{f}");
            if c.name.is_empty() || !names.insert(c.name.clone()) {
                return Err(invalid(at("name"), "empty or used twice"));
            }
            if c.token.len() < 8
                || c.token.chars().any(|ch| ch.is_whitespace())
                || !tokens.insert(c.token.clone())
            {
                return Err(invalid(
                    at("token"),
                    "needs 8 or more non-blank characters, unique",
                ));
            }
            let ticket_key = parse_key(&c.ticket_key)
                .ok_or_else(|| invalid(at("ticket_key"), "expected 64 hex digits"))?;
            clouds.push(CloudEntry {
                name: c.name,
                token: c.token,
                ticket_key,
            });
        }
        let mut relays = Vec::new();
        let mut device_relay = HashMap::new();
        let mut ids = HashSet::new();
        for (i, r) in raw.relays.into_iter().enumerate() {
            let at = |f: &str| format!("relays[{i}].{f}");
            if !valid_id(&r.id) {
                return Err(invalid(at("id"), "1-64 of A-Z a-z 0-9 - _ . : @"));
            }
            if !ids.insert(r.id.clone()) {
                return Err(invalid(at("id"), &format!("relay {} listed twice", r.id)));
            }
            let secret = parse_key(&r.secret)
                .ok_or_else(|| invalid(at("secret"), "expected 64 hex digits"))?;
            if r.devices.len() > MAX_DEVICES_PER_RELAY {
                return Err(invalid(at("devices"), "more than 64 devices"));
            }
            for (j, d) in r.devices.iter().enumerate() {
                if !valid_id(d) {
                    return Err(invalid(
                        format!("relays[{i}].devices[{j}]"),
                        "1-64 of A-Z a-z 0-9 - _ . : @",
                    ));
                }
                if let Some(other) = device_relay.insert(d.clone(), r.id.clone()) {
                    return Err(invalid(
                        format!("relays[{i}].devices[{j}]"),
                        &format!("device {d} is also listed for relay {other}"),
                    ));
                }
            }
            relays.push(RelayEntry {
                id: r.id,
                secret,
                devices: r.devices,
            });
        }
        let join = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Config {
            relay_listen: raw.relay_listen,
            api_listen: raw.api_listen,
            db: raw.db.map(join),
            cert: join(raw.cert),
            key: join(raw.key),
            heartbeat_ms: raw.heartbeat_ms,
            heartbeat_timeout_ms: raw.heartbeat_timeout_ms,
            ticket_ttl_ms: raw.ticket_ttl_ms,
            pending_ttl_ms: raw.pending_ttl_ms,
            login_timeout_ms: raw.login_timeout_ms,
            wake_timeout_ms: raw.wake_timeout_ms,
            wake_retry_ms: raw.wake_retry_ms,
            wake_attempts: raw.wake_attempts,
            clouds,
            relays,
            device_relay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/duplex"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(&format!(
            r#"{{"cert":"cert.pem","key":"/k.pem","db":"m.db",
                "clouds":[{{"name":"c1","token":"secret-token","ticket_key":"{KEY}"}}],
                "relays":[{{"id":"r1","secret":"{KEY}","devices":["d1","d2"]}}]}}"#
        ))
        .unwrap();
        assert_eq!(c.relay_listen.to_string(), "0.0.0.0:7443");
        assert_eq!(c.api_listen.to_string(), "0.0.0.0:8080");
        assert_eq!(
            (c.heartbeat_ms, c.heartbeat_timeout_ms, c.ticket_ttl_ms),
            (30_000, 45_000, 30_000)
        );
        assert_eq!(c.cert, Path::new("/etc/duplex/cert.pem"));
        assert_eq!(c.key, Path::new("/k.pem"));
        assert_eq!(c.db.as_deref(), Some(Path::new("/etc/duplex/m.db")));
        assert_eq!(c.device_relay["d2"], "r1");
        assert_eq!(
            (c.wake_timeout_ms, c.wake_retry_ms, c.wake_attempts),
            (15_000, 3_000, 3)
        );
    }

    #[test]
    fn refuses_what_is_wrong_naming_the_field() {
        let cases = [
            (
                r#"{"cert":"c","key":"k","heartbeat_ms":1000,"heartbeat_timeout_ms":1000}"#,
                "heartbeat_timeout_ms",
            ),
            (
                r#"{"cert":"c","key":"k","wake_timeout_ms":3000,"wake_retry_ms":3000}"#,
                "wake_retry_ms: 3000 must be over 0 and less than wake_timeout_ms (3000)",
            ),
            (
                r#"{"cert":"c","key":"k","wake_attempts":0}"#,
                "wake_attempts",
            ),
            (
                r#"{"cert":"c","key":"k","wake_timeout_ms":0}"#,
                "wake_timeout_ms",
            ),
            (
                r#"{"cert":"c","key":"k","clouds":[{"name":"c","token":"tok-tok-tok","ticket_key":"zz"}]}"#,
                "clouds[0].ticket_key",
            ),
            (
                r#"{"cert":"c","key":"k","relays":[{"id":"bad id","secret":"00"}]}"#,
                "relays[0].id",
            ),
        ];
        for (text, field) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let twice = format!(
            r#"{{"cert":"c","key":"k","relays":[{{"id":"a","secret":"{KEY}","devices":["d"]}},{{"id":"b","secret":"{KEY}","devices":["d"]}}]}}"#
        );
        assert!(parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("also listed for relay a"));
        assert!(parse(r#"{"cert":"c","key":"k","bogus":1}"#)
            .unwrap_err()
            .to_string()
            .contains("bogus"));
    }
}
