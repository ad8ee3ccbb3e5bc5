//! End-to-end: the control socket of a running monitor answers every malformed request
//! with the right error code, keeps the connection usable, and serves several clients.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::json;

fn device() -> Device {
    Device::boot(&json!({"partitions": [
        partition("engine", "engine", "engine", 16, "heartbeat_ms=100"),
        partition("controller", "controller", "controller", 16, "heartbeat_ms=100"),
    ]}))
}

#[test]
fn kvm_malformed_requests_get_errors_and_the_connection_survives() {
    require_kvm();
    let mut dev = device();
    dev.wait_heartbeat("engine", 1, Duration::from_secs(30));
    let mode = std::fs::metadata(&dev.sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");

    let long = format!(
        "{{\"cmd\":\"status\",\"pad\":\"{}\"}}\n",
        "x".repeat(70 * 1024)
    );
    let table: Vec<(Vec<u8>, &str)> = vec![
        (b"not json\n".to_vec(), "parse_error"),
        (b"{\"cmd\":\n".to_vec(), "parse_error"),
        (b"[1,2,3]\n".to_vec(), "invalid_request"),
        (b"42\n".to_vec(), "invalid_request"),
        (b"\"status\"\n".to_vec(), "invalid_request"),
        (b"{}\n".to_vec(), "invalid_request"),
        (b"{\"cmd\":5}\n".to_vec(), "invalid_request"),
        (b"{\"cmd\":null}\n".to_vec(), "invalid_request"),
        (
            b"{\"cmd\":\"reboot-the-world\"}\n".to_vec(),
            "unknown_command",
        ),
        (b"{\"cmd\":\"STATUS\"}\n".to_vec(), "unknown_command"),
        (
            b"{\"cmd\":\"pause\",\"partition\":\"nope\"}\n".to_vec(),
            "unknown_partition",
        ),
        (
            b"{\"cmd\":\"status\",\"partition\":\"ghost\"}\n".to_vec(),
            "unknown_partition",
        ),
        (
            b"{\"cmd\":\"console\",\"partition\":\"ghost\"}\n".to_vec(),
            "unknown_partition",
        ),
        (
            b"{\"cmd\":\"pause\",\"partition\":7}\n".to_vec(),
            "invalid_request",
        ),
        (b"{\"cmd\":\"stop\"}\n".to_vec(), "invalid_request"),
        (
            b"{\"cmd\":\"start\",\"partition\":[\"engine\"]}\n".to_vec(),
            "invalid_request",
        ),
        (
            b"{\"cmd\":\"console\",\"partition\":\"engine\",\"lines\":-1}\n".to_vec(),
            "invalid_request",
        ),
        (
            b"{\"cmd\":\"console\",\"partition\":\"engine\",\"lines\":\"ten\"}\n".to_vec(),
            "invalid_request",
        ),
        (
            b"{\"cmd\":\"console\",\"partition\":\"engine\",\"lines\":99999999}\n".to_vec(),
            "invalid_request",
        ),
        (
            b"{\"cmd\":\"status\",\"bogus\":true}\n".to_vec(),
            "invalid_request",
        ),
        (
            b"{\"cmd\":\"resume\",\"partition\":\"engine\"}\n".to_vec(),
            "invalid_state",
        ),
        (
            b"{\"cmd\":\"start\",\"partition\":\"engine\"}\n".to_vec(),
            "invalid_state",
        ),
        (b"\xff\xfe{\"cmd\":\"status\"}\n".to_vec(), "not_utf8"),
        (long.into_bytes(), "line_too_long"),
    ];
    assert!(table.len() >= 20);
    let mut conn = dev.connect();
    for (line, code) in &table {
        let resp = conn.raw(line);
        assert_eq!(
            resp["ok"],
            false,
            "{:?} -> {resp}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(
            resp["error"]["code"],
            *code,
            "{:?} -> {resp}",
            String::from_utf8_lossy(line)
        );
        assert!(
            !resp["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{resp}"
        );
    }
    // The same connection still works, and ids are echoed.
    let resp = conn.request(&json!({"cmd": "status", "id": "after-errors"}));
    assert_eq!(resp["ok"], true, "{resp}");
    assert_eq!(resp["id"], "after-errors");
    assert_eq!(
        resp["result"]["partitions"].as_array().map(Vec::len),
        Some(2)
    );
    // Every partition kept running through all of it.
    for p in resp["result"]["partitions"].as_array().expect("list") {
        assert_eq!(p["state"], "running", "{p}");
    }
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_two_clients_at_once() {
    require_kvm();
    let mut dev = device();
    let mut a = dev.connect();
    let mut b = dev.connect();
    for i in 0..20 {
        let ra = a.request(&json!({"cmd": "status", "id": i}));
        let rb = b
            .request(&json!({"cmd": "console", "partition": "engine", "lines": 5, "id": {"b": i}}));
        assert_eq!(ra["id"], i);
        assert_eq!(rb["id"], json!({"b": i}));
        assert_eq!(ra["ok"], true);
        assert_eq!(rb["ok"], true);
    }
    // A pause from one client is seen by the other.
    assert_eq!(
        a.request(&json!({"cmd": "pause", "partition": "controller"}))["ok"],
        true
    );
    let st = b.request(&json!({"cmd": "status", "partition": "controller"}));
    assert_eq!(st["result"]["partitions"][0]["state"], "paused", "{st}");
    // `duplex ctl` is a client too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["ctl", "--api-sock"])
        .arg(&dev.sock)
        .args(["resume", "controller"])
        .output()
        .expect("duplex ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("controller"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["ctl", "--api-sock"])
        .arg(&dev.sock)
        .args(["pause", "ghost"])
        .output()
        .expect("duplex ctl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_partition"));
    assert_eq!(dev.status_of("controller")["state"], "running");
    assert!(dev.sock.exists());
    assert!(dev.shutdown().success());
    assert!(!dev.sock.exists(), "socket removed on shutdown");
}
