//! End-to-end: a partition that faults, panics, triple-faults or powers off ends alone;
//! the monitor and every other partition keep running.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[test]
fn kvm_faulting_partitions_crash_alone() {
    require_kvm();
    let cfg = json!({"device": "isolation", "partitions": [
        partition("engine", "engine", "engine", 16, "heartbeat_ms=100"),
        partition("f-pf", "other", "faulty", 16, "fault=pf"),
        partition("f-ud", "other", "faulty", 16, "fault=ud"),
        partition("f-gp", "other", "faulty", 16, "fault=gp"),
        partition("f-triple", "other", "faulty", 16, "fault=triple"),
        partition("f-panic", "other", "faulty", 16, "fault=panic"),
        partition("f-exit", "other", "faulty", 16, "fault=exit:3"),
    ]});
    let mut dev = Device::boot(&cfg);
    let expect_vector = [("f-pf", 14u64), ("f-ud", 6), ("f-gp", 13)];
    for (name, vector) in expect_vector {
        let st = dev.wait_state(name, "crashed", T);
        let crash = &st["crash"];
        assert_eq!(crash["vector"], vector, "{st}");
        let rip = crash["rip"].as_u64().expect("rip");
        assert!(rip >= 0x10_0000, "rip inside the image: {st}");
        let reason = crash["reason"].as_str().expect("reason");
        assert!(reason.contains(&format!("vector {vector}")), "{reason}");
        assert!(reason.contains(&format!("{rip:#x}")), "{reason}");
        // The guest's own report is in the console tail.
        let tail = crash["console_tail"].as_array().expect("tail");
        assert!(
            tail.iter()
                .any(|l| l.as_str().unwrap_or("").contains("FAULT vector=")),
            "{st}"
        );
    }
    let st = dev.wait_state("f-triple", "crashed", T);
    assert!(
        st["crash"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("triple fault"),
        "{st}"
    );
    let st = dev.wait_state("f-panic", "crashed", T);
    assert!(
        st["crash"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("panic"),
        "{st}"
    );
    assert!(
        st["crash"]["console_tail"]
            .as_array()
            .expect("tail")
            .iter()
            .any(|l| l.as_str().unwrap_or("").contains("PANIC")),
        "{st}"
    );
    let st = dev.wait_state("f-exit", "stopped", T);
    assert_eq!(st["exit_status"], 3, "{st}");
    assert_eq!(st["crash"], serde_json::Value::Null);

    // The engine never stopped counting.
    let h = dev.heartbeat("engine").expect("engine beats");
    dev.wait_heartbeat("engine", h + 3, T);
    assert_eq!(dev.status_of("engine")["state"], "running");

    // A crashed partition boots again, cold, on `start`.
    dev.ok(json!({"cmd": "start", "partition": "f-pf"}));
    let deadline = std::time::Instant::now() + T;
    loop {
        let st = dev.status_of("f-pf");
        if st["boots"] == 2 && st["state"] == "crashed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "f-pf did not boot and crash again: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_guest_reboot_request_cold_boots_the_partition() {
    require_kvm();
    let cfg = json!({"partitions": [
        partition("engine", "engine", "engine", 16, "heartbeat_ms=100"),
        partition("rebooter", "other", "faulty", 16, "fault=reboot"),
    ]});
    let mut dev = Device::boot(&cfg);
    let deadline = std::time::Instant::now() + T;
    loop {
        let st = dev.status_of("rebooter");
        if st["boots"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no reboots: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let banners = dev
        .console("rebooter")
        .iter()
        .filter(|l| l.contains("duplex faulty:"))
        .count();
    assert!(banners >= 2, "each boot prints a banner");
    dev.wait_heartbeat("engine", 3, T);
    assert!(dev.shutdown().success());
}
