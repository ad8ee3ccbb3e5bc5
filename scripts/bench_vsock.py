#!/usr/bin/env python3
"""Partition-to-partition vsock, print engine and cold-boot-to-READY benchmark (scripts/bench).

- vsock throughput: a vsockecho client partition (CID 4) sends BYTES to a vsockecho
  server's discard port (CID 3) in 64 KiB writes; the client times it with its TSC.
  Baseline in the same run: a host AF_UNIX socketpair between two threads, 64 KiB
  writes (vmm/examples/unix_baseline.rs).
- vsock round trip: the client does COUNT round trips of 64 bytes to the server's echo
  port; baseline: the same over the socketpair.
- engine pages/s: a job of PAGES 256x256 pages through host -> controller -> engine,
  timed on the host from submit to done. Baseline: the host halftoning the same pages
  with the same code (duplex-link, `duplex job` is not involved) -- printed by
  `duplex-bench-host` below if built; else absolute only.
- cold boot to READY: spawn of `duplex run` on examples/device.json to the engine's and
  the controller's READY lines (the figure snapshot reboot must beat by 20x).

`--json FILE` also writes every figure (with its baseline and unit) as JSON, for
scripts/bench_report.py.
"""
import argparse, datetime, json, os, re, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import figure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLEX = os.path.join(ROOT, "target/release/duplex")
GUESTS = os.path.join(ROOT, "guests/target/x86_64-unknown-none/release")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def run_device(cfg, wait_for, timeout=120):
    """Boots cfg; returns {needle: (partition, line, seconds since spawn)} for each needle."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "device.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        t0 = time.monotonic()
        p = subprocess.Popen([DUPLEX, "run", "--config", path, "--api-sock", os.path.join(d, "s")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=d)
        found = {}
        try:
            while len(found) < len(wait_for):
                line = p.stdout.readline()
                if not line:
                    raise SystemExit(f"duplex exited early; found {found}")
                if time.monotonic() - t0 > timeout:
                    raise SystemExit(f"timeout; found {found}")
                for part, needle in wait_for:
                    if (part, needle) not in found and line.startswith(f"[{part}] ") and needle in line:
                        found[(part, needle)] = (line.strip(), time.monotonic() - t0)
        finally:
            p.terminate()
            p.wait(timeout=20)
    return found


def echo_pair(client_cmdline):
    return {"partitions": [
        {"name": "server", "role": "other", "kernel": os.path.join(GUESTS, "vsockecho"),
         "memory_mib": 64, "cmdline": "", "vsock": {"cid": 3}},
        {"name": "client", "role": "other", "kernel": os.path.join(GUESTS, "vsockecho"),
         "memory_mib": 64, "cmdline": client_cmdline, "vsock": {"cid": 4}},
    ]}


def baseline(nbytes, trips):
    out = subprocess.run(["cargo", "run", "-q", "--release", "-p", "duplex-vmm", "--example",
                          "unix_baseline", "--", str(nbytes), str(trips), "64"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description="vsock, print pipeline and cold-boot-to-READY benchmark")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    nbytes = int(os.environ.get("BENCH_VSOCK_BYTES", str(256 << 20)))
    trips = int(os.environ.get("BENCH_RTT_COUNT", "2000"))
    base = [baseline(nbytes, trips) for _ in range(RUNS)]
    # Best of the runs on both sides: on this shared, nested machine the socketpair swings
    # between 2 and 12 GB/s from run to run, and a median compares noise with noise.
    base_mbs = max(b["mb_per_s"] for b in base)
    base_rtt = min(b["rtt_avg_ns"] for b in base)
    print(f"baseline AF_UNIX socketpair (best of {RUNS}): {base_mbs:.0f} MB/s (64 KiB writes), "
          f"round trip {base_rtt / 1000:.1f} us (64 B); all runs: "
          f"{', '.join('%.0f' % b['mb_per_s'] for b in base)} MB/s")

    rates, rtts = [], []
    for _ in range(RUNS):
        f = run_device(echo_pair(f"connect=3:9:source bytes={nbytes}"), [("client", "vsockecho sent")])
        line = f[("client", "vsockecho sent")][0]
        m = re.search(r"sent (\d+) in (\d+) ns", line)
        rates.append(int(m.group(1)) / (int(m.group(2)) / 1e9) / 1e6)
        f = run_device(echo_pair(f"connect=3:7:rtt count={trips} size=64"), [("client", "avg_ns=")])
        rtts.append(int(re.search(r"avg_ns=(\d+)", f[("client", "avg_ns=")][0]).group(1)))
    mbs, rtt = max(rates), min(rtts)
    print(f"vsock partition->partition (best of {RUNS}): {mbs:.0f} MB/s = {mbs / base_mbs:.3f} x socketpair (goal >= 0.5); "
          f"round trip {rtt / 1000:.1f} us = {rtt / base_rtt:.2f} x socketpair")

    boot = []
    cfg = json.load(open(os.path.join(ROOT, "examples/device.json")))
    for p in cfg["partitions"]:
        p["kernel"] = os.path.join(GUESTS, os.path.basename(p["kernel"]))
        if "uds" in p.get("vsock", {}):
            p["vsock"]["uds"] = "controller.vsock"
    for _ in range(RUNS):
        f = run_device(cfg, [("engine", "READY"), ("controller", "READY")])
        boot.append(max(t for _, t in f.values()) * 1000)
    print(f"cold boot to READY (engine calibrates 48 MiB, both partitions): median {statistics.median(boot):.0f} ms "
          f"(runs: {', '.join(f'{b:.0f}' for b in boot)})")

    pages = int(os.environ.get("BENCH_PAGES", "200"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "device.json")
        with open(path, "w") as fh:
            json.dump(cfg, fh)
        p = subprocess.Popen([DUPLEX, "run", "--config", path, "--api-sock", os.path.join(d, "s")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=d)
        try:
            while "[controller]" not in (line := p.stdout.readline()) or "READY" not in line:
                if not line:
                    raise SystemExit("duplex exited")
            uds = os.path.join(d, "controller.vsock")
            rates = []
            for run in range(RUNS):
                t0 = time.monotonic()
                out = subprocess.run([DUPLEX, "job", "--vsock", uds, "submit", "--pages", str(pages),
                                      "--seed", str(run + 1), "--wait"], capture_output=True, text=True, check=True)
                dt = time.monotonic() - t0
                assert json.loads(out.stdout)["state"] == "done", out.stdout
                rates.append(pages / dt)
            host = subprocess.run(["cargo", "run", "-q", "--release", "-p", "duplex-vmm", "--example",
                                   "halftone_baseline", "--", str(pages)],
                                  cwd=ROOT, capture_output=True, text=True, check=True).stdout
            host_rate = json.loads(host)["pages_per_s"]
        finally:
            p.terminate()
            p.wait(timeout=20)
    r = statistics.median(rates)
    print(f"engine: {r:.0f} pages/s (256x256, host->controller->engine->host) = {r / host_rate:.3f} x the host "
          f"halftoning the same pages in one thread ({host_rate:.0f} pages/s)")
    if args.json:
        sp = "host AF_UNIX socketpair, two threads"
        figures = [
            figure("vsock.socketpair_throughput", "host AF_UNIX socketpair throughput, 64 KiB writes (baseline)",
                   base_mbs, "MB/s", f"best of {RUNS}", samples=[b["mb_per_s"] for b in base]),
            figure("vsock.socketpair_rtt", "host AF_UNIX socketpair round trip, 64 B (baseline)",
                   base_rtt / 1000, "us", f"best of {RUNS}", samples=[b["rtt_avg_ns"] / 1000 for b in base]),
            figure("vsock.throughput", "vsock partition->partition throughput, 64 KiB writes", mbs, "MB/s",
                   f"best of {RUNS}", {"label": sp, "value": round(base_mbs, 3), "unit": "MB/s"}, mbs / base_mbs,
                   goal=">= 0.5 x socketpair", bytes=nbytes),
            figure("vsock.rtt", "vsock partition->partition round trip, 64 B", rtt / 1000, "us", f"best of {RUNS}",
                   {"label": sp, "value": round(base_rtt / 1000, 3), "unit": "us"}, rtt / base_rtt,
                   samples=[x / 1000 for x in rtts], count=trips),
            figure("boot.cold_ready", "cold boot to READY, examples/device.json (engine calibrates 48 MiB)",
                   statistics.median(boot), "ms", f"median of {RUNS}", samples=boot),
            figure("print.engine_pages_per_s", "engine pages/s, 256x256, host->controller->engine->host", r,
                   "pages/s", f"median of {RUNS}",
                   {"label": "the host halftoning the same pages, one thread", "value": round(host_rate, 3),
                    "unit": "pages/s"}, r / host_rate, samples=rates, pages=pages),
        ]
        with open(args.json, "w") as f:
            json.dump({"bench": "vsock", "script": "scripts/bench_vsock.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": RUNS, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
