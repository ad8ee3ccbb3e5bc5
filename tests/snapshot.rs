//! End-to-end: coordinated snapshot of the reference device (engine + controller) and
//! restore, in a new process and in-process, through the real monitor and guests.

mod common;

use std::time::{Duration, Instant};

use common::snap::*;
use common::*;
use duplex_link::{expected_page_checksum, HostRequest, JobState};
use duplex_vmm::job::JobClient;
use serde_json::json;

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
    for phase in [
        "copy", "quiesce", "pause", "capture", "resume", "commit", "fsync",
    ] {
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
    assert!(r["timings_ms"]["build"].is_number(), "{r}");
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

#[test]
fn kvm_the_controller_itself_can_raise_the_snapshot_and_reboot() {
    require_kvm();
    let dir = TempDir::new("snap-guest");
    let mut cfg = printer_config(&dir.0);
    cfg["snapshot"]["guest_requests"] = json!({"min_interval_ms": 1500});
    let set = dir.0.join("set");
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let id = c.submit(2, 31, 64, 64).expect("submit");
    c.wait(id, T).expect("done");
    c.call(&HostRequest::RequestSnapshot { reboot: false })
        .expect("request");
    dev.wait_line("controller", "snapshot requested (reboot=false)", T);
    wait_for_set(&set);
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
    let gate = |dev: &Device| dev.ok(json!({"cmd": "status"}))["guest_snapshots"].clone();
    let deadline = Instant::now() + T;
    while gate(&dev)["partitions"]["controller"]["saved"] != 1 {
        assert!(Instant::now() < deadline, "not saved: {}", gate(&dev));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Too soon after the last one (min_interval_ms): refused and counted, nothing happens.
    c.call(&HostRequest::RequestSnapshot { reboot: true })
        .expect("request");
    let deadline = Instant::now() + T;
    while gate(&dev)["partitions"]["controller"]["refused_rate_limited"] != 1 {
        assert!(Instant::now() < deadline, "not refused: {}", gate(&dev));
        std::thread::sleep(Duration::from_millis(10));
    }
    let g = gate(&dev);
    assert_eq!(g["allowed"], json!(["controller"]), "{g}");
    assert_eq!(g["partitions"]["controller"]["accepted"], 1, "{g}");
    assert!(dev.ok(json!({"cmd": "status"}))["restored_from"].is_null());
    std::thread::sleep(Duration::from_millis(1600));
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

/// This machine's KVM keeps the host's TSC for a restored vCPU: the guests' time bias
/// (guest-abi.md, "Time across a restore") must carry their time over. A set restored
/// 12 s after its cut, with a job in flight, goes on from the cut: the controller does not
/// take the 12 s for an engine silent beyond its 10 s limit, and the job completes once.
#[test]
fn kvm_a_set_restored_long_after_its_cut_goes_on_from_the_cut() {
    require_kvm();
    let dir = TempDir::new("snap-late");
    let cfg = printer_config(&dir.0);
    let set = dir.0.join("set");
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let job = c.submit(2_000, 81, 64, 64).expect("submit");
    let deadline = Instant::now() + T;
    while c.jobs(Some(job)).expect("status")[0].pages_done < 10 {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    assert!(dev.shutdown().success());
    std::thread::sleep(Duration::from_secs(12));

    let mut dev = boot_in(&dir.0, &cfg, Some(&set), &[]);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect after restore");
    let done = c.wait(job, T).expect("the job finishes");
    let console: Vec<String> = dev
        .stdout_lines()
        .into_iter()
        .filter(|l| !l.contains("heartbeat"))
        .collect();
    assert_eq!(
        done.state,
        JobState::Done,
        "{done:?}; consoles: {console:?}"
    );
    let expected: Vec<u32> = (0..2_000)
        .map(|p| expected_page_checksum(81, p, 64, 64))
        .collect();
    assert_eq!(done.checksums, expected);
    assert_eq!(
        engine_pages(&mut c),
        2_000,
        "each page printed exactly once"
    );
    assert!(
        !console.iter().any(|l| l.contains("went silent")),
        "the restore made the guest's clock jump: {console:?}"
    );
    assert!(dev.shutdown().success());
}
