//! `manifest.json`: what a snapshot set holds, how it is sealed with its own CRC-32, and
//! the checks every manifest must pass before any other file of the set is trusted
//! (see `docs/snapshot-format.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sys::PAGE;
use crate::SnapshotError;

/// The newest format version, which this crate writes for a set with a disk image. Version 3
/// added disk images (`PartitionEntry::disk`); version 2 added `device_states` (the
/// monitor's device-wide state, such as the vsock switch, in checksummed files of their own
/// instead of the manifest's `extra`); version 1 sets are refused.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this crate reads, and the one it writes for a set without a
/// disk image (which version 2 describes exactly, so that a monitor of version 2 still
/// restores it).
pub const MIN_FORMAT_VERSION: u32 = 2;
/// The manifest's file name inside a set directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The start of the manifest's last member; its value is the CRC-32 of every byte before it.
const TRAILER_HEAD: &[u8] = b"  \"manifest_crc32\": \"";
/// The end of the file after the 8 hex digits of the CRC.
const TRAILER_TAIL: &[u8] = b"\"\n}\n";
const TRAILER_LEN: usize = TRAILER_HEAD.len() + 8 + TRAILER_TAIL.len();

/// The largest guest RAM of one partition a manifest may describe (1 TiB): a bound on what
/// a crafted manifest can make a reader allocate.
pub const MAX_RAM: u64 = 1 << 40;

/// The largest disk image a manifest may describe (1 TiB), for the same reason.
pub const MAX_DISK: u64 = 1 << 40;

/// The deepest parent chain `open` follows (a guard against cycles and runaway chains).
pub const MAX_CHAIN: usize = 64;

/// The largest `manifest.json` a reader reads (4 MiB): the file is refused, unread, if it
/// is longer. A manifest holds the device config and a few lines per partition and file.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The largest partition state file (`<name>.state`, 16 MiB): vCPU, VM and device states.
pub const MAX_STATE_BYTES: u64 = 16 << 20;

/// The largest device state file (`<component>.devstate`, 256 MiB): the vsock switch's
/// state holds every partition's backlog (up to 16 MiB each, as hex).
pub const MAX_DEVICE_STATE_BYTES: u64 = 256 << 20;

/// The largest pages file: the one of a memory file or disk of [`MAX_RAM`] bytes
/// (16 + 2^28 / 8 bytes, 32 MiB and 16 bytes). Pages files are bounded by the RAM layout
/// and disk length they must match, which are bounded themselves.
pub const MAX_PAGES_BYTES: u64 = 16 + (MAX_RAM / PAGE as u64) / 8;

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] if a partition has a disk image, else [`MIN_FORMAT_VERSION`].
    pub format_version: u32,
    /// 32 lowercase hex digits (16 random bytes), unique per set.
    pub set_id: String,
    /// When the set was committed, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The device config the set was taken from, as the monitor gave it (opaque here).
    pub device_config: Value,
    /// The partitions, in the order they were written.
    pub partitions: Vec<PartitionEntry>,
    /// The parent set, for an incremental set.
    #[serde(default)]
    pub parent: Option<ParentRef>,
    /// Every other file of the set: file name → length and CRC-32.
    pub files: BTreeMap<String, FileEntry>,
    /// Device-wide states that belong to no one partition (e.g. the vsock switch):
    /// component name → its file, `<component>.devstate`, listed in `files`.
    #[serde(default)]
    pub device_states: BTreeMap<String, String>,
    /// Whatever the monitor wants to keep with the set (timings...), opaque here.
    #[serde(default)]
    pub extra: Value,
}

/// One partition of a set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The partition's name (also the stem of its file names).
    pub name: String,
    /// `<name>.mem`: guest RAM, the regions of `ram` concatenated.
    pub memory_file: String,
    /// `<name>.state`: the monitor's opaque vCPU/VM/device state.
    pub state_file: String,
    /// `<name>.pages` (incremental sets only): which pages of the memory file this set holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_file: Option<String>,
    /// Guest RAM regions, in the order they appear in the memory file.
    pub ram: Vec<RamRegion>,
    /// Bytes of page data actually written to the memory file (the rest are holes).
    pub memory_bytes_written: u64,
    /// True if the memory file holds only the pages dirtied since the parent set.
    pub incremental: bool,
    /// The partition's disk image, if it has one (format version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskEntry>,
}

/// A partition's disk image: its blocks as they were at the cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// `<name>.disk`: the disk's 4096-byte blocks at their offsets, sparse (like a memory
    /// file of one region).
    pub file: String,
    /// `<name>.diskpages` (incremental sets only): which blocks of the disk file this set
    /// holds (the pages file format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_file: Option<String>,
    /// The disk's length in bytes (a multiple of 4096), which is also the disk file's.
    pub len: u64,
    /// Bytes of block data written to the disk file (the rest are holes).
    pub bytes_written: u64,
    /// True if the disk file holds only the blocks written since the parent set.
    pub incremental: bool,
}

/// One guest RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    /// Guest-physical start address (page aligned).
    pub gpa: u64,
    /// Length in bytes (a multiple of 4096).
    pub len: u64,
}

/// The parent of an incremental set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's `set_id`; `open` refuses a parent with another id.
    pub set_id: String,
    /// Where the parent is: `../<name>`, a sibling of this set's directory (see
    /// [`parent_dir_name`]).
    pub path: String,
}

/// A file's recorded length and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Length in bytes (the apparent length, holes included).
    pub len: u64,
    /// CRC-32 (IEEE, as crc32fast computes it); for memory files see the format doc.
    pub crc32: u32,
}

impl PartitionEntry {
    /// Total RAM bytes, which is also the memory file's length.
    pub fn memory_len(&self) -> u64 {
        self.ram.iter().map(|r| r.len).sum()
    }

    /// Each region's offset in the memory file, in `ram` order.
    pub fn region_offsets(&self) -> Vec<u64> {
        let mut off = 0;
        self.ram
            .iter()
            .map(|r| {
                let o = off;
                off += r.len;
                o
            })
            .collect()
    }

    /// Every file this partition has in the set.
    pub fn file_names(&self) -> Vec<&str> {
        let mut v = vec![self.memory_file.as_str(), self.state_file.as_str()];
        v.extend(self.pages_file.as_deref());
        if let Some(d) = &self.disk {
            v.push(&d.file);
            v.extend(d.pages_file.as_deref());
        }
        v
    }

    /// The partition's image files (memory file, disk file), whose checksum is the page
    /// CRC; with each its length and its pages file.
    pub fn images(&self) -> Vec<(&str, u64, Option<&str>)> {
        let mut v = vec![(
            self.memory_file.as_str(),
            self.memory_len(),
            self.pages_file.as_deref(),
        )];
        if let Some(d) = &self.disk {
            v.push((d.file.as_str(), d.len, d.pages_file.as_deref()));
        }
        v
    }
}

/// Checks that `name` can be a partition name (it becomes part of file names).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "partition name {name:?} is not 1 to 64 characters of A-Z a-z 0-9 _ - . not starting \
             with a dot"
        ));
    }
    Ok(())
}

fn is_set_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The parent's directory name, from a parent path: `path` must be `../<name>`, where
/// `<name>` is one plain path component (not empty, not `.` or `..`, no `/`, no NUL):
/// parents are siblings of the sets taken on top of them, which is what the writer
/// records. An absolute path or any other `..` is refused, so that a set never names a
/// directory outside its own directory's parent.
pub fn parent_dir_name(path: &str) -> Result<&str, String> {
    let name = path.strip_prefix("../").ok_or_else(|| {
        format!("parent.path {path:?} is not \"../<name>\" (a sibling of the set's directory)")
    })?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(format!(
            "parent.path {path:?}: {name:?} is not one plain directory name"
        ));
    }
    Ok(name)
}

/// Serializes and seals a manifest: pretty JSON whose last member, `manifest_crc32`, holds
/// the CRC-32 of every byte of the file before that member's line, as 8 lowercase hex digits.
pub fn seal(m: &Manifest) -> Result<Vec<u8>, serde_json::Error> {
    let mut v = serde_json::to_vec_pretty(m)?;
    // to_vec_pretty of a non-empty struct ends with "\n}".
    v.truncate(v.len().saturating_sub(2));
    v.extend_from_slice(b",\n");
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(TRAILER_HEAD);
    v.extend_from_slice(format!("{crc:08x}").as_bytes());
    v.extend_from_slice(TRAILER_TAIL);
    Ok(v)
}

/// The stored CRC if `bytes` ends with a well-formed trailer, with the length it covers.
fn trailer(bytes: &[u8]) -> Option<(u32, usize)> {
    let n = bytes.len().checked_sub(TRAILER_LEN)?;
    let t = &bytes[n..];
    if !t.starts_with(TRAILER_HEAD) || !t.ends_with(TRAILER_TAIL) {
        return None;
    }
    let hex = std::str::from_utf8(&t[TRAILER_HEAD.len()..TRAILER_HEAD.len() + 8]).ok()?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(|crc| (crc, n))
}

/// True if `bytes` are a Duplex manifest of some version: they end with a well-formed seal
/// whose CRC matches, and are JSON with a numeric `format_version`. (What a writer may
/// replace or clean up; reading a set needs [`unseal`].)
pub fn is_sealed(bytes: &[u8]) -> bool {
    let Some((stored, n)) = trailer(bytes) else {
        return false;
    };
    crc32fast::hash(&bytes[..n]) == stored
        && serde_json::from_slice::<Value>(bytes)
            .is_ok_and(|v| v.get("format_version").is_some_and(Value::is_u64))
}

/// Reads a manifest from the bytes of `dir/manifest.json`: checks its seal, its version,
/// its fields and their consistency.
pub fn unseal(dir: &Path, bytes: &[u8]) -> Result<Manifest, SnapshotError> {
    let sealed = trailer(bytes);
    if let Some((stored, n)) = sealed {
        let found = crc32fast::hash(&bytes[..n]);
        if found != stored {
            return Err(SnapshotError::Checksum {
                dir: dir.to_path_buf(),
                file: MANIFEST_FILE.to_string(),
                expected: stored,
                found,
            });
        }
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| SnapshotError::manifest(dir, format!("not valid JSON: {e}")))?;
    let version = value
        .get("format_version")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            SnapshotError::manifest(dir, "field format_version is missing or not a number")
        })?;
    if !(u64::from(MIN_FORMAT_VERSION)..=u64::from(FORMAT_VERSION)).contains(&version) {
        return Err(SnapshotError::Version {
            dir: dir.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    if sealed.is_none() {
        return Err(SnapshotError::manifest(
            dir,
            "the closing member \"manifest_crc32\": \"<8 hex digits>\" is missing or malformed \
             (the manifest was edited or cut short)",
        ));
    }
    let m: Manifest =
        serde_json::from_value(value).map_err(|e| SnapshotError::manifest(dir, format!("{e}")))?;
    validate(dir, &m)?;
    Ok(m)
}

/// The length of a pages file for a memory file of `pages` pages.
pub fn pages_file_len(pages: u64) -> u64 {
    crate::memfile::PAGES_HEADER_LEN as u64 + pages.div_ceil(8)
}

/// Checks a manifest's internal consistency (not the files on disk).
pub fn validate(dir: &Path, m: &Manifest) -> Result<(), SnapshotError> {
    let bad = |msg: String| SnapshotError::manifest(dir, msg);
    if !is_set_id(&m.set_id) {
        return Err(bad(format!(
            "field set_id {:?} is not 1 to 64 hex digits",
            m.set_id
        )));
    }
    if m.partitions.is_empty() {
        return Err(bad("field partitions is empty".into()));
    }
    if let Some(p) = &m.parent {
        if !is_set_id(&p.set_id) {
            return Err(bad(format!(
                "field parent.set_id {:?} is not 1 to 64 hex digits",
                p.set_id
            )));
        }
        parent_dir_name(&p.path).map_err(|e| bad(format!("field {e}")))?;
    }
    let mut names = BTreeSet::new();
    let mut listed = BTreeSet::new();
    for p in &m.partitions {
        let at = |msg: String| bad(format!("partition {:?}: {msg}", p.name));
        check_name(&p.name).map_err(|e| bad(format!("partitions: {e}")))?;
        if !names.insert(p.name.as_str()) {
            return Err(at("listed twice".into()));
        }
        let expect = |field: &str, got: &str, want: String| {
            if got != want {
                Err(at(format!("field {field} is {got:?}, must be {want:?}")))
            } else {
                Ok(())
            }
        };
        expect("memory_file", &p.memory_file, format!("{}.mem", p.name))?;
        expect("state_file", &p.state_file, format!("{}.state", p.name))?;
        // An image (memory or disk) holds every page (full set) or those written since the
        // parent, which its pages file names.
        let incremental = |field: &str, inc: bool, pages: &Option<String>, want: String| {
            if inc != m.parent.is_some() {
                return Err(at(format!(
                    "field {field}incremental is {inc} but the set {} a parent",
                    if m.parent.is_some() { "has" } else { "has no" }
                )));
            }
            match (pages, inc) {
                (Some(f), true) => expect(&format!("{field}pages_file"), f, want),
                (None, false) => Ok(()),
                (Some(_), false) => Err(at(format!("a full set has no {field}pages_file"))),
                (None, true) => Err(at(format!("an incremental set needs {field}pages_file"))),
            }
        };
        incremental(
            "",
            p.incremental,
            &p.pages_file,
            format!("{}.pages", p.name),
        )?;
        if let Some(d) = &p.disk {
            if m.format_version < FORMAT_VERSION {
                return Err(at(format!(
                    "field disk needs format_version {FORMAT_VERSION}, the manifest has {}",
                    m.format_version
                )));
            }
            expect("disk.file", &d.file, format!("{}.disk", p.name))?;
            incremental(
                "disk.",
                d.incremental,
                &d.pages_file,
                format!("{}.diskpages", p.name),
            )?;
            if d.len == 0 || d.len % PAGE as u64 != 0 || d.len > MAX_DISK {
                return Err(at(format!(
                    "field disk.len {} is not a positive multiple of {PAGE} of at most {MAX_DISK}",
                    d.len
                )));
            }
            if d.bytes_written > d.len {
                return Err(at(format!(
                    "field disk.bytes_written {} exceeds disk.len {}",
                    d.bytes_written, d.len
                )));
            }
        }
        if p.ram.is_empty() {
            return Err(at("field ram is empty".into()));
        }
        let mut end_prev: Option<u64> = None;
        for (i, r) in p.ram.iter().enumerate() {
            if r.gpa % PAGE as u64 != 0 || r.len % PAGE as u64 != 0 || r.len == 0 {
                return Err(at(format!(
                    "ram[{i}] (gpa {:#x}, len {:#x}) is not page aligned or is empty",
                    r.gpa, r.len
                )));
            }
            let end = r.gpa.checked_add(r.len).ok_or_else(|| {
                at(format!(
                    "ram[{i}] (gpa {:#x}, len {:#x}) overflows",
                    r.gpa, r.len
                ))
            })?;
            if end_prev.is_some_and(|e| r.gpa < e) {
                return Err(at(format!(
                    "ram[{i}] (gpa {:#x}) overlaps or precedes the region before it",
                    r.gpa
                )));
            }
            end_prev = Some(end);
        }
        let mem_len = p.ram.iter().try_fold(0u64, |a, r| a.checked_add(r.len));
        let mem_len = match mem_len {
            Some(l) if l <= MAX_RAM => l,
            _ => {
                return Err(at(format!(
                    "field ram adds up to more than {MAX_RAM} bytes"
                )))
            }
        };
        if p.memory_bytes_written > mem_len {
            return Err(at(format!(
                "field memory_bytes_written {} exceeds the RAM size {mem_len}",
                p.memory_bytes_written
            )));
        }
        for f in p.file_names() {
            let e = m
                .files
                .get(f)
                .ok_or_else(|| at(format!("file {f} is not listed in field files")))?;
            let want = p
                .images()
                .into_iter()
                .enumerate()
                .find_map(|(i, (image, len, pages))| {
                    let what = if i == 0 { "RAM layout" } else { "disk length" };
                    if f == image {
                        Some((len, what))
                    } else if Some(f) == pages {
                        Some((pages_file_len(len / PAGE as u64), what))
                    } else {
                        None
                    }
                });
            if f == p.state_file && e.len > MAX_STATE_BYTES {
                return Err(at(format!(
                    "files[{f:?}].len is {}, over the cap of {MAX_STATE_BYTES} bytes for a \
                     state file",
                    e.len
                )));
            }
            if let Some((want, what)) = want.filter(|(w, _)| *w != e.len) {
                return Err(at(format!(
                    "files[{f:?}].len is {}, must be {want} for this {what}",
                    e.len
                )));
            }
            listed.insert(f);
        }
    }
    for (component, file) in &m.device_states {
        check_name(component).map_err(|e| bad(format!("device_states: {e}")))?;
        let want = format!("{component}.devstate");
        if *file != want {
            return Err(bad(format!(
                "device_states[{component:?}] is {file:?}, must be {want:?}"
            )));
        }
        match m.files.get(file) {
            None => return Err(bad(format!("file {file} is not listed in field files"))),
            Some(e) if e.len > MAX_DEVICE_STATE_BYTES => {
                return Err(bad(format!(
                    "files[{file:?}].len is {}, over the cap of {MAX_DEVICE_STATE_BYTES} bytes \
                     for a device state file",
                    e.len
                )))
            }
            Some(_) => {}
        }
        listed.insert(file);
    }
    if let Some(extra) = m.files.keys().find(|k| !listed.contains(k.as_str())) {
        return Err(bad(format!(
            "field files lists {extra:?}, which no partition uses"
        )));
    }
    Ok(())
}
