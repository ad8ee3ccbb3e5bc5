#!/usr/bin/env python3
"""Disk benchmark (`scripts/bench disk`, or a section of the full `scripts/bench`): a
coordinated snapshot of a partition with a 256 MiB disk of which 32 MiB written, against
`dd conv=fsync` of the same bytes in the same run. Needs /dev/kvm.

The device is one partition running the `disktest` firmware (guests/disktest) with a disk of
BENCH_DISK_MIB MiB (default 256); it writes BENCH_DISK_WRITTEN_MIB MiB (default 32) of 4 KiB
blocks, 256 per flush, then idles. Then, BENCH_RUNS times (default 3):

- a full set (`{"cmd":"snapshot"}`): total time, downtime (partitions paused), bytes written
  (memory and disk), beside `dd if=/dev/zero bs=1M count=<the same MiB> conv=fsync` into the
  same folder;
- an incremental set on the full one, the guest idle: its disk bytes (the blocks changed
  since: none) and time.

    python3 scripts/bench_disk.py --json disk.json [--duplex target/release/duplex]
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_common import ctl, figure  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DISK_MIB = int(os.environ.get("BENCH_DISK_MIB", "256"))
WRITTEN_MIB = int(os.environ.get("BENCH_DISK_WRITTEN_MIB", "32"))
GUEST = os.path.join(ROOT, "guests/target/x86_64-unknown-none/release/disktest")


def say(msg):
    print(f"  {msg}", flush=True)


def written(sock):
    lines = ctl(sock, {"cmd": "console", "partition": "store", "lines": 10000})["lines"]
    ns = [int(ln.split("disktest: wrote ")[1]) for ln in lines if "disktest: wrote " in ln]
    return max(ns) if ns else 0


def wait_written(sock, n, timeout=300):
    t_end = time.monotonic() + timeout
    while written(sock) < n:
        if time.monotonic() > t_end:
            raise RuntimeError(f"the guest did not write {n} blocks")
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description="disk benchmark (scripts/bench disk)")
    ap.add_argument("--json")
    ap.add_argument("--duplex", default=os.path.join(ROOT, "target/release/duplex"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="duplex-bench-disk.", dir=os.environ.get("TMPDIR", "/var/tmp"))
    sock = os.path.join(work, "api.sock")
    blocks = WRITTEN_MIB * 256
    cfg = {"partitions": [{
        "name": "store", "role": "controller", "kernel": GUEST, "memory_mib": 32, "vcpus": 1,
        "cmdline": f"disktest.blocks={blocks} disktest.burst=256 disktest.delay_ms=1",
        "console": {"file": "store.log"},
        "disk": {"file": "store.disk", "size_mib": DISK_MIB}}]}
    with open(os.path.join(work, "device.json"), "w") as f:
        json.dump(cfg, f)
    mon = subprocess.Popen([args.duplex, "run", "--config", os.path.join(work, "device.json"), "--api-sock", sock],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs, figures = [], []
    try:
        t_end = time.monotonic() + 60
        while not os.path.exists(sock):
            if time.monotonic() > t_end or mon.poll() is not None:
                raise RuntimeError("the monitor did not start")
            time.sleep(0.05)
        t0 = time.monotonic()
        wait_written(sock, blocks)
        fill_s = time.monotonic() - t0
        say(f"the guest wrote {WRITTEN_MIB} MiB ({blocks} blocks of 4 KiB, 256 per flush) in {fill_s:.1f} s "
            f"on a {DISK_MIB} MiB disk")
        for i in range(RUNS):
            full = os.path.join(work, f"full{i}")
            snap = ctl(sock, {"cmd": "snapshot", "dest": full})
            insp = json.loads(subprocess.run([args.duplex, "snapshot", "inspect", full], capture_output=True,
                                             text=True, check=True).stdout)
            disk = insp["partitions"][0]["disk"]
            total_bytes = snap.get("bytes_written") or (insp["partitions"][0].get("memory_bytes_written", 0)
                                                         + disk["bytes_written"])
            mib = max(1, round(total_bytes / (1 << 20)))
            t = time.monotonic()
            subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(work, 'dd.bin')}", "bs=1M", f"count={mib}",
                            "conv=fsync"], check=True, capture_output=True)
            dd_ms = (time.monotonic() - t) * 1000
            os.unlink(os.path.join(work, "dd.bin"))
            # An incremental set on the full one: the guest has stopped writing, so its disk
            # part is what changed since (nothing but what the guest's idling touches).
            incr = os.path.join(work, f"incr{i}")
            isnap = ctl(sock, {"cmd": "snapshot", "dest": incr, "parent": full})
            iinsp = json.loads(subprocess.run([args.duplex, "snapshot", "inspect", incr], capture_output=True,
                                              text=True, check=True).stdout)
            runs.append({"snapshot_ms": snap["timings_ms"]["total"], "downtime_ms": snap["downtime_ms"],
                         "bytes": total_bytes, "disk_bytes": disk["bytes_written"], "dd_ms": dd_ms,
                         "incr_ms": isnap["timings_ms"]["total"],
                         "incr_disk_bytes": iinsp["partitions"][0]["disk"]["bytes_written"]})
            say(f"run {i + 1}: full set {runs[-1]['snapshot_ms']:.0f} ms (downtime {runs[-1]['downtime_ms']:.1f} ms), "
                f"{total_bytes / 1e6:.1f} MB of which disk {disk['bytes_written'] / 1e6:.1f} MB; dd of {mib} MiB with "
                f"fsync {dd_ms:.0f} ms; incremental set {runs[-1]['incr_ms']:.0f} ms, disk "
                f"{runs[-1]['incr_disk_bytes']} bytes")
            shutil.rmtree(full, ignore_errors=True)
            shutil.rmtree(incr, ignore_errors=True)
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        say(f"median: snapshot {med('snapshot_ms'):.0f} ms = {med('snapshot_ms') / med('dd_ms'):.2f} x dd "
            f"({med('dd_ms'):.0f} ms); downtime {med('downtime_ms'):.1f} ms")
        dd = {"label": "dd conv=fsync of the same bytes", "value": round(med("dd_ms"), 3), "unit": "ms"}
        figures = [
            figure("disk.snapshot", f"snapshot of a partition with a {DISK_MIB} MiB disk, {WRITTEN_MIB} MiB written",
                   med("snapshot_ms"), "ms", f"median of {RUNS}", dd, med("snapshot_ms") / med("dd_ms"),
                   samples=[r["snapshot_ms"] for r in runs], baseline_samples=[r["dd_ms"] for r in runs]),
            figure("disk.downtime", "its downtime (partitions paused)", med("downtime_ms"), "ms", f"median of {RUNS}"),
            figure("disk.set_disk_bytes", "disk bytes in the full set", med("disk_bytes"), "bytes",
                   f"median of {RUNS}"),
            figure("disk.incremental_disk_bytes", "disk bytes in an incremental set with nothing written since",
                   med("incr_disk_bytes"), "bytes", f"median of {RUNS}"),
        ]
    finally:
        try:
            ctl(sock, {"cmd": "shutdown"}, timeout=10)
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            mon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            mon.kill()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "disk", "script": "scripts/bench_disk.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": RUNS, "disk_mib": DISK_MIB, "written_mib": WRITTEN_MIB, "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
