//! Helpers of the snapshot end-to-end tests: the printer with a save destination, booting
//! (and restoring) it, talking to its controller.

use std::path::{Path, PathBuf};

use duplex_link::{HostReply, HostRequest};
use duplex_vmm::job::JobClient;
use serde_json::{json, Value};

use super::*;

/// Patience for anything the device does.
pub const T: std::time::Duration = std::time::Duration::from_secs(60);

/// The printer's config, with its bridge socket and save destination in `dir`.
pub fn printer_config(dir: &Path) -> Value {
    json!({
        "device": "printer",
        "partitions": printer_partitions(&dir.join("controller.vsock")),
        "snapshot": {"dir": dir.join("set")},
    })
}

/// Boots from `cfg` written in `dir`, optionally restoring.
pub fn boot_in(dir: &Path, cfg: &Value, restore: Option<&Path>, extra: &[&str]) -> Device {
    boot_in_env(dir, cfg, restore, extra, &[])
}

/// [`boot_in`] with environment variables for the monitor (e.g. `DUPLEX_FAULTS`).
pub fn boot_in_env(
    dir: &Path,
    cfg: &Value,
    restore: Option<&Path>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Device {
    let file = dir.join("device.json");
    std::fs::write(&file, serde_json::to_vec_pretty(cfg).expect("json")).expect("write");
    let mut args: Vec<String> = Vec::new();
    if let Some(r) = restore {
        args.push("--restore".into());
        args.push(r.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Device::boot_file_env(&file, TempDir::new("snapdev"), &args, env)
}

pub fn wait_ready(dev: &Device) {
    dev.wait_line("engine", "READY", T);
    dev.wait_line("controller", "READY", T);
}

pub fn uds(dir: &Path) -> PathBuf {
    dir.join("controller.vsock")
}

pub fn engine_pages(c: &mut JobClient) -> u64 {
    match c.call(&HostRequest::EngineStatus).expect("engine status") {
        HostReply::Engine(info) => info.pages_printed,
        other => panic!("unexpected {other:?}"),
    }
}

/// Every RAM byte of partition `name` in the set at `dir` (its chain resolved).
pub fn set_memory(dir: &Path, name: &str) -> Vec<u8> {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let set = duplex_snapshot::SnapshotSet::open(dir).expect("open");
    let mem = set
        .load_memory(name, duplex_snapshot::LoadMode::Eager)
        .expect("load");
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr()).expect("read");
        out.extend(buf);
    }
    out
}

/// The printer booted in a fresh directory (its config, save destination, and device),
/// ready: what most snapshot tests start from.
pub struct Printer {
    pub dir: TempDir,
    pub cfg: Value,
    /// `<dir>/set`, the config's `snapshot.dir`.
    pub set: PathBuf,
    pub dev: Device,
}

impl Printer {
    /// Boots the printer, its monitor armed with `faults` (`DUPLEX_FAULTS`, none if empty),
    /// and waits until both partitions are READY.
    pub fn boot(tag: &str, faults: &str) -> Printer {
        let dir = TempDir::new(tag);
        let cfg = printer_config(&dir.0);
        let set = dir.0.join("set");
        let env: Vec<(&str, &str)> = if faults.is_empty() {
            Vec::new()
        } else {
            vec![("DUPLEX_FAULTS", faults)]
        };
        let dev = boot_in_env(&dir.0, &cfg, None, &[], &env);
        wait_ready(&dev);
        Printer { dir, cfg, set, dev }
    }
}

/// Asserts that every partition's memory in the incremental set `child` (its chain
/// resolved) equals that of the full set `full`, taken at the same moment.
pub fn assert_same_memory(child: &Path, full: &Path, what: &str) {
    for name in ["engine", "controller"] {
        assert!(
            set_memory(child, name) == set_memory(full, name),
            "{what}: {name}: parent + child differs from a full set of the same moment"
        );
    }
}

/// Waits until a set appears at `set` (a snapshot the guest raised is written on a
/// thread of the monitor's own).
pub fn wait_for_set(set: &Path) {
    let deadline = std::time::Instant::now() + T;
    while !set.join("manifest.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest-raised snapshot was never written"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
