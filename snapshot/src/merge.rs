//! `merge` (flatten an incremental chain into one full set) and `inspect` (a JSON summary
//! of a set for people and tools).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::{json, Value};

use crate::{LoadMode, SetWriter, SnapshotError, SnapshotSet};

/// Flattens the chain ending at `child` into a full set at `dest` (committed atomically like
/// [`SetWriter::commit`]; `dest` may be `child` itself). Every checksum of the chain is
/// verified first. The new set keeps the child's device config, partition and device
/// states, and `extra`.
pub fn merge(child: &Path, dest: &Path) -> Result<(), SnapshotError> {
    let set = SnapshotSet::open(child)?;
    set.verify()?;
    let mut w = SetWriter::create(dest, None)?;
    for p in &set.manifest.partitions {
        let mem = set.load_memory(&p.name, LoadMode::Eager)?;
        w.write_memory(&p.name, &mem, None)?;
        drop(mem);
        w.write_state(&p.name, &set.read_state(&p.name)?)?;
    }
    for component in set.manifest.device_states.keys() {
        if let Some(state) = set.read_device_state(component)? {
            w.write_device_state(component, &state)?;
        }
    }
    w.commit(
        set.manifest.device_config.clone(),
        set.manifest.extra.clone(),
    )?;
    Ok(())
}

/// Bytes a file really occupies on disk (its allocated blocks), 0 if it cannot be told.
fn disk_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// A JSON summary of the set at `dir` (opened and validated, checksums not verified):
/// ids, chain, per-partition RAM layout, sizes on disk, files, device config and extra.
pub fn inspect(dir: &Path) -> Result<Value, SnapshotError> {
    let set = SnapshotSet::open(dir)?;
    let m = &set.manifest;
    let mut partitions = Vec::new();
    let mut total_disk = 0u64;
    for p in &m.partitions {
        let mem_disk = disk_bytes(&set.dir.join(&p.memory_file));
        let present = set.present_pages(&p.name)?.map(|b| b.count());
        let state_bytes = m.files.get(&p.state_file).map_or(0, |f| f.len);
        partitions.push(json!({
            "name": p.name,
            "ram": p.ram.iter().map(|r| json!({
                "gpa": format!("{:#x}", r.gpa),
                "len": r.len,
            })).collect::<Vec<_>>(),
            "ram_bytes": p.memory_len(),
            "incremental": p.incremental,
            "memory_file": p.memory_file,
            "memory_bytes_written": p.memory_bytes_written,
            "memory_disk_bytes": mem_disk,
            "pages_present": present,
            "state_bytes": state_bytes,
        }));
    }
    for f in m.files.keys() {
        total_disk += disk_bytes(&set.dir.join(f));
    }
    let chain: Vec<Value> = set
        .chain()
        .iter()
        .map(|s| {
            json!({
                "dir": s.dir.display().to_string(),
                "set_id": s.manifest.set_id,
                "incremental": s.manifest.parent.is_some(),
            })
        })
        .collect();
    Ok(json!({
        "dir": set.dir.display().to_string(),
        "format_version": m.format_version,
        "set_id": m.set_id,
        "created_unix_ms": m.created_unix_ms,
        "device_states": m.device_states,
        "incremental": m.parent.is_some(),
        "parent": m.parent,
        "chain": chain,
        "partitions": partitions,
        "files": m.files,
        "disk_bytes": total_disk,
        "device_config": m.device_config,
        "extra": m.extra,
    }))
}
