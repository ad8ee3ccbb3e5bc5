//! Snapshot sets as untrusted input: the manifest parser ([`check_manifest`]) and whole set
//! directories ([`check_set`]) opened, verified and read through the public API of
//! `duplex_snapshot` as a restore does, plus the device config a set carries, read as the
//! monitor does (`check_config`).
//!
//! A fuzzer cannot forge a CRC-32, so the harness can seal for it: the manifest's seal, and
//! (for sets) each listed file's length and checksum, are made right when the input asks,
//! which lets inputs reach the checks behind the seals.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use duplex_snapshot::manifest::{seal, unseal, validate, MAX_RAM};
use duplex_snapshot::{LoadMode, SnapshotSet, MANIFEST_FILE, PAGE_SIZE};
use duplex_vmm::config::DeviceConfig;
use duplex_vmm::monitor::restore::{check_cids, check_config, check_layout};
use serde_json::Value;

use crate::input::Input;

/// The device config a fuzzed set is checked against (two partitions, as the reference
/// device's engine and controller).
pub const CONFIG: &str = r#"{
  "device": "fuzz",
  "partitions": [
    {"name": "engine", "role": "engine", "kernel": "/nonexistent/engine", "memory_mib": 16,
     "vcpus": 1, "vsock": {"cid": 3}},
    {"name": "controller", "role": "controller", "kernel": "/nonexistent/controller",
     "memory_mib": 16, "vcpus": 1, "vsock": {"cid": 4},
     "disk": {"file": "/nonexistent/disk", "size_mib": 1}}
  ]
}"#;

/// Files of a set the harness writes larger than this are not padded to a manifest's
/// length: a fuzzed set stays small.
pub const MAX_FILE: u64 = 1 << 20;

/// The names a set's files may have in a fuzzed set directory (index = the input's file
/// byte modulo their number; the parent set's files have the same names in the sibling
/// directory `../parent`).
pub const FILE_NAMES: [&str; 10] = [
    MANIFEST_FILE,
    "engine.state",
    "engine.mem",
    "engine.pages",
    "controller.state",
    "controller.mem",
    "controller.disk",
    "controller.diskpages",
    "vsock.devstate",
    "controller.pages",
];

/// [`CONFIG`], parsed once.
pub fn config() -> &'static DeviceConfig {
    static CONFIG_ONCE: OnceLock<DeviceConfig> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| {
        DeviceConfig::parse(CONFIG, Path::new("/nonexistent/fuzz.json")).expect("the config")
    })
}

/// `body` (a JSON object) sealed as `manifest.json` is: its closing brace replaced by a last
/// member `manifest_crc32` holding the CRC-32 of every byte before that member.
pub fn reseal(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    if v.last() == Some(&b'}') {
        v.pop();
    }
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v.extend_from_slice(b",\n");
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(format!("  \"manifest_crc32\": \"{crc:08x}\"\n}}\n").as_bytes());
    v
}

/// The first byte picks the mode (bit 0: the harness seals the rest); the rest is the
/// manifest. Checks: an accepted manifest is valid, seals and unseals back to itself, and
/// describes bounded RAM; its device config is checked against [`CONFIG`] without a panic.
pub fn check_manifest(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let body = input.rest();
    let bytes = if mode & 1 == 1 {
        reseal(body)
    } else {
        body.to_vec()
    };
    let dir = Path::new("/nonexistent/set");
    let Ok(m) = unseal(dir, &bytes) else {
        return;
    };
    if let Err(e) = validate(dir, &m) {
        panic!("unseal accepted a manifest that validate refuses: {e}");
    }
    let sealed = match seal(&m) {
        Ok(s) => s,
        Err(e) => panic!("an accepted manifest does not seal: {e}"),
    };
    match unseal(dir, &sealed) {
        Ok(again) => assert_eq!(again, m, "seal then unseal changed the manifest"),
        Err(e) => panic!("a sealed manifest does not unseal: {e}"),
    }
    for p in &m.partitions {
        assert!(p.memory_len() <= MAX_RAM, "partition {} RAM", p.name);
        let offsets = p.region_offsets();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "region offsets");
    }
    let _ = check_config(dir, &m.device_config, config());
    if check_layout(dir, &m, config()).is_ok() {
        for p in &config().partitions {
            let entry = m.partitions.iter().find(|e| e.name == p.name);
            assert_eq!(
                entry.map(|e| e.memory_len()),
                Some(p.memory_mib << 20),
                "check_layout accepted partition {} with other RAM than the config's",
                p.name
            );
        }
    }
}

/// A fresh, empty directory for this thread's fuzzed sets (in memory where possible), with
/// an empty sibling `parent`.
fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ROOT: PathBuf = {
            let base = if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            base.join(format!("duplex-fuzz-set-{}-{n}", std::process::id()))
        };
    }
    let root = ROOT.with(PathBuf::clone);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("parent")).expect("the scratch directory");
    fs::create_dir_all(root.join("set")).expect("the scratch directory");
    root.join("set")
}

/// The CRC of a memory or disk file as the set format defines it for a file of at most
/// 1 MiB (one CRC chunk): its non-zero pages, each preceded by its offset (LE u64).
fn page_crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            h.update(&((i * PAGE_SIZE) as u64).to_le_bytes());
            h.update(page);
        }
    }
    h.finalize()
}

/// Makes the manifest in `dir` right for the files there: each listed file of at most
/// [`MAX_FILE`] bytes is given the listed length (padded with zeros or cut) and its
/// checksum is written into the manifest, which is then sealed.
fn fix_up(dir: &Path) {
    let Ok(text) = fs::read(dir.join(MANIFEST_FILE)) else {
        return;
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&text) else {
        return;
    };
    if let Some(obj) = value.as_object_mut() {
        obj.remove("manifest_crc32");
    }
    if let Some(files) = value.get_mut("files").and_then(Value::as_object_mut) {
        for (name, entry) in files.iter_mut() {
            let Some(len) = entry.get("len").and_then(Value::as_u64) else {
                continue;
            };
            if len > MAX_FILE || name.contains('/') || name.starts_with('.') {
                continue;
            }
            let path = dir.join(name);
            let mut bytes = fs::read(&path).unwrap_or_default();
            bytes.resize(len as usize, 0);
            if fs::write(&path, &bytes).is_err() {
                continue;
            }
            let image = name.ends_with(".mem") || name.ends_with(".disk");
            let crc = if image {
                page_crc(&bytes)
            } else {
                crc32fast::hash(&bytes)
            };
            entry["crc32"] = Value::from(crc);
        }
    }
    if let Ok(body) = serde_json::to_vec_pretty(&value) {
        let _ = fs::write(dir.join(MANIFEST_FILE), reseal(&body));
    }
}

/// Writes the set the input describes, then opens, verifies and reads it as a restore does.
///
/// Input: a flags byte (bit 0: fix up the set's manifest, bit 1: the parent's), then
/// entries of a file byte (bit 7: in `../parent`; the rest picks a name of [`FILE_NAMES`]) and
/// length-prefixed contents. Checks: nothing panics; an opened set's partitions have the RAM
/// the manifest says, and memory loaded from a verified set has exactly that size. Returns
/// how far the set got (the seed tests check that the seeds get all the way).
pub fn check_set(data: &[u8]) -> SetOutcome {
    let mut outcome = SetOutcome::default();
    let dir = scratch();
    let mut input = Input::new(data);
    let flags = input.u8();
    while !input.is_empty() {
        let file = input.u8();
        let contents = input.chunk();
        let name = FILE_NAMES[usize::from(file & 0x7f) % FILE_NAMES.len()];
        let path = if file & 0x80 != 0 {
            dir.join("../parent").join(name)
        } else {
            dir.join(name)
        };
        let _ = fs::write(path, contents);
    }
    if flags & 2 != 0 {
        fix_up(&dir.join("../parent"));
    }
    if flags & 1 != 0 {
        fix_up(&dir);
    }
    let Ok(set) = SnapshotSet::open(&dir) else {
        return outcome;
    };
    outcome.chain = set.chain().len();
    let _ = check_config(&dir, &set.manifest.device_config, config());
    let _ = check_layout(&dir, &set.manifest, config());
    if let Ok(Some(bytes)) = set.read_device_state("vsock") {
        if let Ok(state) = serde_json::from_slice(&bytes) {
            let _ = check_cids(&dir, &state, config());
        }
    }
    let verified = set.verify().is_ok();
    outcome.verified = verified;
    for p in &set.manifest.partitions {
        let _ = set.read_state(&p.name);
        if !verified {
            continue;
        }
        if let Ok(mem) = set.load_memory(&p.name, LoadMode::Eager) {
            use vm_memory::GuestMemoryBackend;
            let size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
            assert_eq!(size, p.memory_len(), "partition {}: loaded RAM", p.name);
            outcome.loaded += 1;
        }
        if set.disk(&p.name).is_some() {
            if let Ok(dest) = tempfile_in(&dir) {
                let _ = set.restore_disk(&p.name, &dest);
            }
        }
    }
    outcome
}

/// How far a fuzzed set got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOutcome {
    /// Sets in the opened chain (0: `open` refused it).
    pub chain: usize,
    /// Whether `verify` passed.
    pub verified: bool,
    /// Partitions whose memory was loaded.
    pub loaded: usize,
}

/// An anonymous file in `dir` to restore a disk into.
fn tempfile_in(dir: &Path) -> std::io::Result<fs::File> {
    let path = dir.join("restored.disk.tmp");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    fs::remove_file(&path)?;
    Ok(f)
}
