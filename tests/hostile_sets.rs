//! End-to-end: snapshot sets are untrusted input (issue 11). Hostile variants of a real set
//! (an oversized manifest, a symlinked state file, more RAM than configured, RAM over the
//! MMIO window, an absolute or `..` parent, a backlog naming an unknown CID) are refused by
//! an in-place `reboot --from` with their reason, and the running device is untouched; a
//! `snapshot DEST` never replaces a foreign directory; `snapshot.root` confines sets; a
//! memory file truncated under a lazily restored guest crashes that partition only.

mod common;

use std::path::{Path, PathBuf};

use common::snap::*;
use common::*;
use duplex_snapshot::{manifest, Manifest};
use serde_json::{json, Value};

/// Copies a set directory (its files; links are copied as links).
fn copy_set(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read set") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn read_manifest(dir: &Path) -> Manifest {
    let bytes = std::fs::read(dir.join("manifest.json")).expect("manifest");
    manifest::unseal(dir, &bytes).expect("unseal")
}

/// Changes the manifest of the set at `dir` and seals it again, as a crafted set would be.
fn reseal(dir: &Path, change: impl FnOnce(&mut Manifest)) {
    let mut m = read_manifest(dir);
    change(&mut m);
    let sealed = manifest::seal(&m).expect("seal");
    std::fs::write(dir.join("manifest.json"), sealed).expect("write manifest");
}

/// Replaces a small file of the set and records its length and CRC in the manifest.
fn rewrite(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).expect("write");
    reseal(dir, |m| {
        let e = m.files.get_mut(file).expect("listed");
        e.len = bytes.len() as u64;
        e.crc32 = crc32(bytes);
    });
}

/// CRC-32 (IEEE 802.3, as the format uses), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Gives partition `name` the RAM layout `ram` (gpa, len), its memory file grown to match.
fn set_ram(dir: &Path, name: &str, ram: &[(u64, u64)]) {
    let total: u64 = ram.iter().map(|r| r.1).sum();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(format!("{name}.mem")))
        .expect("open");
    f.set_len(total).expect("resize");
    reseal(dir, |m| {
        let p = m
            .partitions
            .iter_mut()
            .find(|p| p.name == name)
            .expect("partition");
        p.ram = ram
            .iter()
            .map(|&(gpa, len)| duplex_snapshot::RamRegion { gpa, len })
            .collect();
        if let Some(e) = m.files.get_mut(&format!("{name}.mem")) {
            e.len = total;
        }
    });
}

/// What must not change when a restore is refused.
fn fingerprint(dev: &Device) -> Value {
    let st = dev.ok(json!({"cmd": "status"}));
    let parts: Vec<Value> = st["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| json!([p["name"], p["state"], p["boots"]]))
        .collect();
    json!({ "partitions": parts, "restored_from": st["restored_from"] })
}

/// The device runs on as before: same runs, both partitions running and still beating.
fn assert_untouched(dev: &Device, before: &Value, what: &str) {
    assert_eq!(&fingerprint(dev), before, "{what}: the device changed");
    for name in ["engine", "controller"] {
        let h = dev.heartbeat(name).unwrap_or(0);
        dev.wait_heartbeat(name, h + 2, T);
    }
}

/// `reboot --from dir` must be refused as `invalid_snapshot` with `needle` in its message.
fn refused(dev: &Device, dir: &Path, needle: &str, what: &str) {
    let r = dev.request(json!({"cmd": "reboot", "from": dir}));
    assert_eq!(r["ok"], false, "{what}: a hostile set was restored: {r}");
    assert_eq!(r["error"]["code"], "invalid_snapshot", "{what}: {r}");
    let msg = r["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains(needle),
        "{what}: the refusal should say {needle:?}: {msg}"
    );
}

#[test]
fn kvm_hostile_sets_are_refused_and_the_running_device_is_untouched() {
    require_kvm();
    let p = Printer::boot("hostile-sets", "");
    let dev = &p.dev;
    let dir = p.dir.0.clone();
    dev.ok(json!({"cmd": "snapshot", "dest": p.set}));
    let child = dir.join("child");
    dev.ok(json!({"cmd": "snapshot", "dest": child, "parent": p.set}));
    let before = fingerprint(dev);
    let tmp_name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();

    type Damage = Box<dyn Fn(&Path)>;
    let full = p.set.clone();
    let cases: Vec<(&str, &Path, Damage, String)> = vec![
        (
            "oversized manifest",
            &full,
            Box::new(|s| {
                reseal(s, |m| m.extra = json!({ "pad": "x".repeat(5 << 20) }));
            }),
            "over the cap".into(),
        ),
        (
            "symlinked state file",
            &full,
            Box::new(|s| {
                let away = s.with_extension("engine.state");
                std::fs::rename(s.join("engine.state"), &away).expect("move");
                std::os::unix::fs::symlink(&away, s.join("engine.state")).expect("link");
            }),
            "symbolic link".into(),
        ),
        (
            "more RAM than configured",
            &full,
            Box::new(|s| set_ram(s, "engine", &[(0, 128 << 20)])),
            format!("the set's RAM is {} bytes", 128u64 << 20),
        ),
        (
            "RAM over the MMIO window",
            &full,
            Box::new(|s| set_ram(s, "engine", &[(0xd000_0000, 96 << 20)])),
            "the config's is".into(),
        ),
        (
            "absolute parent",
            &child,
            Box::new(|s| {
                let abs = s.with_file_name("set").display().to_string();
                reseal(s, |m| m.parent.as_mut().expect("parent").path = abs);
            }),
            "parent.path".into(),
        ),
        (
            "parent through ..",
            &child,
            Box::new(move |s| {
                let up = format!("../../{tmp_name}/set");
                reseal(s, |m| m.parent.as_mut().expect("parent").path = up);
            }),
            "parent.path".into(),
        ),
        (
            "backlog naming CID 99",
            &full,
            Box::new(|s| {
                let mut state: Value = serde_json::from_slice(
                    &std::fs::read(s.join("vsock.devstate")).expect("devstate"),
                )
                .expect("json");
                state["backlogs"]["99"] = json!({"packets": [], "bytes": 0});
                rewrite(
                    s,
                    "vsock.devstate",
                    &serde_json::to_vec(&state).expect("json"),
                );
            }),
            "CID 99".into(),
        ),
    ];
    for (i, (what, from, damage, needle)) in cases.into_iter().enumerate() {
        let bad = dir.join(format!("bad{i}"));
        copy_set(from, &bad);
        damage(&bad);
        refused(dev, &bad, &needle, what);
        assert_untouched(dev, &before, what);
    }
    // The real sets still restore.
    dev.ok(json!({"cmd": "reboot", "from": child}));
    wait_ready(dev);
    let mut p = p;
    assert!(p.dev.shutdown().success());
}

#[test]
fn kvm_snapshot_never_replaces_a_foreign_directory_and_root_confines_sets() {
    require_kvm();
    let dir = TempDir::new("hostile-root");
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    let mut cfg = printer_config(&dir.0);
    cfg["snapshot"] = json!({"dir": root.join("set"), "root": root});
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    wait_ready(&dev);
    let before = fingerprint(&dev);

    // A directory holding someone's manifest.json, and a foreign `.tmp-` sibling.
    let foreign = root.join("mine");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("manifest.json"), b"{\"format_version\": 2}\n").expect("w");
    std::fs::write(foreign.join("precious"), b"keep").expect("w");
    let sibling = root.join("mine.tmp-notes");
    std::fs::create_dir_all(&sibling).expect("mkdir");
    std::fs::write(sibling.join("precious"), b"keep").expect("w");
    let r = dev.request(json!({"cmd": "snapshot", "dest": foreign}));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(
        std::fs::read(foreign.join("precious")).expect("kept"),
        b"keep"
    );
    assert_eq!(
        std::fs::read(sibling.join("precious")).expect("kept"),
        b"keep"
    );

    // Outside the root, directly or through a link: refused, naming both.
    let outside = dir.0.join("outside");
    std::os::unix::fs::symlink(&dir.0, root.join("up")).expect("link");
    for dest in [
        outside.clone(),
        root.join("up").join("x"),
        root.join("../y"),
    ] {
        let r = dev.request(json!({"cmd": "snapshot", "dest": dest}));
        assert_eq!(r["ok"], false, "{}: {r}", dest.display());
        let msg = r["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("snapshot.root") && msg.contains(&root.display().to_string()),
            "{}: {msg}",
            dest.display()
        );
        assert!(!dest.exists());
    }
    // Inside: fine; the same set copied outside cannot be rebooted from.
    let inside = root.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": inside}));
    copy_set(&inside, &outside);
    let r = dev.request(json!({"cmd": "reboot", "from": outside}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("snapshot.root")),
        "{r}"
    );
    assert_untouched(&dev, &before, "refused outside the root");
    dev.ok(json!({"cmd": "reboot", "from": inside}));
    wait_ready(&dev);
    assert!(dev.shutdown().success());

    // `run --restore` is confined too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("run")
        .arg("--config")
        .arg(dir.0.join("device.json"))
        .arg("--api-sock")
        .arg(dir.0.join("restore.sock"))
        .arg("--restore")
        .arg(&outside)
        .args(["--seconds", "5"])
        .output()
        .expect("duplex run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("snapshot.root"), "{err}");
}

/// Truncates a file to `len` bytes.
fn truncate(file: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

/// Waits until `name` is crashed; returns its crash reason.
fn crash_reason(dev: &Device, name: &str) -> String {
    let st = dev.wait_state(name, "crashed", T);
    st["crash"]["reason"].as_str().unwrap_or("").to_owned()
}

#[test]
fn kvm_a_memory_file_truncated_under_a_lazy_guest_crashes_only_that_partition() {
    require_kvm();
    let mut p = Printer::boot("hostile-trunc", "");
    let set: PathBuf = p.set.clone();
    p.dev.ok(json!({"cmd": "snapshot", "dest": set}));
    let set2 = p.dir.0.join("set2");
    p.dev.ok(json!({"cmd": "snapshot", "dest": set2}));
    // Restored in place, lazily: the engine's RAM maps set/engine.mem.
    p.dev.ok(json!({"cmd": "reboot", "from": set}));
    wait_ready(&p.dev);

    // The monitor's side: the engine paused (its vCPU touches nothing), its memory file cut
    // short, then a snapshot reads its memory.
    p.dev.ok(json!({"cmd": "pause", "partition": "engine"}));
    truncate(&set.join("engine.mem"), 0);
    let r = p
        .dev
        .request(json!({"cmd": "snapshot", "dest": p.dir.0.join("next")}));
    assert_eq!(r["ok"], false, "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("memory file truncated"), "{msg}");
    let reason = crash_reason(&p.dev, "engine");
    assert!(reason.contains("memory file truncated"), "{reason}");
    assert_eq!(p.dev.status_of("controller")["state"], "running");
    let h = p.dev.heartbeat("controller").unwrap_or(0);
    p.dev.wait_heartbeat("controller", h + 3, T);

    // The guest's side: the device restored lazily from another set, the engine's memory
    // file cut short while it runs. Its vCPU faults on a page that is gone.
    p.dev.ok(json!({"cmd": "reboot", "from": set2}));
    let h = p.dev.heartbeat("engine").unwrap_or(0);
    p.dev.wait_heartbeat("engine", h + 2, T);
    truncate(&set2.join("engine.mem"), 0);
    let reason = crash_reason(&p.dev, "engine");
    eprintln!("engine crashed running on a truncated memory file: {reason}");
    assert!(!reason.is_empty());
    assert_eq!(p.dev.status_of("controller")["state"], "running");
    let h = p.dev.heartbeat("controller").unwrap_or(0);
    p.dev.wait_heartbeat("controller", h + 3, T);
    assert!(
        p.dev.shutdown().success(),
        "the monitor survived and shuts down"
    );
}
