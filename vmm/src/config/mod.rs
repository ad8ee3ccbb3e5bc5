//! The device configuration: which partitions one device runs (`duplex run --config FILE`).
//!
//! The file is JSON, one [`DeviceConfig`] object. Unknown fields are refused everywhere.
//! [`DeviceConfig::load`] reads it, resolves relative paths against the file's own
//! directory and validates it; every error names the file, and the partition and field
//! where it applies, so that a typo is found without reading the monitor's source.
//!
//! ```json
//! {
//!   "device": "mfp-1",
//!   "partitions": [
//!     { "name": "engine", "role": "engine", "kernel": "engine.elf", "memory_mib": 16 },
//!     { "name": "controller", "role": "controller", "kernel": "controller.elf",
//!       "memory_mib": 64, "vcpus": 1, "cmdline": "verbose",
//!       "console": { "file": "controller.log" } }
//!   ]
//! }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::{probe_kernel, BootError};

mod disk;
mod net;
mod snapshot;
pub use disk::DiskConfig;
pub use net::{parse_mac, NetConfig};
pub use snapshot::{GuestRequestsConfig, SnapshotConfig};

/// Most vCPUs one partition may have.
pub const MAX_VCPUS: u8 = 64;
/// Longest partition name (names appear in socket paths and log prefixes).
pub const MAX_NAME_LEN: usize = 32;
/// Longest command line in bytes, without its terminating NUL (see `docs/guest-abi.md`).
pub const MAX_CMDLINE_LEN: usize = 65534;
const MIB: u64 = 1 << 20;

/// One device: its name and the partitions the monitor runs for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device's name, for logs and status (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The partitions, at least one; names are unique.
    pub partitions: Vec<PartitionConfig>,
    /// Where snapshots go when a guest asks for one (and `reboot` looks by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotConfig>,
}

/// One partition: a guest kernel with its memory, vCPUs, command line and console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// Unique name matching `[a-z0-9][a-z0-9_-]{0,31}`.
    pub name: String,
    /// What the partition does on the device.
    pub role: Role,
    /// The kernel image: a PVH ELF or a bzImage. Relative paths are resolved against
    /// the config file's directory.
    pub kernel: PathBuf,
    /// Guest memory in MiB (at least 1, at most the host's memory).
    pub memory_mib: u64,
    /// Number of vCPUs, 1 to 64 (default 1).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The kernel command line (default empty; at most 65534 bytes, no NUL).
    #[serde(default)]
    pub cmdline: String,
    /// Where the partition's console output goes (default the monitor's stdout).
    #[serde(default)]
    pub console: ConsoleSink,
    /// A virtio-vsock device for talking to other partitions and the host (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net card backed by a host TAP device (optional; see `docs/net.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetConfig>,
    /// A virtio-blk disk backed by a host file (optional; see `docs/blk.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskConfig>,
}

/// A partition's virtio-vsock device (see `docs/vsock.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The partition's context id: unique, at least 3 (2 is the host), below 2^32.
    pub cid: u64,
    /// The host bridge's Unix socket (Firecracker's convention: a host program connects
    /// and writes `CONNECT <port>`; a guest connecting to CID 2 port P reaches
    /// `<uds>_<P>`). Relative to the config file's directory. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds: Option<PathBuf>,
    /// The `uds` socket file's mode, as octal digits (`"0600"`, the default, to `"0777"`):
    /// who may connect to the partition through the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_mode: Option<String>,
}

impl VsockConfig {
    /// The `uds_mode` as a number (None when absent or not octal: `check` refuses that).
    pub fn uds_mode(&self) -> Option<u32> {
        self.uds_mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
    }
}

/// Longest Unix socket path (sun_path is 108 bytes with its NUL; `_<port>` is added
/// for guest-initiated connections).
pub const MAX_UDS_LEN: usize = 96;

fn default_vcpus() -> u8 {
    1
}

/// What a partition does on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The real-time firmware driving the print/scan mechanism.
    Engine,
    /// Jobs, users, document storage, network.
    Controller,
    /// Owns the network uplink and keeps the session to the mediation server.
    Relay,
    /// Anything else.
    Other,
}

impl Role {
    /// The role as written in the config file (`"engine"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Controller => "controller",
            Role::Relay => "relay",
            Role::Other => "other",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a partition's console output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleSink {
    /// JSON `"stdout"`: the monitor's stdout, each line prefixed with `[name] `.
    #[default]
    Stdout,
    /// JSON `{"file": "path"}`: appended to this file (relative paths are resolved
    /// against the config file's directory).
    File(PathBuf),
}

/// Why a device config was refused. Every message names the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable, not UTF-8).
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid JSON.
    #[error("config {path}: JSON syntax error at line {line} column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The JSON does not have the config's shape: unknown field, missing field, wrong
    /// type. `context` names the partition when the problem is inside one.
    #[error("config {path}: {context}{message}")]
    Schema {
        path: PathBuf,
        context: String,
        message: String,
    },
    /// A value is out of range or inconsistent; `at` names the partition and field.
    #[error("config {path}: {at}: {problem}")]
    Invalid {
        path: PathBuf,
        at: String,
        problem: String,
    },
    /// A partition's kernel image is missing, unreadable, or not a PVH ELF nor a
    /// bzImage that fits the partition's memory.
    #[error("config {path}: partition \"{partition}\": {source}")]
    Kernel {
        path: PathBuf,
        partition: String,
        source: BootError,
    },
    /// The host's memory size could not be read from `/proc/meminfo`.
    #[error("reading the host's memory size from /proc/meminfo: {0}")]
    HostMemory(String),
}

impl DeviceConfig {
    /// Reads, resolves and validates the config file at `path`, checking memory sizes
    /// against the host's memory (`MemTotal` in `/proc/meminfo`).
    pub fn load(path: &Path) -> Result<DeviceConfig, ConfigError> {
        let text = read_text(path)?;
        let mut config = DeviceConfig::parse(&text, path)?;
        config.resolve_paths(path);
        config.validate_with(path, host_memory_bytes()?)?;
        Ok(config)
    }

    /// As [`DeviceConfig::load`], with the host's memory size given (for tests).
    pub fn load_with_host_memory(
        path: &Path,
        host_mem_bytes: u64,
    ) -> Result<DeviceConfig, ConfigError> {
        let text = read_text(path)?;
        let mut config = DeviceConfig::parse(&text, path)?;
        config.resolve_paths(path);
        config.validate_with(path, host_mem_bytes)?;
        Ok(config)
    }

    /// Parses config text; `path` is only used in error messages. Paths are left as
    /// written and nothing is validated beyond the JSON shape.
    pub fn parse(text: &str, path: &Path) -> Result<DeviceConfig, ConfigError> {
        let err = match serde_json::from_str::<DeviceConfig>(text) {
            Ok(config) => return Ok(config),
            Err(err) => err,
        };
        let full = err.to_string();
        if err.is_syntax() || err.is_eof() || err.is_io() {
            let position = format!(" at line {} column {}", err.line(), err.column());
            let message = full.strip_suffix(&position).unwrap_or(&full).to_string();
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                line: err.line(),
                column: err.column(),
                message,
            });
        }
        Err(ConfigError::Schema {
            path: path.to_path_buf(),
            context: schema_error_context(text, &full),
            message: full,
        })
    }

    /// Makes relative `kernel` and console file paths relative to the directory of
    /// the config file at `config_path`.
    pub fn resolve_paths(&mut self, config_path: &Path) {
        let base = config_path.parent().unwrap_or_else(|| Path::new(""));
        if let Some(s) = self.snapshot.as_mut() {
            if s.dir.is_relative() {
                s.dir = base.join(&s.dir);
            }
            if let Some(root) = s.root.as_mut().filter(|r| r.is_relative()) {
                *root = base.join(&*root);
            }
        }
        for partition in &mut self.partitions {
            if partition.kernel.is_relative() {
                partition.kernel = base.join(&partition.kernel);
            }
            if let ConsoleSink::File(file) = &mut partition.console {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
            if let Some(disk) = partition.disk.as_mut() {
                // An empty name stays empty, for the check to refuse it.
                if disk.file.is_relative() && !disk.file.as_os_str().is_empty() {
                    disk.file = base.join(&disk.file);
                }
            }
            if let Some(uds) = partition.vsock.as_mut().and_then(|v| v.uds.as_mut()) {
                if uds.is_relative() {
                    *uds = base.join(&*uds);
                }
            }
        }
    }

    /// Validates the config (read from `path`, named in errors) for a host with
    /// `host_mem_bytes` of memory; returns the first problem found.
    pub fn validate_with(&self, path: &Path, host_mem_bytes: u64) -> Result<(), ConfigError> {
        let invalid = |at: String, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            at,
            problem,
        };
        if self.partitions.is_empty() {
            return Err(invalid(
                "partitions".into(),
                "no partitions: at least one is needed".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut cids = HashSet::new();
        let mut taps = HashSet::new();
        let mut macs = HashSet::new();
        let mut disks = HashSet::new();
        for (index, p) in self.partitions.iter().enumerate() {
            if let Err(problem) = check_name(&p.name) {
                return Err(invalid(format!("partitions[{index}].name"), problem));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(invalid(
                    format!("partitions[{index}].name"),
                    format!("duplicate partition name \"{}\"", p.name),
                ));
            }
            let at = |field: &str| format!("partition \"{}\": {field}", p.name);
            if p.memory_mib == 0 {
                return Err(invalid(at("memory_mib"), "must be at least 1".into()));
            }
            let bytes = p.memory_mib.saturating_mul(MIB);
            if bytes > host_mem_bytes {
                return Err(invalid(
                    at("memory_mib"),
                    format!(
                        "{} MiB is more than the host's memory ({} MiB)",
                        p.memory_mib,
                        host_mem_bytes / MIB
                    ),
                ));
            }
            if p.vcpus == 0 || p.vcpus > MAX_VCPUS {
                return Err(invalid(
                    at("vcpus"),
                    format!("{} is out of range 1..={MAX_VCPUS}", p.vcpus),
                ));
            }
            if p.cmdline.len() > MAX_CMDLINE_LEN {
                return Err(invalid(
                    at("cmdline"),
                    format!(
                        "{} bytes is longer than the limit of {MAX_CMDLINE_LEN}",
                        p.cmdline.len()
                    ),
                ));
            }
            if p.cmdline.contains('\0') {
                return Err(invalid(at("cmdline"), "contains a NUL byte".into()));
            }
            if let ConsoleSink::File(file) = &p.console {
                if file.as_os_str().is_empty() {
                    return Err(invalid(at("console.file"), "empty path".into()));
                }
            }
            if let Some(v) = &p.vsock {
                if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                    return Err(invalid(
                        at("vsock.cid"),
                        format!(
                            "{} is out of range 3..=4294967295 (0-2 are reserved)",
                            v.cid
                        ),
                    ));
                }
                if !cids.insert(v.cid) {
                    return Err(invalid(
                        at("vsock.cid"),
                        format!("cid {} is used by another partition", v.cid),
                    ));
                }
                if let Some(uds) = &v.uds {
                    if uds.as_os_str().is_empty() || uds.as_os_str().len() > MAX_UDS_LEN {
                        return Err(invalid(
                            at("vsock.uds"),
                            format!("path must be 1..={MAX_UDS_LEN} bytes long"),
                        ));
                    }
                }
                if let Some(m) = &v.uds_mode {
                    let ok = (1..=4).contains(&m.len()) && v.uds_mode().is_some_and(|n| n <= 0o777);
                    if !ok {
                        return Err(invalid(
                            at("vsock.uds_mode"),
                            format!("{m:?} is not an octal mode from \"0000\" to \"0777\""),
                        ));
                    }
                    if v.uds.is_none() {
                        return Err(invalid(
                            at("vsock.uds_mode"),
                            "is set but the partition has no vsock.uds".into(),
                        ));
                    }
                }
            }
            if let Some(n) = &p.net {
                net::check(n).map_err(|(field, problem)| invalid(at(field), problem))?;
                if !taps.insert(n.tap.as_str()) {
                    return Err(invalid(
                        at("net.tap"),
                        format!("tap {} is used by another partition", n.tap),
                    ));
                }
                if !macs.insert(n.mac_bytes().map_err(|e| invalid(at("net.mac"), e))?) {
                    return Err(invalid(
                        at("net.mac"),
                        format!("mac {} is used by another partition", n.mac),
                    ));
                }
            }
            if let Some(d) = &p.disk {
                disk::check(d).map_err(|(field, problem)| invalid(at(field), problem))?;
                if !disks.insert(d.file.as_path()) {
                    return Err(invalid(
                        at("disk.file"),
                        format!("{} is the disk of another partition", d.file.display()),
                    ));
                }
            }
            probe_kernel(&p.kernel, bytes).map_err(|source| ConfigError::Kernel {
                path: path.to_path_buf(),
                partition: p.name.clone(),
                source,
            })?;
        }
        if let Some(names) = self
            .snapshot
            .as_ref()
            .and_then(|s| s.guest_requests.from.as_ref())
        {
            for name in names {
                if !self.partitions.iter().any(|p| &p.name == name) {
                    return Err(invalid(
                        "snapshot.guest_requests.from".into(),
                        format!("{name:?} is not a partition of this config"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The partition called `name`.
    pub fn partition(&self, name: &str) -> Option<&PartitionConfig> {
        self.partitions.iter().find(|p| p.name == name)
    }
}

/// The host's memory in bytes (`MemTotal` in `/proc/meminfo`).
pub fn host_memory_bytes() -> Result<u64, ConfigError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| ConfigError::HostMemory(e.to_string()))?;
    parse_meminfo(&text).ok_or_else(|| ConfigError::HostMemory("no MemTotal line".into()))
}

/// `MemTotal` from the text of `/proc/meminfo`, in bytes.
fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Which partition a shape error is in, as `partitions[i] ("name"): `, or empty when
/// it is not inside a partition (or cannot be told).
fn schema_error_context(text: &str, full_message: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return String::new();
    };
    let Some(partitions) = value.get("partitions").and_then(|p| p.as_array()) else {
        return String::new();
    };
    for (index, item) in partitions.iter().enumerate() {
        if let Err(err) = PartitionConfig::deserialize(item) {
            // Only blame this partition if it is the error serde stopped at.
            if !full_message.starts_with(&err.to_string()) {
                return String::new();
            }
            return match item.get("name").and_then(|n| n.as_str()) {
                Some(name) => format!("partitions[{index}] (\"{name}\"): "),
                None => format!("partitions[{index}]: "),
            };
        }
    }
    String::new()
}

/// Checks a partition name against `[a-z0-9][a-z0-9_-]{0,31}`.
fn check_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err("empty partition name".into());
    };
    let rule = "must match [a-z0-9][a-z0-9_-]{0,31}";
    if bytes.len() > MAX_NAME_LEN {
        return Err(format!(
            "\"{name}\" is longer than {MAX_NAME_LEN} characters ({rule})"
        ));
    }
    let lower_digit = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !lower_digit(first)
        || !bytes[1..]
            .iter()
            .all(|&b| lower_digit(b) || b == b'_' || b == b'-')
    {
        return Err(format!("\"{name}\" {rule}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
