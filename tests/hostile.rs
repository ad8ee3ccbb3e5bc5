//! End-to-end: the `hostile` guest runs beside the printer's engine and controller and
//! attacks them (broken descriptor chains, vsock junk at every port of its peers from
//! thousands of source ports, a flood of snapshot requests, a console flood) while a
//! 50-page job prints. The job completes with the right checksums, the monitor stays up,
//! the other partitions run on, and `status` counts every rejection.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use duplex_link::{expected_page_checksum, JobState};
use duplex_vmm::job::JobClient;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

fn hostile_device(dir: &Path, cmdline: &str) -> Device {
    let mut parts = printer_partitions(&dir.join("controller.vsock"));
    let mut hostile = partition("hostile", "other", "hostile", 16, cmdline);
    hostile["vsock"] = json!({"cid": 5});
    parts.push(hostile);
    let cfg = json!({
        "device": "printer",
        "partitions": parts,
        "snapshot": {"dir": dir.join("set")},
    });
    let file = dir.join("device.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write");
    Device::boot_file(&file, TempDir::new("hostile-run"))
}

fn wait_status(dev: &Device, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let st = dev.ok(json!({"cmd": "status"}));
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kvm_a_hostile_partition_does_not_stop_a_50_page_job() {
    require_kvm();
    let dir = TempDir::new("hostile");
    let mut dev = hostile_device(
        &dir.0,
        "hostile.snaps=10000 hostile.junk=20000 hostile.lines=2000",
    );
    dev.wait_line("engine", "READY", T);
    dev.wait_line("controller", "READY", T);
    let mut c = JobClient::connect(&dir.0.join("controller.vsock")).expect("connect");
    let (pages, seed) = (50u32, 0x4057);
    let id = c.submit(pages, seed, 128, 128).expect("submit");
    let job = c.wait(id, T).expect("the job completes");
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let expected: Vec<u32> = (0..pages)
        .map(|p| expected_page_checksum(seed, p, 128, 128))
        .collect();
    assert_eq!(job.checksums, expected, "checksums");
    dev.wait_line("hostile", "hostile: done", T);
    dev.wait_line("hostile", "hostile: alive 2", T);

    // Every snapshot request of the hostile partition was refused or folded into one that
    // was; none was taken.
    let st = wait_status(&dev, "all 10000 requests accounted", |st| {
        let h = &st["guest_snapshots"]["partitions"]["hostile"];
        h["refused_not_allowed"].as_u64().unwrap_or(0) + h["coalesced"].as_u64().unwrap_or(0)
            == 10_000
    });
    let h = &st["guest_snapshots"]["partitions"]["hostile"];
    assert_eq!(h["accepted"], 0, "{h}");
    assert!(h["refused_not_allowed"].as_u64().unwrap_or(0) >= 1, "{h}");
    assert!(!dir.0.join("set").exists(), "no set was written");
    for p in st["partitions"].as_array().expect("partitions") {
        assert_eq!(p["state"], "running", "{p}");
    }
    // The broken chains were refused (the spoofed source among them), and the packets for
    // connections that do not exist were answered with RST instead of reaching the peers:
    // 5 of every 7 junk packets are data, credit or shutdown for no connection.
    let v = &st["vsock"]["counters"];
    let count = |k: &str| v[k].as_u64().unwrap_or(0);
    assert!(count("malformed_tx") >= 5, "{v}");
    assert!(count("spoofed") >= 1, "{v}");
    assert!(count("rst_unknown") >= 20_000 * 5 / 7 - 500, "{v}");
    assert_eq!(count("panics_recovered"), 0, "{v}");
    // Its console flood went through the writer, counted.
    let hostile = dev.status_of("hostile");
    assert!(
        hostile["console"]["lines"].as_u64().unwrap_or(0) >= 2_000,
        "{hostile}"
    );
    // The monitor's services all still run.
    for s in st["services"].as_array().expect("services") {
        if s["name"] == "supervisor" || s["name"] == "device-loop" || s["name"] == "api-accept" {
            assert_eq!(s["state"], "running", "{s}");
        }
    }
    eprintln!("{st:#}");
    assert!(dev.shutdown().success());
}
