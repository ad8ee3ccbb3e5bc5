//! End-to-end: device operations are transactions. A snapshot, restore or reboot that
//! fails at any step leaves the device running as it was, the last set intact and dirty
//! tracking complete; operations never overlap (`busy`). Failures are injected with the
//! test-only `fault-injection` feature (`DUPLEX_FAULTS`, see vmm/src/monitor/faults.rs).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::snap::*;
use common::*;
use duplex_link::{expected_page_checksum, JobState};
use duplex_vmm::job::JobClient;
use serde_json::{json, Value};

/// These tests drive the monitor's fault injection, which only a build with the feature
/// has: fail loudly rather than pass without it.
fn require_faults() {
    require_kvm();
    #[cfg(not(feature = "fault-injection"))]
    panic!(
        "SKIPPED-BY-BUILD: these tests need `--features duplex-vmm/fault-injection` \
         (scripts/test builds with it)"
    );
}

fn set_id(dir: &Path) -> String {
    duplex_snapshot::SnapshotSet::open(dir)
        .expect("open")
        .manifest
        .set_id
}

fn verify(dir: &Path) {
    let set = duplex_snapshot::SnapshotSet::open(dir).expect("open");
    set.verify()
        .unwrap_or_else(|e| panic!("{} does not verify: {e}", dir.display()));
}

/// Every partition runs, and each was booted `boots` times.
fn assert_running(dev: &Device, boots: u64) {
    let st = dev.ok(json!({"cmd": "status"}));
    for p in st["partitions"].as_array().expect("partitions") {
        assert_eq!(p["state"], "running", "{st}");
        assert_eq!(p["boots"], boots, "{st}");
    }
    assert_eq!(
        st["operation"],
        Value::Null,
        "no operation left running: {st}"
    );
}

/// The engine's heartbeat goes on (the partitions really run, not just say so).
fn assert_beating(dev: &Device) {
    let h = dev.heartbeat("engine").unwrap_or(0);
    dev.wait_heartbeat("engine", h + 2, T);
}

#[test]
fn kvm_a_failed_reboot_leaves_the_old_device_running_where_it_was() {
    require_faults();
    let dir = TempDir::new("tx-reboot");
    let cfg = printer_config(&dir.0);
    let set = dir.0.join("set");
    // The first reboot fails while building, the second while switching, the third while
    // pausing the old device (its engine: the 5th pause check, after the snapshot's two and
    // the second reboot's two), the fourth works.
    let faults = [("DUPLEX_FAULTS", "restore.build@1,restore.switch@1,pause@5")];
    let mut dev = boot_in_env(&dir.0, &cfg, None, &[], &faults);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let first = c.submit(3, 31, 64, 64).expect("submit");
    c.wait(first, T).expect("done");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    let id = set_id(&set);
    // After the set, the device goes on: a job the set does not know of.
    let later = c.submit(2, 32, 64, 64).expect("submit");
    c.wait(later, T).expect("done");

    for step in ["build", "switch", "pause"] {
        let r = dev.request(json!({"cmd": "reboot"}));
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"]["code"], "restore_failed", "{r}");
        assert_eq!(r["error"]["details"]["step"], step, "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("runs as before")),
            "{r}"
        );
        // Nothing was torn down: same boots, same connection, the later job still there.
        assert_running(&dev, 1);
        assert_beating(&dev);
        let jobs = c.jobs(None).expect("the old connection still works");
        assert_eq!(
            jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![first, later],
            "the device is where it was, not at the set"
        );
        assert_eq!(set_id(&set), id, "the set is untouched");
    }
    // Dirty tracking lost nothing: an incremental set on the last one equals a full set of
    // the same moment.
    dev.ok(json!({"cmd": "pause"}));
    let (child, full) = (dir.0.join("child"), dir.0.join("full"));
    dev.ok(json!({"cmd": "snapshot", "dest": child, "parent": set}));
    dev.ok(json!({"cmd": "snapshot", "dest": full}));
    dev.ok(json!({"cmd": "resume"}));
    assert_same_memory(&child, &full, "after failed reboots");
    // The set and the device are fine: the next reboot works and goes back to the set, on
    // VMs made ahead (at boot, and again after each restore).
    let r = dev.ok(json!({"cmd": "reboot"}));
    assert_eq!(r["set_id"], id.as_str(), "{r}");
    assert_eq!(r["vms_made_ahead"], 2, "{r}");
    assert_running(&dev, 2);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect after reboot");
    let jobs = c.jobs(None).expect("jobs");
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![first]);
    let next = c.submit(2, 33, 64, 64).expect("submit");
    assert_eq!(c.wait(next, T).expect("done").state, JobState::Done);
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_a_restore_that_fails_while_building_falls_back_to_a_cold_boot() {
    require_faults();
    let Printer {
        dir,
        cfg,
        set,
        mut dev,
    } = Printer::boot("tx-fallback", "");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    assert!(dev.shutdown().success());

    for step in ["restore.build", "restore.switch"] {
        let faults = [("DUPLEX_FAULTS", step)];
        let mut dev = boot_in_env(&dir.0, &cfg, Some(&set), &["--fallback", "cold"], &faults);
        let st = dev.ok(json!({"cmd": "status"}));
        let why = st["fallback"].as_str().unwrap_or("");
        assert!(
            why.contains("injected fault"),
            "{step}: status says why: {st}"
        );
        assert_eq!(st["restored_from"], Value::Null, "{st}");
        // The cold boot really happened (the partitions were not left paused).
        dev.wait_line("engine", "calibrated", T);
        wait_ready(&dev);
        assert_running(&dev, 1);
        // And the device can still be rebooted from the set in place.
        let faults_spent = dev.request(json!({"cmd": "reboot"}));
        if step == "restore.build" {
            // The fault is armed every time: the reboot fails the same way, device kept.
            assert_eq!(
                faults_spent["error"]["code"], "restore_failed",
                "{faults_spent}"
            );
            assert_running(&dev, 1);
        }
        assert!(dev.shutdown().success());
    }
}

#[test]
fn kvm_a_guest_raised_snapshot_and_reboot_whose_restore_fails_leaves_the_device_running() {
    require_faults();
    let Printer {
        dir,
        cfg: _,
        set,
        mut dev,
    } = Printer::boot("tx-guest", "restore.build");
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    c.call(&duplex_link::HostRequest::RequestSnapshot { reboot: true })
        .expect("request");
    // The set is written, the reboot from it fails while building: the device must not be
    // left paused (it was, before restores were prepared beside the running device).
    wait_for_set(&set);
    let deadline = Instant::now() + T;
    while !dev
        .stderr_lines()
        .iter()
        .any(|l| l.contains("reboot from") && l.contains("injected fault"))
    {
        assert!(
            Instant::now() < deadline,
            "the reboot was never tried: {:?}",
            dev.stderr_lines()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_running(&dev, 1);
    assert_beating(&dev);
    let id = c
        .submit(2, 71, 64, 64)
        .expect("the controller still takes jobs");
    assert_eq!(c.wait(id, T).expect("done").state, JobState::Done);
    assert!(dev.shutdown().success());
}

/// The next snapshot check of each step fails (see `check` counts: per set, `create` and
/// `commit` are reached once, `copy`, `pause` and `capture` once per partition).
const SNAPSHOT_STEPS: &[(&str, &str)] = &[
    ("snapshot.create", "snapshot.create@2"),
    ("snapshot.copy", "snapshot.copy@4"),
    ("pause", "pause@3"),
    ("snapshot.capture", "snapshot.capture@4"),
    ("snapshot.commit", "snapshot.commit@2"),
];

#[test]
fn kvm_a_snapshot_failing_at_any_step_changes_nothing() {
    require_faults();
    for (step, spec) in SNAPSHOT_STEPS {
        let dir = TempDir::new("tx-snap");
        let cfg = printer_config(&dir.0);
        let (parent, failed, child, full) = (
            dir.0.join("parent"),
            dir.0.join("failed"),
            dir.0.join("child"),
            dir.0.join("full"),
        );
        let mut dev = boot_in_env(&dir.0, &cfg, None, &[], &[("DUPLEX_FAULTS", spec)]);
        wait_ready(&dev);
        let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
        dev.ok(json!({"cmd": "snapshot", "dest": parent}));
        let id = set_id(&parent);
        let a = c.submit(4, 41, 128, 128).expect("submit");
        c.wait(a, T).expect("done");

        let r = dev.request(json!({"cmd": "snapshot", "dest": failed, "parent": parent}));
        assert_eq!(r["error"]["code"], "snapshot_failed", "{step}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(step)),
            "{step}: {r}"
        );
        // The device runs on, the last set is intact, nothing was left at the destination.
        assert_running(&dev, 1);
        assert_beating(&dev);
        assert_eq!(set_id(&parent), id, "{step}");
        verify(&parent);
        assert!(!failed.exists(), "{step}: a failed set is invisible");
        assert!(
            std::fs::read_dir(&dir.0)
                .expect("dir")
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().contains(".tmp-")),
            "{step}: no temporary directory left"
        );

        // Dirty tracking lost nothing: the next incremental set on the same parent equals
        // a full set of the same moment.
        let b = c.submit(3, 42, 128, 128).expect("submit");
        c.wait(b, T).expect("done");
        dev.ok(json!({"cmd": "pause"}));
        dev.ok(json!({"cmd": "snapshot", "dest": child, "parent": parent}));
        dev.ok(json!({"cmd": "snapshot", "dest": full}));
        dev.ok(json!({"cmd": "resume"}));
        assert_same_memory(&child, &full, step);
        assert!(dev.shutdown().success());
    }
}

#[test]
fn kvm_operations_never_overlap_and_busy_names_the_running_one() {
    require_faults();
    // The snapshot holds for 1.5 s in its capture, partitions paused.
    let Printer {
        dir,
        cfg: _,
        set,
        mut dev,
    } = Printer::boot("tx-busy", "snapshot.capture@1~1500");
    let sock = dev.sock.clone();
    let snap = std::thread::spawn({
        let set = set.clone();
        move || Conn::new(&sock).request(&json!({"cmd": "snapshot", "dest": set}))
    });
    let deadline = Instant::now() + T;
    loop {
        let st = dev.ok(json!({"cmd": "status"}));
        if st["operation"]["phase"] == "capturing" {
            assert_eq!(st["operation"]["operation"], "snapshot", "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the snapshot never reached its capture"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Every lifecycle command and another snapshot or reboot is refused meanwhile; the
    // `resume` below is the one that, unserialized, tore sets before.
    for req in [
        json!({"cmd": "resume"}),
        json!({"cmd": "pause", "partition": "engine"}),
        json!({"cmd": "stop", "partition": "controller"}),
        json!({"cmd": "start", "partition": "controller"}),
        json!({"cmd": "snapshot", "dest": dir.0.join("other")}),
        json!({"cmd": "reboot"}),
    ] {
        let r = dev.request(req.clone());
        assert_eq!(r["error"]["code"], "busy", "{req}: {r}");
        assert_eq!(r["error"]["details"]["operation"], "snapshot", "{r}");
        assert_eq!(r["error"]["details"]["phase"], "capturing", "{r}");
    }
    let r = snap.join().expect("snapshot thread");
    assert_eq!(r["ok"], true, "{r}");
    verify(&set);
    assert_running(&dev, 1);
    assert!(!dir.0.join("other").exists());
    assert!(dev.shutdown().success());
}

/// A tiny deterministic generator.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The pages of the job the chaos test prints.
const CHAOS_PAGES: u32 = 4_000;
const CHAOS_SEED: u64 = 61;

#[test]
fn kvm_four_clients_at_random_for_30s_while_a_job_prints() {
    require_kvm();
    let dir = TempDir::new("tx-chaos");
    let mut cfg = printer_config(&dir.0);
    // A third partition that may be stopped and started without touching the print path.
    if let Some(parts) = cfg["partitions"].as_array_mut() {
        parts.push(partition(
            "counter",
            "other",
            "counter",
            32,
            "counter.pages=256",
        ));
    }
    let dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let mut c = JobClient::connect(&uds(&dir.0)).expect("connect");
    let job = c
        .submit(CHAOS_PAGES, CHAOS_SEED, 64, 64)
        .expect("submit the long job");

    let seconds: u64 = std::env::var("DUPLEX_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let until = Instant::now() + Duration::from_secs(seconds);
    let sets = std::sync::Arc::new(std::sync::Mutex::new(
        Vec::<(std::path::PathBuf, Instant)>::new(),
    ));
    let clients: Vec<_> = (0..4u64)
        .map(|k| {
            let sock = dev.sock.clone();
            let base = dir.0.clone();
            let sets = sets.clone();
            std::thread::spawn(move || {
                let mut rng = 0x2545_f491_4f6c_dd1d ^ (k + 1).wrapping_mul(0x9e37_79b9);
                let mut conn = Conn::new(&sock);
                let mut n = 0u64;
                let mut codes = std::collections::BTreeMap::<String, u64>::new();
                while Instant::now() < until {
                    n += 1;
                    let part =
                        ["engine", "controller", "counter"][(next_rand(&mut rng) % 3) as usize];
                    let req = match next_rand(&mut rng) % 8 {
                        0 => json!({"cmd": "pause", "partition": part}),
                        1 => json!({"cmd": "resume", "partition": part}),
                        2 => json!({"cmd": "pause"}),
                        3 => json!({"cmd": "resume"}),
                        4 => json!({"cmd": "stop", "partition": "counter"}),
                        5 => json!({"cmd": "start", "partition": "counter"}),
                        6 => json!({"cmd": "snapshot", "dest": base.join(format!("set-{k}-{n}"))}),
                        _ => match sets.lock().unwrap_or_else(|p| p.into_inner()).last() {
                            Some((s, _)) => json!({"cmd": "reboot", "from": s}),
                            None => json!({"cmd": "status"}),
                        },
                    };
                    let r = conn.request(&req);
                    let code = if r["ok"] == true {
                        "ok".to_owned()
                    } else {
                        r["error"]["code"].as_str().unwrap_or("?").to_owned()
                    };
                    if !["ok", "busy", "invalid_state", "snapshot_denied"].contains(&code.as_str())
                    {
                        return Err(format!("{req} answered {r}"));
                    }
                    if req["cmd"] == "snapshot" && code == "ok" {
                        let dest = req["dest"].as_str().unwrap_or_default().into();
                        sets.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((dest, Instant::now()));
                    }
                    *codes
                        .entry(format!("{} {code}", req["cmd"].as_str().unwrap_or("?")))
                        .or_default() += 1;
                    std::thread::sleep(Duration::from_millis(next_rand(&mut rng) % 40));
                    // A client that paused something resumes it soon (retrying while the
                    // device is busy): the firmware resets its link to an engine silent
                    // for 10 s, and a job in flight then fails: the guests' rule, not
                    // what this test is about.
                    if req["cmd"] == "pause" && code == "ok" {
                        let mut resume = req.clone();
                        resume["cmd"] = json!("resume");
                        let give_up = Instant::now() + Duration::from_secs(3);
                        while conn.request(&resume)["error"]["code"] == "busy"
                            && Instant::now() < give_up
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                Ok(codes)
            })
        })
        .collect();
    let mut totals = std::collections::BTreeMap::<String, u64>::new();
    for t in clients {
        match t.join() {
            Ok(Ok(codes)) => {
                for (k, v) in codes {
                    *totals.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => panic!(
                "{e}\nconsoles: {:#?}",
                dev.stdout_lines()
                    .into_iter()
                    .filter(|l| !l.contains("heartbeat"))
                    .collect::<Vec<_>>()
            ),
            Err(_) => panic!(
                "a client panicked\nmonitor stderr: {:#?}",
                dev.stderr_lines()
            ),
        }
    }
    eprintln!("chaos: {totals:?}");
    // The monitor survived, and answers; let everything run again.
    let _ = dev.request(json!({"cmd": "resume"}));
    let _ = dev.request(json!({"cmd": "start", "partition": "counter"}));
    let st = dev.ok(json!({"cmd": "status"}));
    assert_eq!(st["operation"], Value::Null, "{st}");
    let sets = sets.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        totals.get("snapshot ok").copied().unwrap_or(0) >= 3,
        "too few snapshots were taken to mean anything: {totals:?}"
    );
    drop(dev);

    // Every set verifies.
    for (s, _) in &sets {
        verify(s);
    }
    // Every set restores to a device whose job completes exactly once, however old the
    // set (a restore moves the guests' time bias by the set's age: see guest-abi.md).
    let expected: Vec<u32> = (0..CHAOS_PAGES)
        .map(|p| expected_page_checksum(CHAOS_SEED, p, 64, 64))
        .collect();
    let mut checked = 0;
    let mut printing_at_the_cut = 0;
    for (s, _) in &sets {
        let mut dev = boot_in(&dir.0, &cfg, Some(s), &[]);
        let _ = dev.request(json!({"cmd": "resume"}));
        let _ = dev.request(json!({"cmd": "start", "partition": "counter"}));
        let mut c = JobClient::connect(&uds(&dir.0)).expect("connect after restore");
        if c.jobs(Some(job)).expect("status")[0].state != JobState::Done {
            printing_at_the_cut += 1;
        }
        let done = c
            .wait(job, Duration::from_secs(120))
            .expect("the job finishes");
        assert_eq!(done.state, JobState::Done, "{}: {done:?}", s.display());
        assert_eq!(done.checksums, expected, "{}: every page once", s.display());
        assert_eq!(
            engine_pages(&mut c),
            u64::from(CHAOS_PAGES),
            "{}: each page printed exactly once",
            s.display()
        );
        assert!(dev.shutdown().success());
        checked += 1;
    }
    eprintln!(
        "chaos: {} sets verified and restored, {printing_at_the_cut} with the job printing",
        sets.len()
    );
    assert_eq!(checked, sets.len());
}
