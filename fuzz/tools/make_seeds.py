#!/usr/bin/env python3
"""Writes the seed corpora of the snapshot and state targets from a real set and an
incremental set on top of it (taken by `duplex ctl snapshot`, see docs/fuzzing.md):

    fuzz/tools/make_seeds.py FULL_SET INCREMENTAL_SET

The sets' RAM is shrunk to 64 KiB per partition in the set seeds (the harness pads files to
the manifest's lengths and fixes their checksums), so that every seed stays small.
"""
import hashlib
import json
import os
import struct
import sys
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seeds")
NAMES = ["manifest.json", "engine.state", "engine.mem", "engine.pages",
         "controller.state", "controller.mem", "controller.disk",
         "controller.diskpages", "vsock.devstate", "controller.pages"]
RAM = 64 * 1024


def put(target, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def body(sealed):
    """The manifest without its manifest_crc32 member (the harness seals it again)."""
    m = json.loads(sealed)
    m.pop("manifest_crc32", None)
    return json.dumps(m, indent=2).encode()


def pages_file(n, bits):
    return b"DPXPAGES" + struct.pack("<Q", n) + bits


def small(manifest, states):
    """The manifest with 64 KiB of RAM per partition and `states` as state files."""
    m = json.loads(manifest)
    m.pop("manifest_crc32", None)
    files = {}
    for p in m["partitions"]:
        p["ram"] = [{"gpa": 0, "len": RAM}]
        p["memory_bytes_written"] = 2 * 4096
        files[p["memory_file"]] = {"len": RAM, "crc32": 0}
        files[p["state_file"]] = {"len": len(states[p["name"]]), "crc32": 0}
        if p.get("pages_file"):
            files[p["pages_file"]] = {"len": 16 + RAM // 4096 // 8, "crc32": 0}
        d = p.get("disk")
        if d:
            d["len"] = 64 * 1024
            d["bytes_written"] = min(d["bytes_written"], d["len"])
            files[d["file"]] = {"len": d["len"], "crc32": 0}
            if d.get("pages_file"):
                files[d["pages_file"]] = {"len": 16 + d["len"] // 4096 // 8, "crc32": 0}
    for comp, f in m.get("device_states", {}).items():
        files[f] = {"len": len(states[comp]), "crc32": 0}
    m["files"] = files
    return m


def entries(files, parent=False):
    out = b""
    for name, data in files.items():
        out += bytes([NAMES.index(name) | (0x80 if parent else 0)])
        out += struct.pack("<H", len(data)) + data
    return out


def main():
    full, inc = sys.argv[1], sys.argv[2]
    for s in (full, inc):
        sealed = read(os.path.join(s, "manifest.json"))
        put("snapshot_manifest", b"\x00" + sealed)
        put("snapshot_manifest", b"\x01" + body(sealed))
        for name in ("engine.state", "controller.state"):
            state = read(os.path.join(s, name))
            put("partition_state", b"\x00" + state)
            put("partition_state", b"\x01" + json.dumps(json.loads(state)["devices"]).encode())
        put("partition_state", b"\x02" + read(os.path.join(s, "vsock.devstate")))

    # Sets: the full one alone, then the incremental one on top of it in ../parent.
    states = {"engine": b"{}", "controller": b"{}",
              "vsock": read(os.path.join(full, "vsock.devstate"))}
    mem = bytes(range(256)) * 32  # two non-zero pages; the harness pads to 64 KiB
    pages = pages_file(RAM // 4096, b"\x03\x00")

    def set_files(manifest, incremental):
        m = small(manifest, states)
        f = {"manifest.json": json.dumps(m, indent=2).encode(),
             "engine.state": states["engine"], "engine.mem": mem,
             "controller.state": states["controller"], "controller.mem": mem,
             "controller.disk": mem, "vsock.devstate": states["vsock"]}
        if incremental:
            m["parent"]["path"] = "../parent"
            f["manifest.json"] = json.dumps(m, indent=2).encode()
            f.update({"engine.pages": pages, "controller.pages": pages,
                      "controller.diskpages": pages})
        return f

    full_files = set_files(read(os.path.join(full, "manifest.json")), False)
    inc_files = set_files(read(os.path.join(inc, "manifest.json")), True)
    put("snapshot_set", b"\x01" + entries(full_files))
    put("snapshot_set", b"\x03" + entries(inc_files) + entries(full_files, parent=True))
    # Unsealed: the manifest as written, checksums wrong (the reader must refuse it).
    put("snapshot_set", b"\x00" + entries(full_files))


if __name__ == "__main__":
    main()
