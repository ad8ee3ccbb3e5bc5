//! Tests of the device config: a table of broken files, a good one, host memory.

use super::*;
use vmm_sys_util::tempdir::TempDir;

const HOST_MEM: u64 = 1 << 30; // a 1 GiB host for the tests

/// A minimal ELF64 with a PT_LOAD segment and a PT_NOTE holding a `Xen` note of type
/// `note_type` (18 is the PVH entry note; 17 is another Xen note).
fn elf(note_type: u8) -> Vec<u8> {
    let mut f = vec![0u8; 196];
    f[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    let mut put = |at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &0x3eu16.to_le_bytes()); // x86_64
    put(20, &1u32.to_le_bytes());
    put(24, &0x10_0000u64.to_le_bytes()); // e_entry
    put(32, &64u64.to_le_bytes()); // e_phoff
    put(52, &64u16.to_le_bytes());
    put(54, &56u16.to_le_bytes());
    put(56, &2u16.to_le_bytes()); // e_phnum
    for (ph, kind, offset, size) in [(64, 1u32, 0u64, 196u64), (120, 4, 176, 20)] {
        put(ph, &kind.to_le_bytes());
        put(ph + 8, &offset.to_le_bytes());
        put(ph + 16, &(0x10_0000 + offset).to_le_bytes());
        put(ph + 24, &(0x10_0000 + offset).to_le_bytes());
        put(ph + 32, &size.to_le_bytes());
        put(ph + 40, &size.to_le_bytes());
    }
    put(176, &[4, 0, 0, 0, 4, 0, 0, 0, note_type, 0, 0, 0]);
    put(188, b"Xen\0");
    put(192, &0x10_0000u32.to_le_bytes());
    f
}

/// A minimal bzImage (boot protocol 2.06): one setup sector, then `syssize`
/// paragraphs of "kernel" (more than the file holds when `syssize` is too big).
fn bzimage(syssize: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0x1f1] = 1; // setup_sects
    f[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    f[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f
}

/// A temp dir holding the fake kernels: pvh.elf, nopvh.elf, bz.img, short.img (a
/// truncated bzImage), notes.txt, true.elf (a host program).
fn kernels() -> TempDir {
    let dir = TempDir::new().expect("temp dir");
    let d = dir.as_path();
    std::fs::write(d.join("pvh.elf"), elf(18)).expect("write");
    std::fs::write(d.join("nopvh.elf"), elf(17)).expect("write");
    std::fs::write(d.join("bz.img"), bzimage(0xc00 / 16)).expect("write");
    std::fs::write(d.join("short.img"), bzimage(0x1000)).expect("write");
    std::fs::write(d.join("notes.txt"), "just some text\n").expect("write");
    std::fs::copy("/bin/true", d.join("true.elf")).expect("copy /bin/true");
    dir
}

/// A config with one partition "engine" whose JSON fields are `fields`.
fn one(fields: &str) -> String {
    format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {fields}}}]}}"#)
}

#[test]
fn broken_configs_are_refused_with_a_precise_message() {
    let dir = kernels();
    let ok = r#""kernel": "pvh.elf", "memory_mib": 16"#;
    let long = format!(r#"{ok}, "cmdline": "{}""#, "x".repeat(MAX_CMDLINE_LEN + 1));
    let ctl =
        r#"{"name": "controller", "role": "controller", "kernel": "pvh.elf", "memory_mib": 0}"#;
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("syntax", "{\n  \"partitions\": [\n    {\"name\": \"engine\",,}\n  ]\n}".into(), vec!["syntax", "line 3 column 23"]),
        ("truncated", "{\"partitions\": [".into(), vec!["syntax", "line 1 column 16"]),
        ("unknown field", one(&format!(r#"{ok}, "memory_mb": 4"#)), vec!["unknown field `memory_mb`", "partitions[0] (\"engine\")", "line 1"]),
        ("unknown top field", r#"{"partitions": [], "devcie": "x"}"#.into(), vec!["unknown field `devcie`"]),
        ("no partitions field", "{}".into(), vec!["missing field `partitions`"]),
        ("missing kernel", one(r#""memory_mib": 16"#), vec!["missing field `kernel`", "\"engine\""]),
        ("wrong type", one(r#""kernel": "pvh.elf", "memory_mib": "16""#), vec!["invalid type", "\"engine\""]),
        ("bad role", r#"{"partitions": [{"name": "p", "role": "printer", "kernel": "k", "memory_mib": 1}]}"#.into(), vec!["unknown variant `printer`", "partitions[0] (\"p\")"]),
        ("bad console", one(&format!(r#"{ok}, "console": {{"tcp": "x"}}"#)), vec!["unknown variant `tcp`", "\"engine\""]),
        ("vcpus overflow", one(&format!(r#"{ok}, "vcpus": 300"#)), vec!["300", "\"engine\""]),
        ("no partitions", r#"{"device": "mfp", "partitions": []}"#.into(), vec!["no partitions"]),
        ("memory 0", one(r#""kernel": "pvh.elf", "memory_mib": 0"#), vec!["partition \"engine\": memory_mib", "at least 1"]),
        ("memory > host", one(r#""kernel": "pvh.elf", "memory_mib": 2048"#), vec!["\"engine\": memory_mib", "2048 MiB", "host"]),
        ("memory overflow", one(r#""kernel": "pvh.elf", "memory_mib": 18446744073709551615"#), vec!["memory_mib", "host"]),
        ("vcpus 0", one(&format!(r#"{ok}, "vcpus": 0"#)), vec!["\"engine\": vcpus", "out of range"]),
        ("vcpus 65", one(&format!(r#"{ok}, "vcpus": 65"#)), vec!["\"engine\": vcpus", "65"]),
        ("empty name", r#"{"partitions": [{"name": "", "role": "other", "kernel": "pvh.elf", "memory_mib": 1}]}"#.into(), vec!["partitions[0].name", "empty"]),
        ("bad name", r#"{"partitions": [{"name": "Engine 1", "role": "other", "kernel": "pvh.elf", "memory_mib": 1}]}"#.into(), vec!["partitions[0].name", "\"Engine 1\"", "[a-z0-9]"]),
        ("long name", format!(r#"{{"partitions": [{{"name": "{}", "role": "other", "kernel": "pvh.elf", "memory_mib": 1}}]}}"#, "a".repeat(33)), vec!["partitions[0].name", "longer than 32"]),
        ("duplicate", format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {ok}}}, {{"name": "engine", "role": "relay", {ok}}}]}}"#), vec!["partitions[1].name", "duplicate", "\"engine\""]),
        ("second partition", format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {ok}}}, {ctl}]}}"#), vec!["partition \"controller\": memory_mib"]),
        ("cmdline too long", one(&long), vec!["\"engine\": cmdline", "65535 bytes"]),
        ("cmdline NUL", one(&format!(r#"{ok}, "cmdline": "a\u0000b""#)), vec!["\"engine\": cmdline", "NUL"]),
        ("kernel missing", one(r#""kernel": "missing.elf", "memory_mib": 16"#), vec!["partition \"engine\"", "missing.elf", "No such file"]),
        ("kernel is a dir", one(r#""kernel": ".", "memory_mib": 16"#), vec!["partition \"engine\"", "Is a directory"]),
        ("bzImage truncated", one(r#""kernel": "short.img", "memory_mib": 16"#), vec!["partition \"engine\"", "short.img", "truncated"]),
        ("kernel is text", one(r#""kernel": "notes.txt", "memory_mib": 16"#), vec!["\"engine\"", "notes.txt", "not a PVH ELF"]),
        ("kernel ELF not PVH", one(r#""kernel": "nopvh.elf", "memory_mib": 16"#), vec!["\"engine\"", "nopvh.elf", "without a PVH entry note"]),
        ("kernel host program", one(r#""kernel": "true.elf", "memory_mib": 16"#), vec!["\"engine\"", "true.elf", "ELF"]),
        ("vsock cid 2", one(&format!(r#"{ok}, "vsock": {{"cid": 2}}"#)), vec!["\"engine\": vsock.cid", "out of range"]),
        ("vsock cid > u32", one(&format!(r#"{ok}, "vsock": {{"cid": 4294967296}}"#)), vec!["vsock.cid", "4294967296"]),
        ("vsock duplicate cid", format!(r#"{{"partitions": [{{"name": "engine", "role": "engine", {ok}, "vsock": {{"cid": 3}}}}, {{"name": "ctl", "role": "controller", {ok}, "vsock": {{"cid": 3}}}}]}}"#), vec!["\"ctl\": vsock.cid", "cid 3 is used"]),
        ("vsock uds too long", one(&format!(r#"{ok}, "vsock": {{"cid": 3, "uds": "/{}"}}"#, "u".repeat(120))), vec!["vsock.uds", "bytes long"]),
        ("vsock unknown field", one(&format!(r#"{ok}, "vsock": {{"cid": 3, "port": 1}}"#)), vec!["unknown field `port`"]),
        ("net tap empty", one(&format!(r#"{ok}, "net": {{"tap": "", "mac": "52:54:00:12:34:56"}}"#)), vec!["\"engine\": net.tap", "not a valid interface name"]),
        ("net tap too long", one(&format!(r#"{ok}, "net": {{"tap": "sixteen-bytes-xx", "mac": "52:54:00:12:34:56"}}"#)), vec!["\"engine\": net.tap", "sixteen-bytes-xx"]),
        ("net tap slash", one(&format!(r#"{ok}, "net": {{"tap": "a/b", "mac": "52:54:00:12:34:56"}}"#)), vec!["net.tap", "a/b"]),
        ("net tap space", one(&format!(r#"{ok}, "net": {{"tap": "a b", "mac": "52:54:00:12:34:56"}}"#)), vec!["net.tap", "a b"]),
        ("net mac missing", one(&format!(r#"{ok}, "net": {{"tap": "dplx0"}}"#)), vec!["missing field `mac`", "\"engine\""]),
        ("net mac malformed", one(&format!(r#"{ok}, "net": {{"tap": "dplx0", "mac": "52:54:00:12:34"}}"#)), vec!["\"engine\": net.mac", "six hex bytes"]),
        ("net mac multicast", one(&format!(r#"{ok}, "net": {{"tap": "dplx0", "mac": "01:00:5e:00:00:01"}}"#)), vec!["\"engine\": net.mac", "not a unicast"]),
        ("net mac broadcast", one(&format!(r#"{ok}, "net": {{"tap": "dplx0", "mac": "ff:ff:ff:ff:ff:ff"}}"#)), vec!["net.mac", "not a unicast"]),
        ("net mac zero", one(&format!(r#"{ok}, "net": {{"tap": "dplx0", "mac": "00:00:00:00:00:00"}}"#)), vec!["net.mac", "not a unicast"]),
        ("net unknown field", one(&format!(r#"{ok}, "net": {{"tap": "dplx0", "mac": "52:54:00:12:34:56", "vhost": true}}"#)), vec!["unknown field `vhost`"]),
        ("net duplicate tap", format!(r#"{{"partitions": [{{"name": "r1", "role": "relay", {ok}, "net": {{"tap": "dplx0", "mac": "52:54:00:00:00:01"}}}}, {{"name": "r2", "role": "relay", {ok}, "net": {{"tap": "dplx0", "mac": "52:54:00:00:00:02"}}}}]}}"#), vec!["\"r2\": net.tap", "tap dplx0 is used"]),
        ("net duplicate mac", format!(r#"{{"partitions": [{{"name": "r1", "role": "relay", {ok}, "net": {{"tap": "dplx0", "mac": "52:54:00:00:00:01"}}}}, {{"name": "r2", "role": "relay", {ok}, "net": {{"tap": "dplx1", "mac": "52:54:00:00:00:01"}}}}]}}"#), vec!["\"r2\": net.mac", "is used by another"]),
        ("disk size zero", one(&format!(r#"{ok}, "disk": {{"file": "c.disk", "size_mib": 0}}"#)), vec!["\"engine\": disk.size_mib", "out of range"]),
        ("disk file empty", one(&format!(r#"{ok}, "disk": {{"file": "", "size_mib": 8}}"#)), vec!["\"engine\": disk.file", "empty"]),
        ("disk size missing", one(&format!(r#"{ok}, "disk": {{"file": "c.disk"}}"#)), vec!["missing field `size_mib`"]),
        ("disk unknown field", one(&format!(r#"{ok}, "disk": {{"file": "c.disk", "size_mib": 8, "ro": true}}"#)), vec!["unknown field `ro`"]),
        ("disk shared", format!(r#"{{"partitions": [{{"name": "c1", "role": "controller", {ok}, "disk": {{"file": "c.disk", "size_mib": 8}}}}, {{"name": "c2", "role": "controller", {ok}, "disk": {{"file": "c.disk", "size_mib": 8}}}}]}}"#), vec!["\"c2\": disk.file", "the disk of another partition"]),
        ("net duplicate mac other case", format!(r#"{{"partitions": [{{"name": "r1", "role": "relay", {ok}, "net": {{"tap": "dplx0", "mac": "52:54:00:00:00:aa"}}}}, {{"name": "r2", "role": "relay", {ok}, "net": {{"tap": "dplx1", "mac": "52:54:00:00:00:AA"}}}}]}}"#), vec!["\"r2\": net.mac"]),
        ("kernel too big for memory", one(r#""kernel": "pvh.elf", "memory_mib": 1"#), vec!["\"engine\"", "pvh.elf"]),
    ];
    for (i, (what, text, expected)) in cases.iter().enumerate() {
        let file = dir.as_path().join(format!("case{i}.json"));
        std::fs::write(&file, text).expect("write config");
        let err = DeviceConfig::load_with_host_memory(&file, HOST_MEM)
            .expect_err(&format!("case {what:?} was accepted"));
        let msg = err.to_string();
        assert!(
            msg.contains(&file.display().to_string()),
            "{what}: no file in {msg}"
        );
        for word in expected {
            assert!(msg.contains(word), "{what}: {word:?} not in {msg}");
        }
    }
    let missing = dir.as_path().join("absent.json");
    let msg = DeviceConfig::load(&missing)
        .expect_err("absent")
        .to_string();
    assert!(
        msg.contains("absent.json") && msg.contains("cannot read"),
        "{msg}"
    );
}

#[test]
fn a_good_config_loads_with_defaults_and_resolved_paths() {
    let dir = kernels();
    let d = dir.as_path();
    let text = format!(
        r#"{{"device": "mfp-1", "partitions": [
            {{"name": "engine", "role": "engine", "kernel": "pvh.elf", "memory_mib": 16}},
            {{"name": "controller-2", "role": "controller", "kernel": "{}", "memory_mib": 1024,
              "vcpus": 64, "cmdline": "{}", "console": {{"file": "logs/ctl.log"}},
              "disk": {{"file": "data/ctl.disk", "size_mib": 256}}}},
            {{"name": "r_1", "role": "relay", "kernel": "bz.img", "memory_mib": 2, "console": "stdout",
              "net": {{"tap": "dplx-relay0", "mac": "52:54:00:AB:cd:01"}}}}]}}"#,
        d.join("pvh.elf").display(),
        "c".repeat(MAX_CMDLINE_LEN)
    );
    let file = d.join("device.json");
    std::fs::write(&file, &text).expect("write config");
    let config = DeviceConfig::load_with_host_memory(&file, HOST_MEM).expect("valid config");
    assert_eq!(config.device.as_deref(), Some("mfp-1"));
    let names: Vec<_> = config.partitions.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["engine", "controller-2", "r_1"]);
    let engine = config.partition("engine").expect("engine");
    assert_eq!(engine.kernel, d.join("pvh.elf"));
    assert_eq!(
        (engine.role, engine.vcpus, engine.memory_mib),
        (Role::Engine, 1, 16)
    );
    assert_eq!(
        (engine.cmdline.as_str(), &engine.console),
        ("", &ConsoleSink::Stdout)
    );
    let ctl = &config.partitions[1];
    assert_eq!((ctl.vcpus, ctl.cmdline.len()), (64, MAX_CMDLINE_LEN));
    assert_eq!(ctl.console, ConsoleSink::File(d.join("logs/ctl.log")));
    let disk = ctl.disk.as_ref().expect("disk");
    assert_eq!(
        (disk.file.clone(), disk.bytes()),
        (d.join("data/ctl.disk"), 256 << 20)
    );
    assert!(engine.disk.is_none());
    assert_eq!(config.partitions[2].kernel, d.join("bz.img"));
    assert_eq!(config.partitions[2].role.to_string(), "relay");
    let net = config.partitions[2].net.as_ref().expect("net");
    assert_eq!(net.tap, "dplx-relay0");
    assert_eq!(net.mac_bytes(), Ok([0x52, 0x54, 0, 0xab, 0xcd, 1]));
    assert!(engine.net.is_none());
    // Serialized form (kept in snapshots) parses back to the same config.
    let json = serde_json::to_string(&config).expect("serialize");
    assert_eq!(DeviceConfig::parse(&json, &file).expect("reparse"), config);
    // Against the real host memory, 1 GiB fits on any machine that runs the tests.
    assert_eq!(
        DeviceConfig::load(&file)
            .expect("host check")
            .partitions
            .len(),
        3
    );
}

#[test]
fn meminfo_total_is_read_in_bytes() {
    let text = "MemFree:  100 kB\nMemTotal:       24576000 kB\n";
    assert_eq!(parse_meminfo(text), Some(24_576_000 * 1024));
    assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
    assert!(host_memory_bytes().expect("/proc/meminfo") > 0);
}

#[test]
fn vsock_uds_is_resolved_against_the_config_dir() {
    let dir = kernels();
    let file = dir.as_path().join("v.json");
    std::fs::write(
        &file,
        one(r#""kernel": "pvh.elf", "memory_mib": 16, "vsock": {"cid": 3, "uds": "e.vsock"}"#),
    )
    .expect("write");
    let cfg = DeviceConfig::load_with_host_memory(&file, HOST_MEM).expect("valid");
    let v = cfg.partitions[0].vsock.as_ref().expect("vsock");
    assert_eq!(v.cid, 3);
    assert_eq!(
        v.uds.as_deref(),
        Some(dir.as_path().join("e.vsock").as_path())
    );
}
