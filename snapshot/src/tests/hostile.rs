//! Sets are untrusted input (issue 11): oversized files are refused unread, symbolic links
//! and other non-regular files are refused, a parent must be a sibling, a writer replaces
//! or cleans up only what is a set or its own leftover, and a lazily mapped memory file cut
//! short under its mapping reads as zeros and is reported instead of raising SIGBUS.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;
use crate::manifest::{self, Manifest, MAX_MANIFEST_BYTES, MAX_STATE_BYTES};
use crate::{LoadMode, MemoryGuard, SnapshotError, MANIFEST_FILE, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

/// A full set of one partition with a few data pages at `<t>/set`.
fn one_set(t: &TempDir) -> PathBuf {
    let dest = t.path().join("set");
    let mem = two_regions();
    for p in 0..8 {
        fill(&mem, p * P, 5);
    }
    fill(&mem, HIGH, 6);
    write_full(&dest, &[("engine", &mem, br#"{"v":1}"#)]);
    dest
}

fn manifest_of(dir: &Path) -> Manifest {
    let text = std::fs::read(dir.join(MANIFEST_FILE)).expect("manifest");
    manifest::unseal(dir, &text).expect("unseal")
}

/// Writes `m` sealed as `dir`'s manifest (what a crafted set would hold).
fn reseal(dir: &Path, m: &Manifest) {
    let bytes = manifest::seal(m).expect("seal");
    std::fs::write(dir.join(MANIFEST_FILE), bytes).expect("write manifest");
}

#[test]
fn an_oversized_manifest_is_refused_unread() {
    let t = TempDir::new("h-bigman");
    let dest = one_set(&t);
    let mut m = manifest_of(&dest);
    m.device_config = serde_json::json!({ "pad": "x".repeat(MAX_MANIFEST_BYTES as usize) });
    reseal(&dest, &m);
    let e = SnapshotSet::open(&dest).expect_err("an oversized manifest");
    let msg = e.to_string();
    assert!(
        msg.contains(MANIFEST_FILE) && msg.contains("over the cap"),
        "{msg}"
    );
}

#[test]
fn a_state_file_over_its_cap_is_refused_at_open() {
    let t = TempDir::new("h-bigstate");
    let dest = one_set(&t);
    let mut m = manifest_of(&dest);
    let big = MAX_STATE_BYTES + 1;
    if let Some(f) = m.files.get_mut("engine.state") {
        f.len = big;
    }
    reseal(&dest, &m);
    // Sparse: the file is as long as the manifest says, so only the cap can refuse it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dest.join("engine.state"))
        .expect("open");
    f.set_len(big).expect("grow");
    let e = SnapshotSet::open(&dest).expect_err("a state over its cap");
    let msg = e.to_string();
    assert!(
        msg.contains("engine.state") && msg.contains("over the cap"),
        "{msg}"
    );
}

#[test]
fn symbolic_links_and_other_non_regular_files_are_refused() {
    let t = TempDir::new("h-links");
    let dest = one_set(&t);
    // The state moved elsewhere, a link left in its place: same bytes, same CRC.
    let elsewhere = t.path().join("elsewhere.state");
    std::fs::rename(dest.join("engine.state"), &elsewhere).expect("move");
    std::os::unix::fs::symlink(&elsewhere, dest.join("engine.state")).expect("symlink");
    let e = SnapshotSet::open(&dest).expect_err("a symlinked state file");
    assert!(
        matches!(&e, SnapshotError::Corrupt { file, .. } if file == "engine.state"),
        "{e}"
    );
    assert!(e.to_string().contains("symbolic link"), "{e}");
    std::fs::remove_file(dest.join("engine.state")).expect("rm link");
    std::fs::rename(&elsewhere, dest.join("engine.state")).expect("move back");
    open_ok(&dest).verify().expect("the set itself is fine");

    // The manifest too.
    let real = t.path().join("real-manifest.json");
    std::fs::rename(dest.join(MANIFEST_FILE), &real).expect("move");
    std::os::unix::fs::symlink(&real, dest.join(MANIFEST_FILE)).expect("symlink");
    let e = SnapshotSet::open(&dest).expect_err("a symlinked manifest");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    std::fs::remove_file(dest.join(MANIFEST_FILE)).expect("rm link");
    std::fs::rename(&real, dest.join(MANIFEST_FILE)).expect("move back");

    // A FIFO is refused without blocking on it.
    let mem = dest.join("engine.mem");
    std::fs::remove_file(&mem).expect("rm");
    let c = std::ffi::CString::new(mem.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let e = SnapshotSet::open(&dest).expect_err("a FIFO memory file");
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

/// A base set and an incremental child of it, siblings in `t`.
fn chain(t: &TempDir) -> (PathBuf, PathBuf) {
    let base = t.path().join("base");
    let mem = two_regions();
    fill(&mem, 0, 1);
    write_full(&base, &[("engine", &mem, b"{}")]);
    let child = t.path().join("child");
    let parent = open_ok(&base);
    let mut w = SetWriter::create(&child, Some(&parent)).expect("create");
    let dirty = vec![vec![1u64; 1024 / 64], vec![0u64; 512 / 64]];
    w.write_memory("engine", &mem, Some(&dirty)).expect("write");
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::Value::Null, serde_json::Value::Null)
        .expect("commit");
    (base, child)
}

#[test]
fn a_parent_path_must_name_a_sibling() {
    let t = TempDir::new("h-parent");
    let (base, child) = chain(&t);
    let m = manifest_of(&child);
    assert_eq!(m.parent.as_ref().map(|p| p.path.as_str()), Some("../base"));
    open_ok(&child).verify().expect("a sibling parent is fine");
    let dir_name = t.path().file_name().and_then(|n| n.to_str()).expect("name");
    let absolute = base.display().to_string();
    let up_and_back = format!("../../{dir_name}/base");
    for bad in [
        absolute.as_str(),
        up_and_back.as_str(),
        "../x/../base",
        "..",
        "../",
    ] {
        let mut m = m.clone();
        if let Some(p) = m.parent.as_mut() {
            p.path = bad.to_string();
        }
        reseal(&child, &m);
        let e = SnapshotSet::open(&child).expect_err(bad);
        assert!(
            matches!(e, SnapshotError::Manifest { .. }) && e.to_string().contains("parent.path"),
            "{bad}: {e}"
        );
    }
    // A sibling that is a symbolic link to the parent leads out of the directory.
    std::os::unix::fs::symlink(&base, t.path().join("link")).expect("symlink");
    let mut m = m.clone();
    if let Some(p) = m.parent.as_mut() {
        p.path = "../link".into();
    }
    reseal(&child, &m);
    let e = SnapshotSet::open(&child).expect_err("a symlinked parent");
    assert!(e.to_string().contains("symbolic link"), "{e}");
}

#[test]
fn the_writer_refuses_a_parent_that_is_not_a_sibling() {
    let t = TempDir::new("h-wparent");
    let base = t.path().join("a").join("base");
    let mem = two_regions();
    fill(&mem, 0, 1);
    write_full(&base, &[("engine", &mem, b"{}")]);
    let parent = open_ok(&base);
    let e = SetWriter::create(&t.path().join("b").join("child"), Some(&parent))
        .map(|_| ())
        .expect_err("a parent in another directory");
    assert!(
        matches!(e, SnapshotError::Usage { .. }) && e.to_string().contains("sibling"),
        "{e}"
    );
}

#[test]
fn a_directory_that_only_holds_a_manifest_json_is_never_replaced() {
    let t = TempDir::new("h-foreign");
    let real = one_set(&t);
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).expect("mkdir");
    std::fs::write(dest.join("precious"), b"keep me").expect("write");
    // Not a manifest at all, then one that is not sealed, then a link to a real one.
    let unsealed = String::from_utf8(std::fs::read(real.join(MANIFEST_FILE)).expect("read"))
        .expect("utf-8")
        .replace("\"manifest_crc32\"", "\"crc\"");
    for (what, content) in [
        ("json", "{\"format_version\": 2}\n"),
        ("unsealed", &unsealed),
    ] {
        std::fs::write(dest.join(MANIFEST_FILE), content).expect("write");
        let e = SetWriter::create(&dest, None).map(|_| ()).expect_err(what);
        assert!(matches!(e, SnapshotError::Usage { .. }), "{what}: {e}");
    }
    std::fs::remove_file(dest.join(MANIFEST_FILE)).expect("rm");
    std::os::unix::fs::symlink(real.join(MANIFEST_FILE), dest.join(MANIFEST_FILE))
        .expect("symlink");
    let e = SetWriter::create(&dest, None)
        .map(|_| ())
        .expect_err("a linked manifest");
    assert!(matches!(e, SnapshotError::Usage { .. }), "{e}");
    assert_eq!(
        std::fs::read(dest.join("precious")).expect("kept"),
        b"keep me"
    );
}

#[test]
fn only_a_writers_leftovers_are_cleaned_up() {
    let t = TempDir::new("h-stale");
    let dest = one_set(&t);
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("precious"), b"keep").expect("write");
    let foreign = ["set.tmp-mine", "set.old-mine"];
    for name in foreign {
        let d = t.path().join(name);
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("precious"), b"keep").expect("write");
        // Even with a file of the manifest's name in it.
        std::fs::write(d.join(MANIFEST_FILE), b"{}").expect("write");
    }
    std::os::unix::fs::symlink(&outside, t.path().join("set.tmp-link")).expect("symlink");
    std::os::unix::fs::symlink(&outside, t.path().join("set.old-link")).expect("symlink");
    // Two more sets at `set`: each writer cleans up beside it.
    let mem = two_regions();
    fill(&mem, 0, 9);
    write_full(&dest, &[("engine", &mem, b"{}")]);
    write_full(&dest, &[("engine", &mem, b"{}")]);
    for name in foreign {
        assert_eq!(
            std::fs::read(t.path().join(name).join("precious")).expect(name),
            b"keep"
        );
    }
    for name in ["set.tmp-link", "set.old-link"] {
        assert!(
            std::fs::symlink_metadata(t.path().join(name)).is_ok(),
            "{name} was removed"
        );
    }
    assert_eq!(
        std::fs::read(outside.join("precious")).expect("kept"),
        b"keep"
    );
}

/// A set whose engine memory has data on pages 0..8, loaded lazily, with its memory file.
fn lazy(t: &TempDir) -> (GuestMemoryMmap, PathBuf) {
    let dest = one_set(t);
    let mem = open_ok(&dest)
        .load_memory("engine", LoadMode::Lazy)
        .expect("lazy load");
    (mem, dest.join("engine.mem"))
}

fn truncate(file: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

#[test]
fn a_memory_file_truncated_under_a_guarded_mapping_reads_zeros_and_is_reported() {
    let t = TempDir::new("h-sigbus");
    let (mem, file) = lazy(&t);
    let called = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let seen = called.clone();
    let guard = MemoryGuard::for_memory(
        &mem,
        Some(Box::new(move || {
            seen.store(true, Ordering::SeqCst);
            let _ = tx.send(());
        })),
    )
    .expect("guard");
    assert!(!guard.is_empty() && !guard.truncated());
    // Page 0 is read (in the page cache and mapped) before the cut; page 5 is not.
    let mut page = vec![0u8; PAGE_SIZE];
    mem.read_slice(&mut page, GuestAddress(0)).expect("read");
    assert_eq!(page, pattern(0, 5));
    truncate(&file, 0);
    // Without the guard this read raises SIGBUS and ends the process.
    mem.read_slice(&mut page, GuestAddress(5 * P))
        .expect("read after the cut");
    assert!(page.iter().all(|&b| b == 0), "a cut page reads as zeros");
    assert!(guard.truncated());
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("the callback runs");
    assert!(called.load(Ordering::SeqCst));
    assert!(crate::guard::faults_caught() >= 1);
    assert!(crate::guard::truncated_file(&mem).is_some_and(|w| w.contains("0 bytes")));
}

#[test]
fn a_snapshot_of_a_guest_whose_memory_file_was_truncated_is_refused() {
    let t = TempDir::new("h-rewrite");
    let (mem, file) = lazy(&t);
    truncate(&file, 4 * P);
    let mut w = SetWriter::create(&t.path().join("next"), None).expect("create");
    let e = w
        .write_memory("engine", &mem, None)
        .expect_err("a truncated memory file");
    assert!(e.to_string().contains("memory file"), "{e}");
}

#[test]
fn a_file_truncated_while_it_is_verified_is_reported() {
    let t = TempDir::new("h-verify");
    let dest = one_set(&t);
    let path = dest.join("engine.mem");
    let f = std::fs::File::open(&path).expect("open");
    let len = f.metadata().expect("stat").len();
    let map = crate::sys::FileMap::new(&f, len).expect("map");
    assert_eq!(map.slice(0, P), pattern(0, 5).as_slice());
    truncate(&path, 0);
    // Without the guard this read raises SIGBUS.
    assert!(map.slice(P, 2 * P).iter().all(|&b| b == 0));
    assert!(map.truncated());
}
