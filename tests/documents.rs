//! End-to-end: the controller's document service on its disk (`docs/shared-data.md`),
//! driven through `duplex box` on the controller's vsock bridge, on the reference printer
//! (engine + controller with a virtio-blk disk):
//!
//! - put / get / list are byte-exact, and rights are enforced (403 naming the right);
//! - a scan stores the engine's halftone of each page (checked against the print
//!   checksums);
//! - every put `duplex box` reported done survives a SIGKILL of the monitor during a stream
//!   of puts, and a cold boot;
//! - a coordinated snapshot holds the documents of its moment: restored in a new process,
//!   a document put before the cut is there, one put after is not.
//!
//! `kvm_*` tests need /dev/kvm (`scripts/test` skips them by name without).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

/// The printer with a 32 MiB disk on the controller; its bridge socket is `work/ctl.sock`.
fn config(work: &Path) -> Value {
    let mut parts = printer_partitions(&work.join("ctl.sock"));
    parts[1]["memory_mib"] = json!(128);
    parts[1]["disk"] = json!({"file": work.join("ctl.disk"), "size_mib": 32});
    json!({ "partitions": parts })
}

fn boot(work: &TempDir, extra: &[String]) -> Device {
    let file = work.0.join("device.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&config(&work.0)).expect("json"),
    )
    .expect("write config");
    Device::boot_file_with(&file, TempDir::new("docsdev"), extra)
}

/// Runs `duplex box --as <who> <args>`: its JSON, or (exit status, stderr).
fn dbox(work: &Path, who: &str, args: &[&str]) -> Result<Value, (i32, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("box")
        .arg("--vsock")
        .arg(work.join("ctl.sock"))
        .args(["--as", who])
        .args(args)
        .output()
        .expect("run duplex box");
    if out.status.success() {
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "duplex box {args:?} printed no JSON ({e}): {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        Ok(v)
    } else {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        Err((out.status.code().unwrap_or(-1), err))
    }
}

fn ok(work: &Path, who: &str, args: &[&str]) -> Value {
    dbox(work, who, args).unwrap_or_else(|e| panic!("duplex box {args:?} as {who}: {e:?}"))
}

/// Asserts the command fails with exit status 1 and `code` in its error.
fn fails(work: &Path, who: &str, args: &[&str], code: u16) -> String {
    match dbox(work, who, args) {
        Ok(v) => panic!("duplex box {args:?} as {who} succeeded: {v}"),
        Err((status, err)) => {
            assert_eq!(status, 1, "{err}");
            assert!(err.contains(&format!("error {code}")), "want {code}: {err}");
            err
        }
    }
}

/// A document's id and bytes.
type Doc = (String, Vec<u8>);

/// Deterministic bytes.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

/// Writes `data` to a file in `work`; its path.
fn file(work: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = work.join(name);
    std::fs::write(&p, data).expect("write file");
    p
}

/// `duplex box get DOC --out` as `who`: the bytes.
fn get(work: &Path, who: &str, doc: &str) -> Vec<u8> {
    let out = work.join(format!("got-{doc}-{who}"));
    let v = ok(work, who, &["get", doc, "--out", &out.to_string_lossy()]);
    let data = std::fs::read(&out).expect("read the got file");
    assert_eq!(v["bytes"].as_u64(), Some(data.len() as u64), "{v}");
    data
}

fn put(
    work: &Path,
    who: &str,
    box_id: &str,
    name: &str,
    data: &[u8],
) -> Result<String, (i32, String)> {
    let f = file(work, &format!("put-{name}"), data);
    let v = dbox(
        work,
        who,
        &["put", box_id, &f.to_string_lossy(), "--name", name],
    )?;
    Ok(v["stored"]["id"].as_str().expect("doc id").to_owned())
}

/// Sets up accounts alice and bob and alice's box `inbox`.
fn accounts_and_box(work: &Path) {
    ok(
        work,
        "admin",
        &[
            "account",
            "add",
            "alice",
            "--name",
            "Alice",
            "--email",
            "alice@example.com",
            "--verified",
        ],
    );
    ok(work, "admin", &["account", "add", "bob", "--name", "Bob"]);
    ok(
        work,
        "alice",
        &["create", "inbox", "--name", "Alice's inbox"],
    );
}

/// Waits until `duplex box boxes` answers (the controller and its store are up).
fn wait_service(work: &Path) {
    let deadline = Instant::now() + T;
    while dbox(work, "admin", &["boxes"]).is_err() {
        assert!(
            Instant::now() < deadline,
            "the document service never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kvm_put_get_list_are_byte_exact_and_rights_are_enforced() {
    require_kvm();
    let work = TempDir::new("docs-basic");
    let dev = boot(&work, &[]);
    dev.wait_line("controller", "controller: store ready", T);
    let w = &work.0;
    accounts_and_box(w);
    let accounts = ok(w, "admin", &["account", "list"]);
    assert_eq!(accounts["accounts"][0]["id"], "alice", "{accounts}");
    assert_eq!(
        accounts["accounts"][0]["email_verified"], true,
        "{accounts}"
    );
    let docs: Vec<(String, Vec<u8>)> = [1usize, 0, 100_000, (1 << 20) + 17]
        .iter()
        .enumerate()
        .map(|(i, len)| {
            let data = bytes(i as u64, *len);
            let id = put(w, "alice", "inbox", &format!("f{i}.bin"), &data).expect("put");
            (id, data)
        })
        .collect();
    let list = ok(w, "alice", &["list", "inbox"]);
    let listed = list["documents"].as_array().expect("documents");
    assert_eq!(listed.len(), docs.len(), "{list}");
    for ((id, data), entry) in docs.iter().zip(listed) {
        assert_eq!(entry["id"], id.as_str());
        assert_eq!(entry["len"].as_u64(), Some(data.len() as u64));
        assert_eq!(entry["created_by"], "alice");
        assert_eq!(&get(w, "alice", id), data, "document {id}");
    }
    // Bob holds nothing: every operation is refused, naming the right needed.
    let (d0, _) = &docs[0];
    let err = fails(w, "bob", &["get", d0, "--out", "/dev/null"], 403);
    assert!(err.contains("needs read on doc:"), "{err}");
    let f = file(w, "bob.txt", b"bob");
    let err = fails(w, "bob", &["put", "inbox", &f.to_string_lossy()], 403);
    assert!(err.contains("needs write on box:inbox"), "{err}");
    fails(w, "bob", &["list", "inbox"], 403);
    fails(w, "bob", &["account", "add", "eve", "--name", "Eve"], 403);
    fails(w, "mallory", &["boxes"], 403);
    // Read on the box lets him read, not write.
    ok(w, "alice", &["grant", "box:inbox", "read", "bob"]);
    assert_eq!(get(w, "bob", d0), docs[0].1);
    fails(w, "bob", &["rm", d0], 403);
    let g = ok(w, "bob", &["grants", "box:inbox"]);
    assert_eq!(
        g["grants"],
        json!(["box:inbox#owner@user:alice", "box:inbox#read@user:bob"]),
        "{g}"
    );
    ok(w, "alice", &["revoke", "box:inbox", "read", "bob"]);
    fails(w, "bob", &["get", d0, "--out", "/dev/null"], 403);
    // Deleting a document; then it is gone.
    ok(w, "alice", &["rm", d0]);
    fails(w, "alice", &["get", d0, "--out", "/dev/null"], 404);
    assert_eq!(
        ok(w, "alice", &["list", "inbox"])["documents"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    fails(w, "alice", &["create", "inbox"], 409);
}

/// The pages of a multi-image PBM (`P4`): (width, height, bits) each.
fn pbm_pages(mut data: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut pages = Vec::new();
    while !data.is_empty() {
        let text_end = data
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(1)
            .map(|(i, _)| i + 1)
            .expect("a PBM header");
        let header = std::str::from_utf8(&data[..text_end]).expect("ASCII header");
        let mut f = header.split_whitespace();
        assert_eq!(f.next(), Some("P4"), "{header:?}");
        let w: u16 = f.next().and_then(|v| v.parse().ok()).expect("width");
        let h: u16 = f.next().and_then(|v| v.parse().ok()).expect("height");
        let len = usize::from(w).div_ceil(8) * usize::from(h);
        pages.push((w, h, data[text_end..text_end + len].to_vec()));
        data = &data[text_end + len..];
    }
    pages
}

#[test]
fn kvm_a_scan_stores_the_engines_halftone_of_every_page() {
    require_kvm();
    let work = TempDir::new("docs-scan");
    let dev = boot(&work, &[]);
    dev.wait_line("controller", "controller READY", T);
    dev.wait_line("controller", "controller: store ready", T);
    let w = &work.0;
    accounts_and_box(w);
    let args = [
        "scan", "inbox", "--pages", "3", "--seed", "77", "--width", "203", "--height", "120",
        "--name", "scan.pbm",
    ];
    fails(w, "bob", &args, 403);
    let v = ok(w, "alice", &args);
    let id = v["stored"]["id"].as_str().expect("id").to_owned();
    let data = get(w, "alice", &id);
    let pages = pbm_pages(&data);
    assert_eq!(pages.len(), 3);
    for (p, (width, height, bits)) in pages.iter().enumerate() {
        assert_eq!((*width, *height), (203, 120));
        assert_eq!(
            duplex_link::page_checksum(bits),
            duplex_link::expected_page_checksum(77, p as u32, 203, 120),
            "page {p}"
        );
    }
    let listed = ok(w, "alice", &["list", "inbox"]);
    assert_eq!(listed["documents"][0]["name"], "scan.pbm", "{listed}");
}

#[test]
fn kvm_every_acknowledged_put_survives_a_sigkill_of_the_monitor_and_a_cold_boot() {
    require_kvm();
    let work = TempDir::new("docs-kill");
    let mut dev = boot(&work, &[]);
    dev.wait_line("controller", "controller: store ready", T);
    let w = work.0.clone();
    accounts_and_box(&w);
    // A stream of puts, each a `duplex box put`; what it reported done is recorded.
    let acked: Arc<Mutex<Vec<Doc>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, w) = (acked.clone(), stop.clone(), w.clone());
        std::thread::spawn(move || {
            for i in 0u64.. {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let data = bytes(1000 + i, 20_000 + (i as usize * 7919) % 90_000);
                match put(&w, "alice", "inbox", &format!("k{i}"), &data) {
                    Ok(id) => acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((id, data)),
                    Err(_) => return, // the monitor is gone
                }
            }
        })
    };
    let deadline = Instant::now() + T;
    while acked.lock().unwrap_or_else(|p| p.into_inner()).len() < 8 {
        assert!(Instant::now() < deadline, "puts do not get through");
        std::thread::sleep(Duration::from_millis(20));
    }
    dev.kill(); // SIGKILL, in the middle of the stream
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    drop(dev);

    let dev = boot(&work, &[]);
    let line = dev.wait_line("controller", "controller: store ready", T);
    eprintln!(
        "{} puts acknowledged before the kill; after the cold boot: {line}",
        acked.len()
    );
    assert!(!line.contains("documents 0 "), "{line}");
    let listed = ok(&w, "alice", &["list", "inbox"]);
    let ids: Vec<&str> = listed["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    for (id, data) in &acked {
        assert!(
            ids.contains(&id.as_str()),
            "acknowledged {id} is gone: {listed}"
        );
        assert_eq!(&get(&w, "alice", id), data, "document {id}");
    }
    // A put in flight at the kill is there whole or not at all: `get` checks every
    // listed document against its CRC.
    assert!(
        ids.len() <= acked.len() + 1,
        "{} listed, {} acknowledged",
        ids.len(),
        acked.len()
    );
    for id in &ids {
        get(&w, "alice", id);
    }
}

#[test]
fn kvm_a_coordinated_snapshot_holds_the_documents_of_its_moment() {
    require_kvm();
    let work = TempDir::new("docs-snap");
    let mut dev = boot(&work, &[]);
    dev.wait_line("controller", "controller READY", T);
    dev.wait_line("controller", "controller: store ready", T);
    let w = &work.0;
    accounts_and_box(w);
    let before = bytes(1, 150_000);
    let after = bytes(2, 60_000);
    let id_before = put(w, "alice", "inbox", "before", &before).expect("put before");
    let set = w.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    let id_after = put(w, "alice", "inbox", "after", &after).expect("put after");
    assert_eq!(get(w, "alice", &id_after), after);
    assert!(dev.shutdown().success());

    let extra = vec!["--restore".to_string(), set.display().to_string()];
    let mut dev = boot(&work, &extra);
    wait_service(w);
    assert_eq!(get(w, "alice", &id_before), before);
    fails(w, "alice", &["get", &id_after, "--out", "/dev/null"], 404);
    let listed = ok(w, "alice", &["list", "inbox"]);
    assert_eq!(
        listed["documents"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    // The restored service goes on: a new document gets stored and read back.
    let next = bytes(3, 5000);
    let id = put(w, "alice", "inbox", "next", &next).expect("put after the restore");
    assert_eq!(get(w, "alice", &id), next);
    assert!(dev.shutdown().success());
}
