//! End-to-end: the reference device boots from `examples/device.json`, its partitions
//! print banners and heartbeats, and pause/resume/stop/start act on one partition only.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// `examples/device.json`, with absolute kernel paths and fast heartbeats.
fn example_config() -> Value {
    let text = std::fs::read_to_string(root().join("examples/device.json")).expect("example");
    let mut cfg: Value = serde_json::from_str(&text).expect("example is JSON");
    for p in cfg["partitions"].as_array_mut().expect("partitions") {
        let name = p["kernel"]
            .as_str()
            .expect("kernel")
            .rsplit('/')
            .next()
            .expect("file")
            .to_owned();
        p["kernel"] = json!(guest(&name));
        let cmdline = format!("{} heartbeat_ms=200", p["cmdline"].as_str().unwrap_or(""));
        p["cmdline"] = json!(cmdline);
        // Each test gets its own host bridge socket, next to its config file.
        let uds = format!("{}.vsock", p["name"].as_str().unwrap_or("p"));
        if let Some(v) = p.get_mut("vsock").and_then(|v| v.as_object_mut()) {
            if v.contains_key("uds") {
                v.insert("uds".into(), json!(uds));
            }
        }
    }
    cfg
}

#[test]
fn kvm_example_device_boots_both_partitions() {
    require_kvm();
    let cfg = example_config();
    let mut dev = Device::boot(&cfg);
    let banner = dev.wait_line("engine", "duplex engine:", T);
    assert!(
        banner.contains("role=engine"),
        "banner shows the command line: {banner}"
    );
    let banner = dev.wait_line("controller", "duplex controller:", T);
    assert!(banner.contains("role=controller"), "{banner}");
    let e1 = dev.wait_heartbeat("engine", 2, T);
    let c1 = dev.wait_heartbeat("controller", 2, T);
    let e2 = dev.wait_heartbeat("engine", e1 + 2, T);
    let c2 = dev.wait_heartbeat("controller", c1 + 2, T);
    assert!(e2 > e1 && c2 > c1);
    // Heartbeats count up by one, with no gap and no restart.
    let beats: Vec<u64> = dev
        .console("engine")
        .iter()
        .filter_map(|l| {
            l.split("heartbeat ")
                .nth(1)
                .and_then(|n| n.trim().parse().ok())
        })
        .collect();
    assert_eq!(beats, (1..=beats.len() as u64).collect::<Vec<_>>());
    // Both consoles reach the monitor's stdout with their prefixes.
    let out = dev.stdout_lines();
    assert!(
        out.iter().any(|l| l.starts_with("[engine] duplex engine:")),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|l| l.starts_with("[controller] duplex controller:")),
        "{out:?}"
    );
    let st = dev.ok(json!({"cmd": "status"}));
    for p in st["partitions"].as_array().expect("list") {
        assert_eq!(p["state"], "running", "{p}");
        assert!(p["exits"]["mmio"].as_u64().unwrap_or(0) > 0, "{p}");
        assert!(p["uptime_ms"].as_u64().unwrap_or(0) > 0, "{p}");
        let configured = cfg["partitions"]
            .as_array()
            .and_then(|ps| ps.iter().find(|c| c["name"] == p["name"]))
            .map(|c| c["memory_mib"].clone());
        assert_eq!(Some(p["memory_mib"].clone()), configured, "{p}");
    }
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_pause_freezes_one_partition_and_resume_continues_its_counter() {
    require_kvm();
    let mut dev = Device::boot(&example_config());
    dev.wait_heartbeat("engine", 2, T);
    dev.wait_heartbeat("controller", 2, T);
    let r = dev.ok(json!({"cmd": "pause", "partition": "engine", "id": 7}));
    assert_eq!(r["partitions"], json!(["engine"]));
    assert_eq!(dev.status_of("engine")["state"], "paused");
    let frozen = dev.heartbeat("engine").expect("beat");
    let c0 = dev.heartbeat("controller").expect("beat");
    // The controller goes on while the engine is frozen.
    dev.wait_heartbeat("controller", c0 + 4, T);
    assert_eq!(
        dev.heartbeat("engine"),
        Some(frozen),
        "a paused partition printed"
    );
    assert_eq!(dev.status_of("controller")["state"], "running");
    // Resume continues the same counter, with no restart and no burst.
    dev.ok(json!({"cmd": "resume", "partition": "engine"}));
    assert_eq!(dev.status_of("engine")["state"], "running");
    dev.wait_heartbeat("engine", frozen + 1, T);
    let lines = dev.console("engine");
    let next = lines
        .iter()
        .filter(|l| l.contains("heartbeat "))
        .skip_while(|l| !l.ends_with(&format!("heartbeat {frozen}")))
        .nth(1)
        .cloned();
    assert_eq!(next, Some(format!("engine heartbeat {}", frozen + 1)));
    assert_eq!(dev.status_of("engine")["boots"], 1);
    // Pause all, resume all.
    let r = dev.ok(json!({"cmd": "pause"}));
    assert_eq!(r["partitions"].as_array().map(Vec::len), Some(2));
    let r = dev.ok(json!({"cmd": "resume"}));
    assert_eq!(r["partitions"].as_array().map(Vec::len), Some(2));
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_stop_and_start_cold_boot_one_partition() {
    require_kvm();
    let mut dev = Device::boot(&example_config());
    dev.wait_heartbeat("engine", 2, T);
    dev.ok(json!({"cmd": "stop", "partition": "engine"}));
    let st = dev.status_of("engine");
    assert_eq!(st["state"], "stopped");
    assert_eq!(st["exit_status"], Value::Null);
    let c0 = dev.wait_heartbeat("controller", 1, T);
    dev.wait_heartbeat("controller", c0 + 2, T);
    // A stopped partition cannot be paused; it can be started again, cold.
    let r = dev.request(json!({"cmd": "pause", "partition": "engine"}));
    assert_eq!(r["error"]["code"], "invalid_state", "{r}");
    dev.ok(json!({"cmd": "start", "partition": "engine"}));
    let st = dev.wait_state("engine", "running", T);
    assert_eq!(st["boots"], 2);
    // The new boot prints a second banner and counts from 1 again.
    let deadline = std::time::Instant::now() + T;
    while dev
        .console("engine")
        .iter()
        .filter(|l| l.contains("duplex engine:"))
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "no second banner");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = dev.request(json!({"cmd": "start", "partition": "engine"}));
    assert_eq!(
        r["error"]["code"], "invalid_state",
        "starting a running partition: {r}"
    );
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_console_to_file() {
    require_kvm();
    let dir = TempDir::new("confile");
    let log = dir.0.join("engine.log");
    let mut p = partition("engine", "engine", "engine", 16, "heartbeat_ms=100");
    p["console"] = json!({"file": log});
    let mut dev = Device::boot(&json!({"partitions": [p]}));
    dev.wait_heartbeat("engine", 2, T);
    let text = std::fs::read_to_string(&log).expect("console file");
    assert!(
        text.lines().any(|l| l.starts_with("duplex engine:")),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "engine heartbeat 1"), "{text}");
    assert!(!dev.stdout_lines().iter().any(|l| l.contains("[engine]")));
    assert!(dev.shutdown().success());
}

#[test]
fn broken_configs_are_refused_by_the_cli() {
    let dir = TempDir::new("badcfg");
    let cases: &[(&str, &str)] = &[
        ("{\"partitions\": [", "line"),
        ("{\"partitions\": [], \"extra\": 1}", "extra"),
        ("{\"partitions\": [{\"name\": \"e\", \"role\": \"engine\", \"kernel\": \"/nonexistent/k\", \"memory_mib\": 16}]}", "/nonexistent/k"),
        ("{\"partitions\": [{\"name\": \"e\", \"role\": \"engine\", \"kernel\": \"k\", \"memory_mib\": 0}]}", "memory_mib"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let cfg = dir.0.join(format!("bad{i}.json"));
        std::fs::write(&cfg, text).expect("write");
        for verb in ["run", "check"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
                .arg(verb)
                .arg("--config")
                .arg(&cfg)
                .args(if verb == "run" {
                    vec!["--api-sock", "/nonexistent/sock"]
                } else {
                    vec![]
                })
                .output()
                .expect("run duplex");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted {text}");
            assert!(
                err.contains(needle),
                "{verb}: error for {text} should name {needle}: {err}"
            );
            assert!(
                err.contains(&cfg.display().to_string()),
                "error names the file: {err}"
            );
        }
    }
}
