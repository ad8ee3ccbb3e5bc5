//! End-to-end: every snapshot set is an exact cut. The `counter` guest (guests/counter)
//! rewrites a counter into each page of a 16 MiB region, in ring 3, without VM exits, so
//! that its memory and its registers say at which instant they were taken; each set the
//! real monitor writes (full, incremental, after an in-place reboot from a set, after a
//! restore in a new process) must hold memory and vCPU state of one instant
//! (`common::livecut`). This is the guard for a live (pre-copy) snapshot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::livecut::{
    check_counter_cut, check_counter_mix, check_pages, position, vcpu_reg, PAGE,
};
use common::snap::{boot_in, T};
use common::*;
use serde_json::{json, Value};

/// The counter partition's name.
const NAME: &str = "counter";
/// Pages of the counter region (16 MiB).
const PAGES: u64 = 4096;
/// How long the guest runs between sets. After each set KVM's dirty log write-protects
/// the guest's pages again, so the first write to each page exits (about 25 µs here): a
/// pass over 4096 pages then takes about 100 ms instead of well under one.
const RUN: Duration = Duration::from_millis(500);

fn config(dir: &Path) -> Value {
    json!({
        "device": "counter",
        "partitions": [partition(NAME, "other", "counter", 256, &format!("counter.pages={PAGES}"))],
        "snapshot": {"dir": dir.join("set")},
    })
}

/// `duplex ctl --api-sock SOCK ARGS...`: its result, parsed.
fn ctl(dev: &Device, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("ctl")
        .arg("--api-sock")
        .arg(&dev.sock)
        .args(args)
        .output()
        .expect("run duplex ctl");
    assert!(
        out.status.success(),
        "duplex ctl {args:?} failed: {}; monitor stderr: {:?}",
        String::from_utf8_lossy(&out.stderr),
        dev.stderr_lines()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "duplex ctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Takes a snapshot into `dest` (incremental on `parent`) with `duplex ctl snapshot`.
fn snapshot(dev: &Device, dest: &Path, parent: Option<&Path>) -> Value {
    let d = dest.display().to_string();
    let mut args = vec!["snapshot", d.as_str()];
    let p = parent.map(|p| p.display().to_string());
    if let Some(p) = &p {
        args.extend(["--parent", p.as_str()]);
    }
    let r = ctl(dev, &args);
    assert_eq!(r["parent"].is_null(), parent.is_none(), "{r}");
    r
}

/// Checks the set, panicking with the checker's message; returns `(c, i)`.
fn check(set: &Path, base: u64) -> (u64, u64) {
    check_counter_cut(set, NAME, base, PAGES).unwrap_or_else(|e| panic!("{e}"))
}

/// The region's base from the guest's `counter: base=0x... pages=N` line.
fn parse_base(line: &str) -> u64 {
    let rest = line
        .split("counter: base=0x")
        .nth(1)
        .unwrap_or_else(|| panic!("no base in {line:?}"));
    let (hex, pages) = rest
        .split_once(" pages=")
        .unwrap_or_else(|| panic!("no pages in {line:?}"));
    assert_eq!(pages.trim(), PAGES.to_string(), "{line:?}");
    let base = u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(base % PAGE, 0, "the region is page-aligned: {line:?}");
    base
}

fn assert_running(dev: &Device) {
    let s = dev.status_of(NAME);
    assert_eq!(s["state"], "running", "{s}");
}

#[test]
fn kvm_every_set_is_an_exact_cut() {
    require_kvm();
    let dir = TempDir::new("livecut");
    let cfg = config(&dir.0);
    let mut dev = boot_in(&dir.0, &cfg, None, &[]);
    let base = parse_base(&dev.wait_line(NAME, "counter: base=", T));
    assert_running(&dev);

    // Full and incremental sets, each parent the set just before it (chains of up to 4).
    let incremental = [false, true, true, false, true, false, true, true, true];
    let mut sets: Vec<PathBuf> = Vec::new();
    let mut cuts: Vec<(u64, u64)> = Vec::new();
    for (n, &inc) in incremental.iter().enumerate() {
        std::thread::sleep(RUN);
        let set = dir.0.join(format!("s{n}"));
        let parent = if inc { sets.last().cloned() } else { None };
        let r = snapshot(&dev, &set, parent.as_deref());
        let cut = check(&set, base);
        eprintln!(
            "set {n} ({}): c={} i={} downtime_ms={}",
            if inc { "incremental" } else { "full" },
            cut.0,
            cut.1,
            r["downtime_ms"]
        );
        if let Some(prev) = cuts.last() {
            assert!(
                cut.0 > prev.0,
                "set {n}: the guest did not run between sets: {prev:?} then {cut:?}"
            );
        }
        assert_running(&dev);
        sets.push(set);
        cuts.push(cut);
    }

    // The check sees tearing in real sets: registers of one set with memory of another
    // (memory newer, then older, than the registers) are refused.
    for (state, memory) in [
        (&sets[0], &sets[1]),
        (&sets[1], &sets[0]),
        (&sets[4], &sets[3]),
    ] {
        let r = check_counter_mix(state, memory, NAME, base, PAGES);
        assert!(
            r.is_err(),
            "registers of {state:?} with memory of {memory:?}: {r:?}"
        );
        eprintln!("mixed sets refused: {}", r.err().unwrap_or_default());
    }

    // In place: reboot from the last set, then a set of the rebooted device, incremental on
    // the set it was restored from, and a full one.
    let last = sets.last().cloned().expect("sets");
    let restored = *cuts.last().expect("cuts");
    let r = ctl(&dev, &["reboot", "--from", &last.display().to_string()]);
    assert_eq!(r["set"], json!(last), "{r}");
    let st = dev.ok(json!({"cmd": "status"}));
    assert_eq!(st["restored_from"]["set"], json!(last), "{st}");
    assert_running(&dev);
    std::thread::sleep(RUN);
    let after_inc = dir.0.join("reboot-inc");
    snapshot(&dev, &after_inc, Some(&last));
    let cut = check(&after_inc, base);
    eprintln!("after reboot, incremental: c={} i={}", cut.0, cut.1);
    assert!(
        cut.0 >= restored.0,
        "{cut:?} before the restored {restored:?}"
    );
    std::thread::sleep(RUN);
    let after_full = dir.0.join("reboot-full");
    snapshot(&dev, &after_full, None);
    let cut2 = check(&after_full, base);
    eprintln!("after reboot, full: c={} i={}", cut2.0, cut2.1);
    assert!(cut2.0 > cut.0, "{cut2:?} not after {cut:?}");
    assert!(dev.shutdown().success());

    // A new process restored from a set in the middle of an incremental chain.
    let from = &sets[7];
    let restored = cuts[7];
    let mut dev = boot_in(&dir.0, &cfg, Some(from), &[]);
    let st = dev.ok(json!({"cmd": "status"}));
    assert_eq!(st["restored_from"]["set"], json!(from), "{st}");
    assert_running(&dev);
    std::thread::sleep(RUN);
    let new_inc = dir.0.join("restore-inc");
    snapshot(&dev, &new_inc, Some(from));
    let cut = check(&new_inc, base);
    eprintln!("after restore, incremental: c={} i={}", cut.0, cut.1);
    // (A cold boot would start again from c = 1, far below the restored c.)
    assert!(
        cut.0 >= restored.0,
        "{cut:?} before the restored {restored:?}"
    );
    std::thread::sleep(RUN);
    let new_full = dir.0.join("restore-full");
    snapshot(&dev, &new_full, None);
    let cut2 = check(&new_full, base);
    eprintln!("after restore, full: c={} i={}", cut2.0, cut2.1);
    assert!(cut2.0 > cut.0, "{cut2:?} not after {cut:?}");
    assert!(dev.shutdown().success());
}

/// The pages of a correct cut at `(c, i)` (`i_written`: page `i` already holds `c`).
fn good_pages(n: usize, c: u64, i: usize, i_written: bool) -> Vec<u64> {
    (0..n)
        .map(|p| {
            if p < i || (p == i && i_written) {
                c
            } else {
                c - 1
            }
        })
        .collect()
}

#[test]
fn livecut_checker_rejects_a_torn_cut() {
    let (n, c, i) = (64usize, 7u64, 20usize);
    // Correct cuts: before and after the write of page i; the first pass (zeros ahead);
    // the first and last page being written.
    check_pages(&good_pages(n, c, i, false), c, i as u64).expect("page i not yet written");
    check_pages(&good_pages(n, c, i, true), c, i as u64).expect("page i written");
    check_pages(&good_pages(n, 1, i, false), 1, i as u64).expect("first pass");
    check_pages(&good_pages(n, c, 0, false), c, 0).expect("i = 0");
    check_pages(&good_pages(n, c, n - 1, true), c, (n - 1) as u64).expect("i = N - 1");

    // Memory newer than the registers: a page one pass ahead (c + 1), before and after i.
    for p in [3, i, 40] {
        let mut v = good_pages(n, c, i, false);
        v[p] = c + 1;
        let e = check_pages(&v, c, i as u64).expect_err("c + 1 accepted");
        assert!(e.starts_with(&format!("page {p}: found {}", c + 1)), "{e}");
    }
    // Memory older than the registers: a page two passes behind (c - 2), or one behind
    // before i.
    for (p, val) in [(3, c - 2), (i, c - 2), (40, c - 2), (3, c - 1), (40, c)] {
        let mut v = good_pages(n, c, i, false);
        v[p] = val;
        let e = check_pages(&v, c, i as u64).expect_err("a torn page accepted");
        assert!(e.starts_with(&format!("page {p}: found {val}")), "{e}");
    }
    // The first page that disagrees is the one named.
    let mut v = good_pages(n, c, i, true);
    v[50] = c + 1;
    v[5] = c - 2;
    let e = check_pages(&v, c, i as u64).expect_err("torn");
    assert!(e.starts_with(&format!("page 5: found {}", c - 2)), "{e}");
    assert!(e.contains("c=7, i=20"), "{e}");
    // A position outside the region.
    assert!(check_pages(&good_pages(n, c, i, false), c, n as u64).is_err());
    assert!(check_pages(&good_pages(n, c, i, false), 0, 0).is_err());

    // The loop counter k maps to (c, i), and the wrap is one step.
    assert_eq!(position(0, 64), (1, 0));
    assert_eq!(position(63, 64), (1, 63));
    assert_eq!(position(64, 64), (2, 0));
    assert_eq!(position(7 * 64 + 20, 64), (8, 20));

    // Registers from a state file: kvm-bindings writes kvm_regs as its 144 raw bytes.
    let mut bytes = vec![0u8; 144];
    bytes[14 * 8..15 * 8].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
    bytes[12 * 8..13 * 8].copy_from_slice(&0x20_0000u64.to_le_bytes());
    let state = json!({"vcpus": [{"regs": bytes}]});
    assert_eq!(
        vcpu_reg(&state, 0, "r14").expect("r14"),
        0x1234_5678_9abc_def0
    );
    assert_eq!(vcpu_reg(&state, 0, "r12").expect("r12"), 0x20_0000);
    let named = json!({"vcpus": [{"regs": {"r14": 5}}]});
    assert_eq!(vcpu_reg(&named, 0, "r14").expect("named"), 5);
    assert!(vcpu_reg(&json!({"vcpus": [{"regs": [1, 2]}]}), 0, "r14").is_err());
}
