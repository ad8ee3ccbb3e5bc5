#!/usr/bin/env python3
"""Hostile-neighbour benchmark (`scripts/bench hostile`, or a section of the full
`scripts/bench`): what a hostile partition costs the others. Needs /dev/kvm.

The device is examples/device.json (engine and controller) plus a third partition running
the `hostile` firmware (guests/hostile). BENCH_RUNS times (default 3), interleaved:

- quiet: the hostile partition idles (`hostile=`): a job of BENCH_PAGES (default 100)
  256x256 pages, host -> controller -> engine -> host, timed from submit to done;
- flood: the hostile partition sends vsock packets for connections that do not exist at
  every port of the engine and the controller, from thousands of source ports, and writes
  SNAPSHOT_REQUEST in a loop (`hostile=junk,snap hostile.loop=1`), from before the job starts
  to after it ends: the same job, timed the same way.

The figure is the flood job's pages/s against the quiet job's in the same run (the bound is
in docs/vsock.md). The machine has 2 cores; the hostile vCPU spins on one of them, so part of
the cost is plain CPU contention, not the switch. Also reported: the packets and snapshot
requests the monitor refused while the flood ran.

    python3 scripts/bench_hostile.py --json hostile.json [--duplex target/release/duplex]
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
PAGES = int(os.environ.get("BENCH_PAGES", "100"))
GUESTS = os.path.join(ROOT, "guests/target/x86_64-unknown-none/release")


def say(msg):
    print(f"  {msg}", flush=True)


def console_has(sock, part, needle):
    lines = ctl(sock, {"cmd": "console", "partition": part, "lines": 200})["lines"]
    return any(needle in ln for ln in lines)


def wait(pred, what, timeout=120):
    t_end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > t_end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def one_run(duplex, cmdline, seed):
    """Boots the device with the hostile partition's `cmdline`, times a job; returns
    (pages per second, the monitor's status after the job)."""
    work = tempfile.mkdtemp(prefix="duplex-bench-hostile.", dir=os.environ.get("TMPDIR", "/var/tmp"))
    cfg = json.load(open(os.path.join(ROOT, "examples/device.json")))
    for p in cfg["partitions"]:
        p["kernel"] = os.path.join(GUESTS, os.path.basename(p["kernel"]))
        p["console"] = {"file": f"{p['name']}.log"}
        if "uds" in p.get("vsock", {}):
            p["vsock"]["uds"] = "controller.vsock"
    cfg["partitions"].append({"name": "hostile", "role": "other", "kernel": os.path.join(GUESTS, "hostile"),
                              "memory_mib": 16, "vcpus": 1, "cmdline": cmdline,
                              "console": {"file": "hostile.log"}, "vsock": {"cid": 5}})
    cfg["snapshot"] = {"dir": "set"}
    path = os.path.join(work, "device.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    sock = os.path.join(work, "api.sock")
    mon = subprocess.Popen([duplex, "run", "--config", path, "--api-sock", sock],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    try:
        wait(lambda: os.path.exists(sock) or mon.poll() is not None, "the control socket")
        wait(lambda: console_has(sock, "controller", "READY") and console_has(sock, "engine", "READY"), "READY")
        time.sleep(0.5)  # the flood is under way
        uds = os.path.join(work, "controller.vsock")
        t0 = time.monotonic()
        out = subprocess.run([duplex, "job", "--vsock", uds, "submit", "--pages", str(PAGES), "--seed", str(seed),
                              "--wait"], capture_output=True, text=True, check=True, timeout=600)
        dt = time.monotonic() - t0
        job = json.loads(out.stdout)
        assert job["state"] == "done", out.stdout
        st = ctl(sock, {"cmd": "status"})
        alive = [p["name"] for p in st["partitions"] if p["state"] == "running"]
        assert alive == ["engine", "controller", "hostile"], alive
        return PAGES / dt, st
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


def main():
    ap = argparse.ArgumentParser(description="hostile-neighbour benchmark (scripts/bench hostile)")
    ap.add_argument("--json")
    ap.add_argument("--duplex", default=os.path.join(ROOT, "target/release/duplex"))
    args = ap.parse_args()
    quiet, flood, refused = [], [], []
    for i in range(RUNS):
        q, _ = one_run(args.duplex, "hostile=", 100 + i)
        f, st = one_run(args.duplex, "hostile=junk,snap hostile.loop=1 hostile.junk=5000 hostile.snaps=5000",
                        100 + i)
        quiet.append(q)
        flood.append(f)
        counters = (st.get("vsock") or {}).get("counters", {})
        gs = st["guest_snapshots"]["partitions"].get("hostile", {})
        refused.append({"vsock": counters, "snapshot_requests": gs})
        say(f"run {i + 1}: {PAGES} pages quiet {q:.0f} pages/s, beside the flood {f:.0f} pages/s "
            f"({f / q:.2f} x); snapshot requests refused {gs.get('refused_not_allowed', 0)} "
            f"+ coalesced {gs.get('coalesced', 0)}")
    mq, mf = statistics.median(quiet), statistics.median(flood)
    say(f"median: beside the flood {mf:.0f} pages/s = {mf / mq:.2f} x quiet ({mq:.0f} pages/s)")
    if args.json:
        figures = [
            figure("hostile.job_pages_per_s", f"engine pages/s ({PAGES} pages 256x256) beside a hostile partition "
                   "flooding vsock junk and snapshot requests", mf, "pages/s", f"median of {RUNS}",
                   {"label": "the same job beside the hostile partition idle, same run", "value": round(mq, 3),
                    "unit": "pages/s"}, mf / mq, samples=flood, baseline_samples=quiet, refused=refused),
        ]
        with open(args.json, "w") as f:
            json.dump({"bench": "hostile", "script": "scripts/bench_hostile.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": RUNS, "pages": PAGES, "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
