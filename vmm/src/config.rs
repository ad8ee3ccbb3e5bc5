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
}

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
        for partition in &mut self.partitions {
            if partition.kernel.is_relative() {
                partition.kernel = base.join(&partition.kernel);
            }
            if let ConsoleSink::File(file) = &mut partition.console {
                if file.is_relative() {
                    *file = base.join(&*file);
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
            probe_kernel(&p.kernel, bytes).map_err(|source| ConfigError::Kernel {
                path: path.to_path_buf(),
                partition: p.name.clone(),
                source,
            })?;
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
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    const HOST_MEM: u64 = 1 << 30; // a 1 GiB host for the tests

    /// A minimal ELF64 with a PT_LOAD segment and a PT_NOTE holding a `Xen` note of type
    /// `note_type` (18 is the PVH entry note; 17 is another Xen note).
    fn elf(note_type: u8) -> Vec<u8> {
        let mut f = vec![0u8; 196];
        f[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        let mut put = |at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
        put(16, &2u16.to_le_bytes()); // ET_EXEC
        put(18, &0x3eu16.to_le_bytes()); // x86_64
        put(20, &1u32.to_le_bytes());
        put(24, &0x10_0000u64.to_le_bytes()); // e_entry
        put(32, &64u64.to_le_bytes()); // e_phoff
        put(52, &64u16.to_le_bytes());
        put(54, &56u16.to_le_bytes());
        put(56, &2u16.to_le_bytes()); // e_phnum
        for (ph, kind, offset, size) in [(64, 1u32, 0u64, 196u64), (120, 4, 176, 20)] {
            put(ph, &kind.to_le_bytes());
            put(ph + 8, &offset.to_le_bytes());
            put(ph + 16, &(0x10_0000 + offset).to_le_bytes());
            put(ph + 24, &(0x10_0000 + offset).to_le_bytes());
            put(ph + 32, &size.to_le_bytes());
            put(ph + 40, &size.to_le_bytes());
        }
        put(176, &[4, 0, 0, 0, 4, 0, 0, 0, note_type, 0, 0, 0]);
        put(188, b"Xen\0");
        put(192, &0x10_0000u32.to_le_bytes());
        f
    }

    /// A minimal bzImage (boot protocol 2.06): one setup sector, then `syssize`
    /// paragraphs of "kernel" (more than the file holds when `syssize` is too big).
    fn bzimage(syssize: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[0x1f1] = 1; // setup_sects
        f[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        f[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f
    }

    /// A temp dir holding the fake kernels: pvh.elf, nopvh.elf, bz.img, short.img (a
    /// truncated bzImage), notes.txt, true.elf (a host program).
    fn kernels() -> TempDir {
        let dir = TempDir::new().expect("temp dir");
        let d = dir.as_path();
        std::fs::write(d.join("pvh.elf"), elf(18)).expect("write");
        std::fs::write(d.join("nopvh.elf"), elf(17)).expect("write");
        std::fs::write(d.join("bz.img"), bzimage(0xc00 / 16)).expect("write");
        std::fs::write(d.join("short.img"), bzimage(0x1000)).expect("write");
        std::fs::write(d.join("notes.txt"), "just some text\n").expect("write");
        std::fs::copy("/bin/true", d.join("true.elf")).expect("copy /bin/true");
        dir
    }

    /// A config with one partition "engine" whose JSON fields are `fields`.
    fn one(fields: &str) -> String {
        format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {fields}}}]}}"#)
    }

    #[test]
    fn broken_configs_are_refused_with_a_precise_message() {
        let dir = kernels();
        let ok = r#""kernel": "pvh.elf", "memory_mib": 16"#;
        let long = format!(r#"{ok}, "cmdline": "{}""#, "x".repeat(MAX_CMDLINE_LEN + 1));
        let ctl =
            r#"{"name": "controller", "role": "controller", "kernel": "pvh.elf", "memory_mib": 0}"#;
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            ("syntax", "{\n  \"partitions\": [\n    {\"name\": \"engine\",,}\n  ]\n}".into(), vec!["syntax", "line 3 column 23"]),
            ("truncated", "{\"partitions\": [".into(), vec!["syntax", "line 1 column 16"]),
            ("unknown field", one(&format!(r#"{ok}, "memory_mb": 4"#)), vec!["unknown field `memory_mb`", "partitions[0] (\"engine\")", "line 1"]),
            ("unknown top field", r#"{"partitions": [], "devcie": "x"}"#.into(), vec!["unknown field `devcie`"]),
            ("no partitions field", "{}".into(), vec!["missing field `partitions`"]),
            ("missing kernel", one(r#""memory_mib": 16"#), vec!["missing field `kernel`", "\"engine\""]),
            ("wrong type", one(r#""kernel": "pvh.elf", "memory_mib": "16""#), vec!["invalid type", "\"engine\""]),
            ("bad role", r#"{"partitions": [{"name": "p", "role": "printer", "kernel": "k", "memory_mib": 1}]}"#.into(), vec!["unknown variant `printer`", "partitions[0] (\"p\")"]),
            ("bad console", one(&format!(r#"{ok}, "console": {{"tcp": "x"}}"#)), vec!["unknown variant `tcp`", "\"engine\""]),
            ("vcpus overflow", one(&format!(r#"{ok}, "vcpus": 300"#)), vec!["300", "\"engine\""]),
            ("no partitions", r#"{"device": "mfp", "partitions": []}"#.into(), vec!["no partitions"]),
            ("memory 0", one(r#""kernel": "pvh.elf", "memory_mib": 0"#), vec!["partition \"engine\": memory_mib", "at least 1"]),
            ("memory > host", one(r#""kernel": "pvh.elf", "memory_mib": 2048"#), vec!["\"engine\": memory_mib", "2048 MiB", "host"]),
            ("memory overflow", one(r#""kernel": "pvh.elf", "memory_mib": 18446744073709551615"#), vec!["memory_mib", "host"]),
            ("vcpus 0", one(&format!(r#"{ok}, "vcpus": 0"#)), vec!["\"engine\": vcpus", "out of range"]),
            ("vcpus 65", one(&format!(r#"{ok}, "vcpus": 65"#)), vec!["\"engine\": vcpus", "65"]),
            ("empty name", r#"{"partitions": [{"name": "", "role": "other", "kernel": "pvh.elf", "memory_mib": 1}]}"#.into(), vec!["partitions[0].name", "empty"]),
            ("bad name", r#"{"partitions": [{"name": "Engine 1", "role": "other", "kernel": "pvh.elf", "memory_mib": 1}]}"#.into(), vec!["partitions[0].name", "\"Engine 1\"", "[a-z0-9]"]),
            ("long name", format!(r#"{{"partitions": [{{"name": "{}", "role": "other", "kernel": "pvh.elf", "memory_mib": 1}}]}}"#, "a".repeat(33)), vec!["partitions[0].name", "longer than 32"]),
            ("duplicate", format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {ok}}}, {{"name": "engine", "role": "relay", {ok}}}]}}"#), vec!["partitions[1].name", "duplicate", "\"engine\""]),
            ("second partition", format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {ok}}}, {ctl}]}}"#), vec!["partition \"controller\": memory_mib"]),
            ("cmdline too long", one(&long), vec!["\"engine\": cmdline", "65535 bytes"]),
            ("cmdline NUL", one(&format!(r#"{ok}, "cmdline": "a\u0000b""#)), vec!["\"engine\": cmdline", "NUL"]),
            ("kernel missing", one(r#""kernel": "missing.elf", "memory_mib": 16"#), vec!["partition \"engine\"", "missing.elf", "No such file"]),
            ("kernel is a dir", one(r#""kernel": ".", "memory_mib": 16"#), vec!["partition \"engine\"", "Is a directory"]),
            ("bzImage truncated", one(r#""kernel": "short.img", "memory_mib": 16"#), vec!["partition \"engine\"", "short.img", "truncated"]),
            ("kernel is text", one(r#""kernel": "notes.txt", "memory_mib": 16"#), vec!["\"engine\"", "notes.txt", "not a PVH ELF"]),
            ("kernel ELF not PVH", one(r#""kernel": "nopvh.elf", "memory_mib": 16"#), vec!["\"engine\"", "nopvh.elf", "without a PVH entry note"]),
            ("kernel host program", one(r#""kernel": "true.elf", "memory_mib": 16"#), vec!["\"engine\"", "true.elf", "ELF"]),
            ("kernel too big for memory", one(r#""kernel": "pvh.elf", "memory_mib": 1"#), vec!["\"engine\"", "pvh.elf"]),
        ];
        for (i, (what, text, expected)) in cases.iter().enumerate() {
            let file = dir.as_path().join(format!("case{i}.json"));
            std::fs::write(&file, text).expect("write config");
            let err = DeviceConfig::load_with_host_memory(&file, HOST_MEM)
                .expect_err(&format!("case {what:?} was accepted"));
            let msg = err.to_string();
            assert!(
                msg.contains(&file.display().to_string()),
                "{what}: no file in {msg}"
            );
            for word in expected {
                assert!(msg.contains(word), "{what}: {word:?} not in {msg}");
            }
        }
        let missing = dir.as_path().join("absent.json");
        let msg = DeviceConfig::load(&missing)
            .expect_err("absent")
            .to_string();
        assert!(
            msg.contains("absent.json") && msg.contains("cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn a_good_config_loads_with_defaults_and_resolved_paths() {
        let dir = kernels();
        let d = dir.as_path();
        let text = format!(
            r#"{{"device": "mfp-1", "partitions": [
                {{"name": "engine", "role": "engine", "kernel": "pvh.elf", "memory_mib": 16}},
                {{"name": "controller-2", "role": "controller", "kernel": "{}", "memory_mib": 1024,
                  "vcpus": 64, "cmdline": "{}", "console": {{"file": "logs/ctl.log"}}}},
                {{"name": "r_1", "role": "relay", "kernel": "bz.img", "memory_mib": 2, "console": "stdout"}}]}}"#,
            d.join("pvh.elf").display(),
            "c".repeat(MAX_CMDLINE_LEN)
        );
        let file = d.join("device.json");
        std::fs::write(&file, &text).expect("write config");
        let config = DeviceConfig::load_with_host_memory(&file, HOST_MEM).expect("valid config");
        assert_eq!(config.device.as_deref(), Some("mfp-1"));
        let names: Vec<_> = config.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["engine", "controller-2", "r_1"]);
        let engine = config.partition("engine").expect("engine");
        assert_eq!(engine.kernel, d.join("pvh.elf"));
        assert_eq!(
            (engine.role, engine.vcpus, engine.memory_mib),
            (Role::Engine, 1, 16)
        );
        assert_eq!(
            (engine.cmdline.as_str(), &engine.console),
            ("", &ConsoleSink::Stdout)
        );
        let ctl = &config.partitions[1];
        assert_eq!((ctl.vcpus, ctl.cmdline.len()), (64, MAX_CMDLINE_LEN));
        assert_eq!(ctl.console, ConsoleSink::File(d.join("logs/ctl.log")));
        assert_eq!(config.partitions[2].kernel, d.join("bz.img"));
        assert_eq!(config.partitions[2].role.to_string(), "relay");
        // Serialized form (kept in snapshots) parses back to the same config.
        let json = serde_json::to_string(&config).expect("serialize");
        assert_eq!(DeviceConfig::parse(&json, &file).expect("reparse"), config);
        // Against the real host memory, 1 GiB fits on any machine that runs the tests.
        assert_eq!(
            DeviceConfig::load(&file)
                .expect("host check")
                .partitions
                .len(),
            3
        );
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let text = "MemFree:  100 kB\nMemTotal:       24576000 kB\n";
        assert_eq!(parse_meminfo(text), Some(24_576_000 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
        assert!(host_memory_bytes().expect("/proc/meminfo") > 0);
    }
}
