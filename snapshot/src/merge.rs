//! `merge` (flatten an incremental chain into one full set) and `inspect` (a JSON summary
//! of a set for people and tools).

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde_json::{json, Value};

use crate::{LoadMode, SetWriter, SnapshotError, SnapshotSet};

/// Flattens the chain ending at `child` into a full set at `dest` (committed atomically like
/// [`SetWriter::commit`]; `dest` may be `child` itself). Every checksum of the chain is
/// verified first. The new set keeps the child's device config, partition and device
/// states, and `extra`; disks are flattened like memory.
pub fn merge(child: &Path, dest: &Path) -> Result<(), SnapshotError> {
    let set = SnapshotSet::open(child)?;
    set.verify()?;
    let mut w = SetWriter::create(dest, None)?;
    for p in &set.manifest.partitions {
        let mem = set.load_memory(&p.name, LoadMode::Eager)?;
        w.write_memory(&p.name, &mem, None)?;
        drop(mem);
        if let Some(d) = &p.disk {
            // The composed disk goes through an unlinked file in the new set's directory.
            let path = w.temp_dir().join(format!("{}.disk.merging", p.name));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| SnapshotError::io(&path, "creating", e))?;
            std::fs::remove_file(&path).map_err(|e| SnapshotError::io(&path, "removing", e))?;
            set.restore_disk_into(&p.name, &file, false)?;
            w.write_disk(&p.name, &file, d.len, None)?;
        }
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
/// ids, chain, per-partition RAM layout and disk image, sizes on disk, files, device config
/// and extra.
pub fn inspect(dir: &Path) -> Result<Value, SnapshotError> {
    let set = SnapshotSet::open(dir)?;
    let m = &set.manifest;
    let mut partitions = Vec::new();
    let mut total_disk = 0u64;
    for p in &m.partitions {
        let mem_disk = disk_bytes(&set.dir.join(&p.memory_file));
        let present = set.present_pages(&p.name)?.map(|b| b.count());
        let state_bytes = m.files.get(&p.state_file).map_or(0, |f| f.len);
        let disk = match &p.disk {
            None => Value::Null,
            Some(d) => json!({
                "file": d.file,
                "len": d.len,
                "incremental": d.incremental,
                "bytes_written": d.bytes_written,
                "disk_bytes": disk_bytes(&set.dir.join(&d.file)),
                "blocks_present": set.present_disk_blocks(&p.name)?.map(|b| b.count()),
            }),
        };
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
            "disk": disk,
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
