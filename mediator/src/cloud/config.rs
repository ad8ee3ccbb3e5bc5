//! The cloud print service's configuration file (JSON; `docs/mediator.md#duplex-cloud`).

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use duplex_docs::CloudUser;
use duplex_tunnel::{parse_key, KEY_LEN};
use serde::Deserialize;

use crate::server::config::ConfigError;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], duplex_tunnel::DEFAULT_TUNNEL_PORT))
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9080))
}
fn default_user() -> String {
    "cloud".into()
}
fn default_retry_base_ms() -> u64 {
    250
}
fn default_retry_max_ms() -> u64 {
    5_000
}
fn default_poll_ms() -> u64 {
    500
}
fn default_share_poll_ms() -> u64 {
    60_000
}

/// A `users` entry: a SCIM user and, optionally, the bearer token it reads shared
/// documents with (never listed by SCIM).
#[derive(Debug, Deserialize)]
struct RawUser {
    #[serde(flatten)]
    user: CloudUser,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloudConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default)]
    dial: Option<SocketAddrV4>,
    #[serde(default = "default_api_listen")]
    api_listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    mediator: String,
    token: String,
    ticket_key: String,
    #[serde(default = "default_user")]
    user: String,
    #[serde(default = "default_retry_base_ms")]
    retry_base_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    retry_max_ms: u64,
    #[serde(default = "default_poll_ms")]
    poll_ms: u64,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    share_db: Option<PathBuf>,
    #[serde(default)]
    share_devices: Vec<String>,
    #[serde(default = "default_share_poll_ms")]
    share_poll_ms: u64,
}

/// A checked configuration of `duplex-cloud serve`.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// Where relays' dial-backs are accepted (TLS).
    pub listen: SocketAddr,
    /// The address relays are told to dial; `None`: the bound listen address (which must
    /// then be an IPv4 address other than 0.0.0.0).
    pub dial: Option<SocketAddrV4>,
    /// The local API (`submit`, `/v1/tunnels`).
    pub api_listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The mediator's API, `http://host:port`.
    pub mediator: String,
    pub token: String,
    pub ticket_key: [u8; KEY_LEN],
    /// The `user` of jobs sent.
    pub user: String,
    /// Backoff of requests to an unreachable mediator: first wait, cap.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// How often a tunnel record is polled while waiting for the relay's dial, and while a
    /// job waits for its result (a tunnel the relay reported ended is lost).
    pub poll_ms: u64,
    /// The cloud's user accounts (SCIM User resources), listed to devices for pairing
    /// (`docs/shared-data.md`); unique ids.
    pub users: Vec<CloudUser>,
    /// Bearer tokens of the users who have one: (token, user id), for
    /// `/v1/shared/documents`.
    pub user_tokens: Vec<(String, String)>,
    /// The SQLite file of the shares received (`share_db`; default `share.db` next to the
    /// configuration).
    pub share_db: PathBuf,
    /// Devices `serve` syncs with every `share_poll_ms` (`share_devices`; default none).
    pub share_devices: Vec<String>,
    pub share_poll_ms: u64,
}

impl CloudConfig {
    /// Reads and checks `path`; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<CloudConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawCloudConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        let invalid = |field: &str, why: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            why: why.to_string(),
        };
        crate::http::authority(&raw.mediator).map_err(|e| invalid("mediator", &e.to_string()))?;
        if raw.token.is_empty() || raw.token.chars().any(char::is_whitespace) {
            return Err(invalid("token", "empty or has blanks"));
        }
        let ticket_key = parse_key(&raw.ticket_key)
            .ok_or_else(|| invalid("ticket_key", "expected 64 hex digits"))?;
        if !duplex_tunnel::valid_id(&raw.user) {
            return Err(invalid("user", "1-64 of A-Z a-z 0-9 - _ . : @"));
        }
        if raw.retry_base_ms == 0 || raw.retry_max_ms < raw.retry_base_ms || raw.poll_ms == 0 {
            return Err(invalid(
                "retry_base_ms/retry_max_ms/poll_ms",
                "need 0 < retry_base_ms <= retry_max_ms and poll_ms > 0",
            ));
        }
        let mut ids = std::collections::HashSet::new();
        let mut user_tokens: Vec<(String, String)> = Vec::new();
        for u in &raw.users {
            if !duplex_docs::valid_id(&u.user.id) || !ids.insert(u.user.id.as_str()) {
                return Err(invalid(
                    "users",
                    "every user needs a unique id of 1-64 of A-Z a-z 0-9 - _ .",
                ));
            }
            if let Some(t) = &u.token {
                if t.len() < 8 || t.chars().any(|c| !c.is_ascii_graphic()) {
                    return Err(invalid(
                        "users[].token",
                        "at least 8 printable ASCII characters, no blanks",
                    ));
                }
                if user_tokens.iter().any(|(known, _)| known == t) {
                    return Err(invalid("users[].token", "two users have the same token"));
                }
                user_tokens.push((t.clone(), u.user.id.clone()));
            }
        }
        if raw
            .share_devices
            .iter()
            .any(|d| !duplex_tunnel::valid_id(d))
        {
            return Err(invalid("share_devices", "1-64 of A-Z a-z 0-9 - _ . : @"));
        }
        if raw.share_poll_ms == 0 {
            return Err(invalid("share_poll_ms", "must be > 0"));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let join = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(CloudConfig {
            listen: raw.listen,
            dial: raw.dial,
            api_listen: raw.api_listen,
            cert: join(raw.cert),
            key: join(raw.key),
            mediator: raw.mediator.trim_end_matches('/').to_string(),
            token: raw.token,
            ticket_key,
            user: raw.user,
            retry_base_ms: raw.retry_base_ms,
            retry_max_ms: raw.retry_max_ms,
            poll_ms: raw.poll_ms,
            users: raw.users.into_iter().map(|u| u.user).collect(),
            user_tokens,
            share_db: join(raw.share_db.unwrap_or_else(|| PathBuf::from("share.db"))),
            share_devices: raw.share_devices,
            share_poll_ms: raw.share_poll_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(users: serde_json::Value) -> Result<CloudConfig, ConfigError> {
        let dir =
            std::env::temp_dir().join(format!("duplex-cloud-cfg-{:x}", crate::util::random_u64()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cloud.json");
        let cfg = json!({"cert": "c.pem", "key": "k.pem", "mediator": "http://127.0.0.1:1",
            "token": "t", "ticket_key": "5a".repeat(32), "users": users});
        std::fs::write(&path, cfg.to_string()).expect("write");
        let r = CloudConfig::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn user_tokens_are_read_apart_from_the_scim_users() {
        let cfg = load(json!([
            {"id": "alice", "displayName": "Alice", "token": "tok-alice-1"},
            {"id": "bob"}
        ]))
        .expect("config");
        assert_eq!(cfg.user_tokens, [("tok-alice-1".into(), "alice".into())]);
        assert_eq!(cfg.users.len(), 2);
        assert!(cfg.share_db.ends_with("share.db"));
        let page = serde_json::to_string(&crate::cloud::api::scim_page(&cfg.users, None, None))
            .expect("json");
        assert!(
            page.contains("Alice") && !page.contains("tok-alice-1"),
            "{page}"
        );
        for bad in [
            json!([{"id": "a", "token": "short"}]),
            json!([{"id": "a", "token": "same-token-1"}, {"id": "b", "token": "same-token-1"}]),
        ] {
            assert!(load(bad).is_err());
        }
    }
}
