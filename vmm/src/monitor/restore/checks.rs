//! What a set must agree on with the device it is restored into, checked before anything
//! is built or replaced: the device config it was taken from, each partition's RAM layout
//! (the one the config's partition is built with, never over the MMIO window), the CIDs the
//! vsock switch's saved state names; and `snapshot.root`, which confines where sets are
//! written and read from (see `docs/snapshot-format.md`, "Untrusted sets").

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use duplex_devices::vsock::SwitchState;
use duplex_snapshot::{Manifest, RamRegion};

use super::super::snapshot::SnapshotFailure;
use crate::config::DeviceConfig;
use crate::layout;

/// The host's vsock CID: a connection may have it as one side.
const HOST_CID: u64 = 2;

fn invalid(dir: &Path, reason: String) -> SnapshotFailure {
    SnapshotFailure::Invalid {
        dir: dir.to_owned(),
        reason,
    }
}

/// Compares what a set was taken from with the device config it is restored into.
pub fn check_config(
    dir: &Path,
    saved: &Value,
    config: &DeviceConfig,
) -> Result<(), SnapshotFailure> {
    let invalid = |reason: String| SnapshotFailure::Invalid {
        dir: dir.to_owned(),
        reason,
    };
    let saved: DeviceConfig = serde_json::from_value(saved.clone())
        .map_err(|e| invalid(format!("its device config cannot be read: {e}")))?;
    for p in &config.partitions {
        let Some(s) = saved.partitions.iter().find(|s| s.name == p.name) else {
            return Err(invalid(format!(
                "partition {} is missing from the set",
                p.name
            )));
        };
        if s.memory_mib != p.memory_mib {
            return Err(invalid(format!(
                "partition {}: memory_mib is {} in the config but {} in the set",
                p.name, p.memory_mib, s.memory_mib
            )));
        }
        if s.vcpus != p.vcpus {
            return Err(invalid(format!(
                "partition {}: vcpus is {} in the config but {} in the set",
                p.name, p.vcpus, s.vcpus
            )));
        }
        if s.vsock.as_ref().map(|v| v.cid) != p.vsock.as_ref().map(|v| v.cid) {
            return Err(invalid(format!(
                "partition {}: its vsock cid differs between the config and the set",
                p.name
            )));
        }
        match (&s.net, &p.net) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(invalid(format!(
                    "partition {}: the set has a network card, the config none",
                    p.name
                )))
            }
            (None, Some(_)) => {
                return Err(invalid(format!(
                    "partition {}: the config has a network card, the set none",
                    p.name
                )))
            }
            // The guest knows its MAC; the TAP may be another one.
            (Some(a), Some(b)) if a.mac_bytes() != b.mac_bytes() => {
                return Err(invalid(format!(
                    "partition {}: net.mac is {} in the config but {} in the set",
                    p.name, b.mac, a.mac
                )))
            }
            (Some(_), Some(_)) => {}
        }
        match (&s.disk, &p.disk) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(invalid(format!(
                    "partition {}: the set has a disk, the config none",
                    p.name
                )))
            }
            (None, Some(_)) => {
                return Err(invalid(format!(
                    "partition {}: the config has a disk, the set none",
                    p.name
                )))
            }
            // The guest knows its disk's size; the backing file may be another one.
            (Some(a), Some(b)) if a.size_mib != b.size_mib => {
                return Err(invalid(format!(
                    "partition {}: disk.size_mib is {} in the config but {} in the set",
                    p.name, b.size_mib, a.size_mib
                )))
            }
            (Some(_), Some(_)) => {}
        }
    }
    if let Some(extra) = saved
        .partitions
        .iter()
        .find(|s| config.partitions.iter().all(|p| p.name != s.name))
    {
        return Err(invalid(format!(
            "the set has partition {} that the config does not",
            extra.name
        )));
    }
    Ok(())
}

/// The set's RAM layout per partition must be the one the config's partition is built with
/// (`layout::ram_ranges` of its `memory_mib`): same total, same regions, so no region lies
/// over the MMIO window and no partition gets more RAM than configured; and the set may
/// hold no partition the config does not have. The set's `device_config` is not trusted for
/// this (a crafted set can say one size there and map another).
pub fn check_layout(
    dir: &Path,
    manifest: &Manifest,
    config: &DeviceConfig,
) -> Result<(), SnapshotFailure> {
    let human = |ram: &[RamRegion]| {
        ram.iter()
            .map(|r| format!("{:#x}+{:#x}", r.gpa, r.len))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for p in &config.partitions {
        let Some(entry) = manifest.partitions.iter().find(|e| e.name == p.name) else {
            return Err(invalid(
                dir,
                format!("partition {} has no memory in the set", p.name),
            ));
        };
        let want: Vec<RamRegion> = layout::ram_ranges(p.memory_mib << 20)
            .into_iter()
            .map(|(gpa, len)| RamRegion { gpa, len })
            .collect();
        if entry.ram != want {
            return Err(invalid(
                dir,
                format!(
                    "partition {}: the set's RAM is {} bytes ({}), the config's is {} bytes \
                     ({}, memory_mib {}): a set must have the RAM layout of the config",
                    p.name,
                    entry.memory_len(),
                    human(&entry.ram),
                    p.memory_mib << 20,
                    human(&want),
                    p.memory_mib
                ),
            ));
        }
    }
    if let Some(extra) = manifest
        .partitions
        .iter()
        .find(|e| config.partition(&e.name).is_none())
    {
        return Err(invalid(
            dir,
            format!(
                "the set has memory for partition {}, which the config does not have",
                extra.name
            ),
        ));
    }
    Ok(())
}

/// The vsock switch's saved state may name only the configured partitions' CIDs (and the
/// host, CID 2, as a side of a connection): every backlog, every queued packet's source
/// and destination, every connection's sides.
pub fn check_cids(
    dir: &Path,
    state: &SwitchState,
    config: &DeviceConfig,
) -> Result<(), SnapshotFailure> {
    let guests: Vec<u64> = config
        .partitions
        .iter()
        .filter_map(|p| p.vsock.as_ref().map(|v| v.cid))
        .collect();
    let known = |cid: u64| cid == HOST_CID || guests.contains(&cid);
    let refuse = |what: String, cid: u64| {
        invalid(
            dir,
            format!(
                "vsock switch state: {what} names CID {cid}, which no partition of the config \
                 has (configured: {guests:?}, and the host, 2)"
            ),
        )
    };
    for (&cid, backlog) in &state.backlogs {
        if !guests.contains(&cid) {
            return Err(refuse("a backlog".into(), cid));
        }
        for p in &backlog.packets {
            for c in [p.hdr.src_cid, p.hdr.dst_cid] {
                if !known(c) {
                    return Err(refuse(format!("a packet queued for CID {cid}"), c));
                }
            }
        }
    }
    for c in state.conns.values() {
        for side in [c.client, c.server] {
            if !known(side.cid) {
                return Err(refuse(
                    format!("connection {} -> {}", c.client, c.server),
                    side.cid,
                ));
            }
        }
    }
    Ok(())
}

/// Where `path` really is: the longest part of it that exists, canonicalized (symbolic
/// links resolved), followed by the rest, which must be plain names (no `..`).
fn resolve(path: &Path) -> Result<PathBuf, String> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("the current directory: {e}"))?
            .join(path)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(canon) => {
                let mut out = canon;
                for c in rest.iter().rev() {
                    out.push(c);
                }
                return Ok(out);
            }
            Err(_) => {
                let name = existing.file_name().ok_or_else(|| {
                    format!("{} has no existing directory above it", path.display())
                })?;
                if existing
                    .components()
                    .next_back()
                    .is_some_and(|c| !matches!(c, Component::Normal(_)))
                {
                    return Err(format!("{} has a .. in its missing part", path.display()));
                }
                rest.push(name.to_owned());
                existing = existing.parent().ok_or_else(|| {
                    format!("{} has no existing directory above it", path.display())
                })?;
            }
        }
    }
}

/// With `snapshot.root` set, a set's directory must lie strictly inside it once resolved
/// (symbolic links and `..` followed), so that the set, its temporary and moved-aside
/// siblings and its parents are all under the root. Returns the resolved path.
pub fn confine(path: &Path, root: Option<&Path>) -> Result<PathBuf, SnapshotFailure> {
    let Some(root) = root else {
        return Ok(path.to_path_buf());
    };
    let outside = |why: String| {
        invalid(
            path,
            format!(
                "{} is not inside snapshot.root {}: {why}",
                path.display(),
                root.display()
            ),
        )
    };
    let croot = std::fs::canonicalize(root)
        .map_err(|e| outside(format!("the root cannot be resolved: {e}")))?;
    let resolved = resolve(path).map_err(outside)?;
    if resolved == croot || !resolved.starts_with(&croot) {
        return Err(outside(format!("it resolves to {}", resolved.display())));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(net: &str) -> DeviceConfig {
        let text = format!(
            r#"{{"partitions": [{{"name": "relay", "role": "relay", "kernel": "k",
                "memory_mib": 16{net}}}]}}"#
        );
        DeviceConfig::parse(&text, Path::new("device.json")).expect("config")
    }

    #[test]
    fn a_set_and_a_config_must_agree_on_the_network_card() {
        let card = r#", "net": {"tap": "dplx0", "mac": "52:54:00:12:34:56"}"#;
        let other_tap = r#", "net": {"tap": "dplx9", "mac": "52:54:00:12:34:56"}"#;
        let other_mac = r#", "net": {"tap": "dplx0", "mac": "52:54:00:12:34:57"}"#;
        let dir = Path::new("/set");
        let saved = |net: &str| serde_json::to_value(config(net)).expect("json");
        assert!(check_config(dir, &saved(card), &config(card)).is_ok());
        assert!(check_config(dir, &saved(card), &config(other_tap)).is_ok());
        assert!(check_config(dir, &saved(""), &config("")).is_ok());
        for (set, cfg, words) in [
            (card, "", "the set has a network card, the config none"),
            ("", card, "the config has a network card, the set none"),
            (
                card,
                other_mac,
                "net.mac is 52:54:00:12:34:57 in the config",
            ),
        ] {
            let err = check_config(dir, &saved(set), &config(cfg)).expect_err(words);
            assert!(matches!(err, SnapshotFailure::Invalid { .. }));
            let msg = err.to_string();
            assert!(
                msg.contains("partition relay") && msg.contains(words),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_set_and_a_config_must_agree_on_the_disk_and_its_size() {
        let disk = r#", "disk": {"file": "c.disk", "size_mib": 8}"#;
        let elsewhere = r#", "disk": {"file": "/elsewhere/c.disk", "size_mib": 8}"#;
        let bigger = r#", "disk": {"file": "c.disk", "size_mib": 16}"#;
        let dir = Path::new("/set");
        let saved = |d: &str| serde_json::to_value(config(d)).expect("json");
        assert!(check_config(dir, &saved(disk), &config(disk)).is_ok());
        assert!(check_config(dir, &saved(disk), &config(elsewhere)).is_ok());
        for (set, cfg, words) in [
            (disk, "", "the set has a disk, the config none"),
            ("", disk, "the config has a disk, the set none"),
            (
                disk,
                bigger,
                "disk.size_mib is 16 in the config but 8 in the set",
            ),
        ] {
            let msg = check_config(dir, &saved(set), &config(cfg))
                .expect_err(words)
                .to_string();
            assert!(
                msg.contains("partition relay") && msg.contains(words),
                "{msg}"
            );
        }
    }

    fn two(mib_a: u64) -> DeviceConfig {
        let text = format!(
            r#"{{"partitions": [
                {{"name": "a", "role": "engine", "kernel": "k", "memory_mib": {mib_a},
                  "vsock": {{"cid": 3}}}},
                {{"name": "b", "role": "controller", "kernel": "k", "memory_mib": 16,
                  "vsock": {{"cid": 4}}}}]}}"#
        );
        DeviceConfig::parse(&text, Path::new("device.json")).expect("config")
    }

    fn manifest_for(parts: &[(&str, Vec<RamRegion>)]) -> Manifest {
        let partitions: Vec<Value> = parts
            .iter()
            .map(|(name, ram)| {
                serde_json::json!({
                    "name": name, "memory_file": format!("{name}.mem"),
                    "state_file": format!("{name}.state"), "ram": ram,
                    "memory_bytes_written": 0, "incremental": false,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "format_version": 2, "set_id": "ab", "created_unix_ms": 0, "device_config": null,
            "partitions": partitions, "files": {},
        }))
        .expect("manifest")
    }

    #[test]
    fn a_set_must_have_the_configs_ram_layout() {
        let dir = Path::new("/set");
        let cfg = two(32);
        let ram = |mib: u64| {
            layout::ram_ranges(mib << 20)
                .into_iter()
                .map(|(gpa, len)| RamRegion { gpa, len })
                .collect::<Vec<_>>()
        };
        let good = manifest_for(&[("a", ram(32)), ("b", ram(16))]);
        assert!(check_layout(dir, &good, &cfg).is_ok());
        let bigger = manifest_for(&[("a", ram(64)), ("b", ram(16))]);
        let msg = check_layout(dir, &bigger, &cfg)
            .expect_err("more RAM")
            .to_string();
        assert!(
            msg.contains("partition a")
                && msg.contains(&(64u64 << 20).to_string())
                && msg.contains(&(32u64 << 20).to_string()),
            "{msg}"
        );
        // Same size, but placed over the MMIO window.
        let over_mmio = vec![RamRegion {
            gpa: layout::MMIO_START,
            len: 32 << 20,
        }];
        let moved = manifest_for(&[("a", over_mmio), ("b", ram(16))]);
        assert!(check_layout(dir, &moved, &cfg).is_err());
        let extra = manifest_for(&[("a", ram(32)), ("b", ram(16)), ("c", ram(16))]);
        let msg = check_layout(dir, &extra, &cfg)
            .expect_err("extra")
            .to_string();
        assert!(msg.contains("partition c"), "{msg}");
    }

    #[test]
    fn a_switch_state_may_name_only_configured_cids() {
        let dir = Path::new("/set");
        let cfg = two(32);
        let state = |json: Value| -> SwitchState { serde_json::from_value(json).expect("state") };
        let empty = serde_json::to_value(SwitchState::default()).expect("json");
        assert!(check_cids(dir, &state(empty.clone()), &cfg).is_ok());
        let mut b = empty.clone();
        b["backlogs"] = serde_json::json!({"99": {"packets": [], "bytes": 0}});
        let msg = check_cids(dir, &state(b), &cfg)
            .expect_err("CID 99")
            .to_string();
        assert!(msg.contains("CID 99"), "{msg}");
        let mut ok = empty;
        ok["backlogs"] = serde_json::json!({"3": {"packets": [], "bytes": 0}});
        assert!(check_cids(dir, &state(ok), &cfg).is_ok());
    }

    #[test]
    fn snapshot_root_confines_sets() {
        let base = std::env::temp_dir().join(format!("duplex-confine-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sets")).expect("mkdir");
        std::os::unix::fs::symlink("/tmp", root.join("out")).expect("symlink");
        assert!(confine(&root.join("sets/a"), Some(&root)).is_ok());
        assert!(confine(&root.join("new/b"), Some(&root)).is_ok());
        assert!(confine(Path::new("/etc/x"), None).is_ok());
        for bad in [
            root.join("../elsewhere"),
            root.join("sets/../../x"),
            root.join("out/x"),
            root.clone(),
            PathBuf::from("/etc/x"),
        ] {
            let msg = confine(&bad, Some(&root)).expect_err("outside").to_string();
            assert!(
                msg.contains("snapshot.root") && msg.contains(&root.display().to_string()),
                "{}: {msg}",
                bad.display()
            );
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
