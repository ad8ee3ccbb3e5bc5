//! End-to-end: coordinated snapshot of the reference device (engine + controller) and
//! restore, in a new process and in-process, through the real monitor and guests.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use duplex_link::{expected_page_checksum, HostReply, HostRequest, JobState};
use duplex_vmm::job::JobClient;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// The printer's config, with its bridge socket and save destination in `dir`.
fn printer_config(dir: &Path) -> Value {
    json!({
        "device": "printer",
        "partitions": printer_partitions(&dir.join("controller.vsock")),
        "snapshot": {"dir": dir.join("set")},
    })
}

/// Boots from `cfg` written in `dir`, optionally restoring.
fn boot_in(dir: &Path, cfg: &Value, restore: Option<&Path>, extra: &[&str]) -> Device {
    let file = dir.join("device.json");
    std::fs::write(&file, serde_json::to_vec_pretty(cfg).expect("json")).expect("write");
    let mut args: Vec<String> = Vec::new();
    if let Some(r) = restore {
        args.push("--restore".into());
        args.push(r.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Device::boot_file_with(&file, TempDir::new("snapdev"), &args)
}

fn wait_ready(dev: &Device) {
    dev.wait_line("engine", "READY", T);
    dev.wait_line("controller", "READY", T);
}

fn uds(dir: &Path) -> PathBuf {
    dir.join("controller.vsock")
}

fn engine_pages(c: &mut JobClient) -> u64 {
    match c.call(&HostRequest::EngineStatus).expect("engine status") {
        HostReply::Engine(info) => info.pages_printed,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn kvm_restore_in_a_new_process_continues_jobs_counters_and_connections() {
    require_kvm();
    let dir = TempDir::new("snap-new");
    let cfg = printer_config(&dir.0);
    let set = dir.0.join("set");
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let first = c.submit(4, 11, 128, 128).expect("submit");
    c.wait(first, T).expect("first job");
    // A long job, in flight at the snapshot.
    let long = c.submit(3_000, 12, 64, 64).expect("submit");
    let deadline = Instant::now() + T;
    while c.jobs(Some(long)).expect("status")[0].pages_done < 10 {
        assert!(Instant::now() < deadline, "the long job never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let snap = dev.ok(json!({"cmd": "snapshot", "dest": set}));
    assert_eq!(snap["partitions"], 2, "{snap}");
    assert!(
        snap["quiesce"]["engine_pages_printed"]
            .as_u64()
            .unwrap_or(0)
            >= 14,
        "{snap}"
    );
    for phase in ["quiesce", "pause", "capture", "write", "fsync", "resume"] {
        assert!(snap["timings_ms"][phase].is_number(), "{phase} in {snap}");
    }
    let beat_at_snapshot = dev.heartbeat("engine").expect("beat");
    assert!(dev.shutdown().success());

    for boot in 0..3 {
        // Golden image: every boot from the set reaches the same state.
        let mut dev = boot_in(&dir.0, &cfg, Some(&set), &[]);
        let st = dev.ok(json!({"cmd": "status"}));
        assert_eq!(st["restored_from"]["set"], json!(set), "{st}");
        for p in st["partitions"].as_array().expect("list") {
            assert_eq!(p["state"], "running", "{p}");
        }
        // No cold boot: no banner, no calibration, the heartbeat goes on from where it was.
        let h = dev.wait_heartbeat("engine", beat_at_snapshot + 1, T);
        let beats: Vec<u64> = dev
            .console("engine")
            .iter()
            .filter_map(|l| {
                l.strip_prefix("engine heartbeat ")
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        assert!(
            beats[0] <= beat_at_snapshot + 1 && beats[0] > 1,
            "boot {boot}: {beats:?}"
        );
        assert!(h > beat_at_snapshot);
        assert!(!dev
            .console("engine")
            .iter()
            .any(|l| l.contains("calibrated")));
        // The job in flight completes exactly once; the controller never reconnected.
        let mut c = JobClient::connect(&uds(&dir.0)).expect("connect after restore");
        let job = c.wait(long, T).expect("the long job finishes");
        assert_eq!(job.state, JobState::Done, "{job:?}");
        let expected: Vec<u32> = (0..3_000)
            .map(|p| expected_page_checksum(12, p, 64, 64))
            .collect();
        assert_eq!(job.checksums, expected, "every page once, in order");
        assert_eq!(
            engine_pages(&mut c),
            3_004,
            "each page printed exactly once"
        );
        assert_eq!(c.jobs(Some(first)).expect("first")[0].state, JobState::Done);
        assert!(
            !dev.console("controller")
                .iter()
                .any(|l| l.contains("engine link connected")),
            "the controller-engine connection survived the restore"
        );
        let next = c.submit(2, 13, 64, 64).expect("submit after restore");
        assert_eq!(next, 3, "job ids continue");
        assert_eq!(c.wait(next, T).expect("done").state, JobState::Done);
        assert!(dev.shutdown().success());
    }
}

#[test]
fn kvm_in_process_reboot_keeps_host_connections() {
    require_kvm();
    let dir = TempDir::new("snap-reboot");
    let cfg = printer_config(&dir.0);
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let id = c.submit(3, 21, 64, 64).expect("submit");
    c.wait(id, T).expect("done");
    let set = dir.0.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    // After the snapshot the device goes on, on another connection: a job the reboot
    // will forget. (A connection used after the cut cannot match the restored guest: the
    // reboot resets it; one left alone since the cut is kept.)
    let mut other = JobClient::connect(&uds(&dir.0)).expect("connect");
    let later = other.submit(1, 22, 64, 64).expect("submit");
    other.wait(later, T).expect("done");
    let r = dev.ok(json!({"cmd": "reboot"}));
    assert!(r["timings_ms"]["restore"].is_number(), "{r}");
    assert!(
        other.jobs(None).is_err(),
        "a connection opened after the cut is reset"
    );
    // The host connection from before the cut works after the reboot, without reconnecting.
    let jobs = c.jobs(None).expect("the connection survived the reboot");
    assert_eq!(jobs.len(), 1, "back at the snapshot: {jobs:?}");
    assert_eq!(jobs[0].id, id);
    let again = c.submit(1, 23, 64, 64).expect("submit after reboot");
    assert_eq!(again, later, "ids continue from the snapshot");
    assert_eq!(c.wait(again, T).expect("done").state, JobState::Done);
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_engine_denies_while_jammed_and_nothing_is_written() {
    require_kvm();
    let dir = TempDir::new("snap-jam");
    let cfg = printer_config(&dir.0);
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    c.call(&HostRequest::InjectJam).expect("jam");
    let set = dir.0.join("set");
    let r = dev.request(json!({"cmd": "snapshot", "dest": set}));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "snapshot_denied", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("paper jam"),
        "{r}"
    );
    assert!(!set.exists(), "nothing written");
    let st = dev.ok(json!({"cmd": "status"}));
    for p in st["partitions"].as_array().expect("list") {
        assert_eq!(p["state"], "running", "{p}");
    }
    c.call(&HostRequest::ClearJam).expect("clear");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    assert!(set.join("manifest.json").exists());
    assert!(dev.shutdown().success());
}

/// Copies a set directory.
fn copy_set(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read set") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn flip_byte(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).expect("write");
}

/// The offset of the first non-zero page of a memory file.
fn first_data_page(file: &Path) -> u64 {
    let bytes = std::fs::read(file).expect("read");
    bytes
        .chunks(4096)
        .position(|p| p.iter().any(|&b| b != 0))
        .expect("a data page") as u64
        * 4096
}

#[test]
fn kvm_every_corruption_is_refused_and_fallback_boots_cold() {
    require_kvm();
    let dir = TempDir::new("snap-bad");
    let cfg = printer_config(&dir.0);
    let set = dir.0.join("set");
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    assert!(dev.shutdown().success());

    let mut bigger = cfg.clone();
    bigger["partitions"][0]["memory_mib"] = json!(128);
    let mut fewer = cfg.clone();
    fewer["partitions"].as_array_mut().expect("list").pop();
    fewer["partitions"][0]["vsock"] = json!({"cid": 3});
    type Damage = fn(&Path);
    let cases: Vec<(&str, Damage, Option<Value>, &str)> = vec![
        (
            "manifest byte",
            |s| flip_byte(&s.join("manifest.json"), 40),
            None,
            "manifest",
        ),
        (
            "engine state byte",
            |s| flip_byte(&s.join("engine.state"), 100),
            None,
            "engine.state",
        ),
        (
            "controller state byte",
            |s| flip_byte(&s.join("controller.state"), 50),
            None,
            "controller.state",
        ),
        (
            "engine memory byte",
            |s| {
                let f = s.join("engine.mem");
                flip_byte(&f, first_data_page(&f) + 4095)
            },
            None,
            "engine.mem",
        ),
        (
            "wrong format version",
            |s| {
                // A well-formed manifest of another format version (sealed with its own
                // checksum, as a future monitor would write it).
                let f = s.join("manifest.json");
                let text = std::fs::read_to_string(&f).expect("manifest");
                let mut m: duplex_snapshot::Manifest =
                    serde_json::from_str(&text).expect("manifest parses");
                m.format_version = 99;
                let sealed = duplex_snapshot::manifest::seal(&m).expect("seal");
                std::fs::write(&f, sealed).expect("write");
            },
            None,
            "version",
        ),
        (
            "memory byte",
            |s| {
                let f = s.join("controller.mem");
                flip_byte(&f, first_data_page(&f) + 7)
            },
            None,
            "controller.mem",
        ),
        (
            "truncated memory",
            |s| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(s.join("engine.mem"))
                    .expect("open");
                f.set_len(4096 * 10).expect("truncate");
            },
            None,
            "engine.mem",
        ),
        (
            "missing state",
            |s| std::fs::remove_file(s.join("controller.state")).expect("rm"),
            None,
            "controller.state",
        ),
        ("other memory size", |_| {}, Some(bigger), "memory_mib"),
        ("missing partition", |_| {}, Some(fewer), "controller"),
    ];
    for (i, (what, damage, config, needle)) in cases.into_iter().enumerate() {
        let bad = dir.0.join(format!("bad{i}"));
        copy_set(&set, &bad);
        damage(&bad);
        let config = config.unwrap_or_else(|| cfg.clone());
        let file = dir.0.join(format!("bad{i}.json"));
        std::fs::write(&file, serde_json::to_vec(&config).expect("json")).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
            .arg("run")
            .arg("--config")
            .arg(&file)
            .arg("--api-sock")
            .arg(dir.0.join(format!("bad{i}.sock")))
            .arg("--restore")
            .arg(&bad)
            .args(["--seconds", "5"])
            .output()
            .expect("duplex run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: a damaged set was accepted");
        assert!(
            err.contains(needle),
            "{what}: the refusal should name {needle}: {err}"
        );
        if what == "memory byte" {
            // With --fallback cold the device comes up cold and says why.
            let mut dev = boot_in(&dir.0, &config, Some(&bad), &["--fallback", "cold"]);
            let st = dev.ok(json!({"cmd": "status"}));
            let why = st["fallback"].as_str().unwrap_or("");
            assert!(why.contains(needle), "status names the reason: {st}");
            assert_eq!(st["restored_from"], Value::Null);
            dev.wait_line("engine", "calibrated", T);
            assert!(dev.shutdown().success());
        }
    }
}

#[test]
fn kvm_the_controller_itself_can_raise_the_snapshot_and_reboot() {
    require_kvm();
    let dir = TempDir::new("snap-guest");
    let cfg = printer_config(&dir.0);
    let set = dir.0.join("set");
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let id = c.submit(2, 31, 64, 64).expect("submit");
    c.wait(id, T).expect("done");
    c.call(&HostRequest::RequestSnapshot { reboot: false })
        .expect("request");
    dev.wait_line("controller", "snapshot requested (reboot=false)", T);
    let deadline = Instant::now() + T;
    while !set.join("manifest.json").exists() {
        assert!(
            Instant::now() < deadline,
            "the guest-raised snapshot was never written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["snapshot", "verify"])
        .arg(&set)
        .output()
        .expect("duplex snapshot verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Snapshot and reboot from it, raised by the guest.
    c.call(&HostRequest::RequestSnapshot { reboot: true })
        .expect("request");
    let deadline = Instant::now() + T;
    loop {
        let st = dev.ok(json!({"cmd": "status"}));
        if !st["restored_from"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reboot from the guest-raised snapshot: {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect after the reboot");
    assert_eq!(c.jobs(Some(id)).expect("job")[0].state, JobState::Done);
    assert!(dev.shutdown().success());
}

/// A small deterministic generator for kill points.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn kvm_kill_during_a_save_always_leaves_a_valid_set() {
    require_kvm();
    let dir = TempDir::new("snap-kill");
    let cfg = printer_config(&dir.0);
    let set = dir.0.join("set");
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let first = dev.ok(json!({"cmd": "snapshot", "dest": set}));
    let save_ms = first["timings_ms"]["total"]
        .as_f64()
        .expect("total")
        .max(5.0);
    let mut ids = vec![first["set_id"].as_str().expect("id").to_owned()];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..20 {
        // Start a save, and kill the monitor somewhere inside it (or just after).
        let sock = dev.sock.clone();
        let dest = set.clone();
        let saver = std::thread::spawn(move || {
            let mut conn = Conn::new(&sock);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                conn.request(&json!({"cmd": "snapshot", "dest": dest}))
            }));
        });
        let wait_us = next_rand(&mut rng) % ((save_ms * 1500.0) as u64);
        std::thread::sleep(Duration::from_micros(wait_us));
        // SAFETY: sending SIGKILL to the monitor child process this test started.
        unsafe { libc::kill(dev.pid() as i32, libc::SIGKILL) };
        let _ = dev.wait_exit(T);
        let _ = saver.join();
        let opened = duplex_snapshot::SnapshotSet::open(&set)
            .unwrap_or_else(|e| panic!("round {round} (kill after {wait_us} us): {e}"));
        opened
            .verify()
            .unwrap_or_else(|e| panic!("round {round} (kill after {wait_us} us): {e}"));
        ids.push(opened.manifest.set_id.clone());
        // The set still restores.
        if round % 5 == 4 {
            let mut r = boot_in(&dir.0, &cfg, Some(&set), &[]);
            assert_eq!(r.status_of("engine")["state"], "running");
            assert!(r.shutdown().success());
        }
        dev = boot_in(&dir.0, &cfg, None, &[]);
        wait_ready(&dev);
    }
    ids.dedup();
    eprintln!(
        "distinct sets seen at the destination over 21 saves: {}",
        ids.len()
    );
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_a_full_filesystem_fails_the_save_cleanly() {
    require_kvm();
    let dir = TempDir::new("snap-full");
    let small = dir.0.join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "this test needs root to mount a small tmpfs"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let cfg = printer_config(&dir.0);
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let dest = small.join("set");
    let r = dev.request(json!({"cmd": "snapshot", "dest": dest}));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "snapshot_failed", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("space"),
        "{r}"
    );
    assert!(!dest.exists(), "nothing at the destination");
    let leftovers: Vec<_> = std::fs::read_dir(&small).expect("ls").collect();
    assert!(
        leftovers.is_empty(),
        "temporary files removed: {leftovers:?}"
    );
    // Nothing lost: the partitions run on and still print.
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let id = c.submit(2, 41, 64, 64).expect("submit");
    assert_eq!(c.wait(id, T).expect("done").state, JobState::Done);
    let ok = dev.ok(json!({"cmd": "snapshot", "dest": dir.0.join("set")}));
    assert_eq!(ok["partitions"], 2);
    assert!(dev.shutdown().success());
}

/// Every RAM byte of partition `name` in the set at `dir` (its chain resolved).
fn set_memory(dir: &Path, name: &str) -> Vec<u8> {
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

#[test]
fn kvm_incremental_set_equals_a_full_set_of_the_same_moment() {
    require_kvm();
    let dir = TempDir::new("snap-incr");
    let cfg = printer_config(&dir.0);
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let id = c.submit(3, 51, 64, 64).expect("submit");
    c.wait(id, T).expect("done");
    let (parent, child, full, merged) = (
        dir.0.join("parent"),
        dir.0.join("child"),
        dir.0.join("full"),
        dir.0.join("merged"),
    );
    dev.ok(json!({"cmd": "snapshot", "dest": parent}));
    let id2 = c.submit(5, 52, 128, 128).expect("submit");
    c.wait(id2, T).expect("done");
    // One moment: the device paused, an incremental set and a full set of it.
    dev.ok(json!({"cmd": "pause"}));
    let inc = dev.ok(json!({"cmd": "snapshot", "dest": child, "parent": parent}));
    let fullr = dev.ok(json!({"cmd": "snapshot", "dest": full}));
    let (inc_bytes, full_bytes) = (
        inc["memory_bytes_written"].as_u64().expect("bytes"),
        fullr["memory_bytes_written"].as_u64().expect("bytes"),
    );
    assert!(
        inc_bytes > 0 && inc_bytes < full_bytes / 2,
        "incremental {inc} vs full {fullr}"
    );
    // A parent that is not the last set is refused.
    let r = dev.request(json!({"cmd": "snapshot", "dest": dir.0.join("x"), "parent": parent}));
    assert_eq!(r["error"]["code"], "invalid_snapshot", "{r}");
    dev.ok(json!({"cmd": "resume"}));
    assert!(dev.shutdown().success());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["snapshot", "merge"])
        .arg(&child)
        .arg(&merged)
        .output()
        .expect("merge");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["engine", "controller"] {
        let f = set_memory(&full, name);
        assert!(
            set_memory(&child, name) == f,
            "{name}: parent + child differs from full"
        );
        assert!(
            set_memory(&merged, name) == f,
            "{name}: merged differs from full"
        );
    }
    // The chain restores: both jobs are there.
    let mut dev = boot_in(&dir.0, &cfg, Some(&child), &[]);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let jobs = c.jobs(None).expect("jobs");
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id, id2]);
    assert!(dev.shutdown().success());
}
