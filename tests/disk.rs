//! End-to-end: a partition's virtio-blk disk (`docs/blk.md`) with the `disktest` firmware,
//! which writes numbered 4 KiB blocks, flushing each, and checks them at every boot and
//! after a restore (it keeps its count in memory too, so a set's memory and disk must be of
//! one moment):
//!
//! - acknowledged (flushed) blocks survive a SIGKILL of the monitor and a cold boot;
//! - a set holds the disk as it was at the cut: a restore in a new process, and a reboot in
//!   place, give back memory and disk of the same moment (blocks written after the cut are
//!   absent); an incremental set carries only the blocks written since its parent;
//! - a reboot that fails after the set's disk was written leaves the running device's disk
//!   as it was, and a config whose disk differs from the set's is refused.
//!
//! `kvm_*` tests need /dev/kvm (`scripts/test` skips them by name without); the failed-reboot
//! test also needs the test-only `fault-injection` feature (scripts/test builds with it).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn require_faults() {
    require_kvm();
    #[cfg(not(feature = "fault-injection"))]
    panic!(
        "SKIPPED-BY-BUILD: this test needs `--features duplex-vmm/fault-injection` \
         (scripts/test builds with it)"
    );
}

fn disk_config(work: &Path, blocks: u64, size_mib: u64) -> Value {
    let mut p = partition(
        "store",
        "controller",
        "disktest",
        32,
        &format!("disktest.blocks={blocks} disktest.delay_ms=5"),
    );
    p["disk"] = json!({"file": work.join("store.disk"), "size_mib": size_mib});
    json!({ "partitions": [p] })
}

fn boot(work: &TempDir, cfg: &Value, extra: &[String], env: &[(&str, &str)]) -> Device {
    let file = work.0.join("device.json");
    std::fs::write(&file, serde_json::to_vec_pretty(cfg).expect("json")).expect("write");
    Device::boot_file_env(&file, TempDir::new("diskdev"), extra, env)
}

/// The highest `disktest: wrote N` on the console.
fn written(dev: &Device) -> u64 {
    dev.console("store")
        .iter()
        .filter_map(|l| l.split("disktest: wrote ").nth(1)?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// An upper bound of the count at a cut just taken: the guest may have been halfway
/// through printing `wrote N` at the cut, so the count of the next complete line, not of
/// the last one seen.
fn after_cut(dev: &Device) -> u64 {
    let seen = written(dev);
    wait_written(dev, seen + 1)
}

fn wait_written(dev: &Device, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let w = written(dev);
        if w >= n {
            return w;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the disk writer did not reach {n}: {:?}",
            dev.console("store")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number in the console line that contains `prefix` and ends in `suffix`.
fn number_in(line: &str, prefix: &str) -> u64 {
    line.split(prefix)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {line:?}"))
}

fn inspect(set: &Path) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["snapshot", "inspect"])
        .arg(set)
        .output()
        .expect("duplex snapshot inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect prints JSON")
}

fn sha(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).expect("read disk")
}

#[test]
fn kvm_flushed_blocks_survive_a_sigkill_of_the_monitor_and_a_cold_boot() {
    require_kvm();
    let work = TempDir::new("disk-kill");
    let cfg = disk_config(&work.0, 100_000, 16);
    let mut dev = boot(&work, &cfg, &[], &[]);
    dev.wait_line("store", "disktest: boot 1 blocks 0 verified", T);
    wait_written(&dev, 40);
    let st = dev.status_of("store");
    let c = &st["disk"]["counters"];
    assert!(
        c["writes"].as_u64() >= Some(80) && c["flushes"].as_u64() >= Some(80),
        "{st}"
    );
    assert_eq!(st["disk"]["size_mib"], 16);
    // Killed in the middle of its writes. What it printed before (each line after the
    // flush of its block) is in the monitor's output.
    dev.kill();
    let acknowledged = dev
        .stdout_lines()
        .iter()
        .filter_map(|l| {
            l.split("disktest: wrote ")
                .nth(1)?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .max()
        .expect("blocks written before the kill");
    let dev = boot(&work, &cfg, &[], &[]);
    let line = dev.wait_line("store", "disktest: boot 2 blocks", T);
    assert!(line.ends_with("verified"), "{line}");
    let on_disk = number_in(&line, "blocks ");
    assert!(
        on_disk >= acknowledged,
        "{acknowledged} blocks were acknowledged, the disk has {on_disk}"
    );
    assert!(!dev.console("store").iter().any(|l| l.contains("CORRUPT")));
}

#[test]
fn kvm_a_set_restores_memory_and_disk_of_one_moment_and_an_incremental_one_only_changed_blocks() {
    require_kvm();
    let work = TempDir::new("disk-set");
    let cfg = disk_config(&work.0, 100_000, 16);
    let mut dev = boot(&work, &cfg, &[], &[]);
    wait_written(&dev, 20);
    // The cut falls between what was written before the request and after its answer.
    let full = work.0.join("full");
    let before_full = written(&dev);
    dev.ok(json!({"cmd": "snapshot", "dest": full}));
    let at_full = after_cut(&dev);
    wait_written(&dev, at_full + 30);
    let incr = work.0.join("incr");
    let before_incr = written(&dev);
    dev.ok(json!({"cmd": "snapshot", "dest": incr, "parent": full}));
    let at_incr = after_cut(&dev);
    wait_written(&dev, at_incr + 30);
    assert!(dev.shutdown().success());

    // The incremental set holds the blocks written since its parent (and the header), not
    // the disk's earlier blocks.
    let full_disk = &inspect(&full)["partitions"][0]["disk"];
    let incr_disk = &inspect(&incr)["partitions"][0]["disk"];
    assert_eq!(incr_disk["incremental"], true, "{incr_disk}");
    let incr_bytes = incr_disk["bytes_written"].as_u64().expect("bytes");
    let full_bytes = full_disk["bytes_written"].as_u64().expect("bytes");
    assert!(full_bytes >= 20 * 4096, "{full_disk}");
    // The blocks written between the two cuts (and the header), each at most twice (the
    // live second pass writes again what changed during the first).
    let changed = at_incr - before_full + 1;
    assert!(
        incr_bytes <= 2 * changed * 4096 && incr_bytes >= (before_incr - at_full) * 4096,
        "incremental {incr_bytes} bytes for about {changed} changed blocks: {incr_disk}"
    );

    // Each set restores in a new process with the disk of its own cut: the guest's count in
    // memory matches the disk, and what was written after the cut is gone.
    for (set, from, at) in [(&full, before_full, at_full), (&incr, before_incr, at_incr)] {
        let extra = vec!["--restore".to_string(), set.display().to_string()];
        let mut dev = boot(&work, &cfg, &extra, &[]);
        let line = dev.wait_line("store", "disktest: restored blocks", T);
        let n = number_in(&line, "restored blocks ");
        assert!(line.ends_with("verified"), "{line}");
        assert!(
            (from..=at).contains(&n),
            "{n} blocks restored for a cut between {from} and {at}"
        );
        assert!(!dev
            .console("store")
            .iter()
            .any(|l| l.contains("MISMATCH") || l.contains("CORRUPT")));
        wait_written(&dev, n + 5);
        assert!(dev.shutdown().success());
    }
}

#[test]
fn kvm_a_reboot_in_place_gives_back_the_disk_of_the_set() {
    require_kvm();
    let work = TempDir::new("disk-reboot");
    let cfg = disk_config(&work.0, 100_000, 8);
    let mut dev = boot(&work, &cfg, &[], &[]);
    wait_written(&dev, 10);
    let set = work.0.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    let at = written(&dev);
    wait_written(&dev, at + 40);
    dev.ok(json!({"cmd": "reboot", "from": set}));
    let line = dev.wait_line("store", "disktest: restored blocks", T);
    let n = number_in(&line, "restored blocks ");
    assert!(
        line.ends_with("verified") && n <= at + 1,
        "{line} (cut at {at})"
    );
    // The restored copy was put in place of the backing file; nothing is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(&work.0)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".restore-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_a_failed_reboot_leaves_the_disk_as_it_was_and_a_differing_disk_is_refused() {
    require_faults();
    let work = TempDir::new("disk-fail");
    let cfg = disk_config(&work.0, 20, 8);
    let faults = [("DUPLEX_FAULTS", "restore.switch@1")];
    let mut dev = boot(&work, &cfg, &[], &faults);
    wait_written(&dev, 5);
    let set = work.0.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    // Written to its end (20 blocks), then idle: the disk no longer changes.
    wait_written(&dev, 20);
    let disk = work.0.join("store.disk");
    let before = sha(&disk);
    let r = dev.request(json!({"cmd": "reboot", "from": set}));
    assert_eq!(r["error"]["code"], "restore_failed", "{r}");
    assert_eq!(
        sha(&disk),
        before,
        "the failed reboot changed the running device's disk"
    );
    assert!(std::fs::read_dir(&work.0)
        .expect("dir")
        .filter_map(|e| e.ok())
        .all(|e| !e.file_name().to_string_lossy().contains(".restore-")));
    assert_eq!(dev.status_of("store")["state"], "running");
    assert!(dev.shutdown().success());

    // A config whose disk is another size cannot take the set.
    let bigger = disk_config(&work.0, 20, 16);
    let file = work.0.join("bigger.json");
    std::fs::write(&file, serde_json::to_vec(&bigger).expect("json")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["run", "--config"])
        .arg(&file)
        .arg("--api-sock")
        .arg(work.0.join("b.sock"))
        .arg("--restore")
        .arg(&set)
        .output()
        .expect("duplex run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disk.size_mib is 16 in the config but 8 in the set"),
        "{err}"
    );
}
