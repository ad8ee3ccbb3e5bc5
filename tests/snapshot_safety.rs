//! End-to-end: a snapshot set is never half-written and never wrongly trusted: kill -9
//! during saves, a full filesystem, and every kind of damaged set refused (with a cold
//! fallback that says why).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::snap::*;
use common::*;
use duplex_link::JobState;
use duplex_vmm::job::JobClient;
use serde_json::{json, Value};

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
