#!/usr/bin/env python3
"""Cold-boot and memory benchmark of the duplex monitor (run by scripts/bench).

For each run: spawn `duplex run` on a generated config of N reference partitions, time
from spawn to each partition's first console line (read from the monitor's stdout), then
read the monitor's RSS and the resident guest memory (from /proc/PID/smaps: the guest
RAM mappings are the anonymous mappings of exactly the partition size) and report the
monitor's own overhead per partition. Baseline, measured in the same run: spawn to first
output line of a trivial process (`duplex --version`), the floor of any process start.

`--json FILE` also writes every figure (with its baseline and unit) as JSON, for
scripts/bench_report.py.
"""
import argparse, datetime, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import figure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLEX = os.path.join(ROOT, "target/release/duplex")
GUESTS = os.path.join(ROOT, "guests/target/x86_64-unknown-none/release")
MIB = 1 << 20


def baseline_ms(runs):
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.Popen([DUPLEX, "--version"], stdout=subprocess.PIPE)
        p.stdout.readline()
        out.append((time.monotonic() - t0) * 1000)
        p.wait()
    return statistics.median(out)


def guest_rss_and_total(pid, sizes):
    """(guest RAM resident bytes, total RSS bytes) of process pid."""
    guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                size = hi - lo
            elif line.startswith("Rss:") and size in sizes:
                guest += int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    return guest, rss


def boot(n, mem_mib, settle_s):
    names = [f"p{i}" for i in range(n)]
    cfg = {"device": "bench", "partitions": [
        {"name": nm, "role": "engine" if i == 0 else "controller",
         "kernel": os.path.join(GUESTS, "engine" if i == 0 else "controller"),
         "memory_mib": mem_mib, "vcpus": 1, "cmdline": "heartbeat_ms=1000", "console": "stdout"}
        for i, nm in enumerate(names)]}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "device.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        t0 = time.monotonic()
        p = subprocess.Popen([DUPLEX, "run", "--config", path, "--api-sock", os.path.join(d, "s"),
                              "--seconds", str(settle_s + 5)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = {}
        while len(first) < n:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"duplex exited before every partition printed: {first}")
            nm = line[1:line.find("]")] if line.startswith("[") else None
            if nm in names and nm not in first:
                first[nm] = (time.monotonic() - t0) * 1000
        time.sleep(settle_s)
        guest, rss = guest_rss_and_total(p.pid, {mem_mib * MIB})
        p.terminate()
        p.wait(timeout=20)
    return first, guest, rss


def main():
    ap = argparse.ArgumentParser(description="cold-boot and memory benchmark")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    runs = int(os.environ.get("BENCH_RUNS", "5"))
    base = baseline_ms(runs)
    print(f"baseline: process spawn to first output line (duplex --version): {base:.2f} ms (median of {runs})")
    spawn = {"label": "process spawn to first output line (duplex --version)", "value": round(base, 3), "unit": "ms"}
    figures = [figure("boot.spawn_baseline", spawn["label"] + " (baseline)", base, "ms", f"median of {runs}")]
    results = {}
    for n in (1, 2, 4):
        firsts, overheads = [], []
        for _ in range(runs):
            first, guest, rss = boot(n, 64, 1.0)
            firsts.extend(first.values())
            overheads.append((rss - guest) / MIB)
        results[n] = (statistics.median(firsts), max(firsts), statistics.median(overheads))
        med, worst, ovh = results[n]
        print(f"{n} partition(s): spawn to first console line median {med:.1f} ms, worst {worst:.1f} ms "
              f"({med / base:.1f}x baseline); monitor RSS minus guest RAM touched {ovh:.2f} MiB")
        figures.append(figure(f"boot.first_line.{n}p", f"{n} partition(s) of 64 MiB: spawn to first console line",
                              med, "ms", f"median of {len(firsts)} (partitions x runs)", spawn, med / base,
                              goal="<= 50 ms" if n == 2 else None, worst=round(worst, 3), samples=firsts))
        figures.append(figure(f"boot.overhead.{n}p", f"{n} partition(s): monitor RSS minus guest RAM touched",
                              ovh, "MiB", f"median of {runs}", samples=overheads))
    slope = (results[4][2] - results[1][2]) / 3
    print(f"monitor overhead per additional partition: {slope:.2f} MiB (goal <= 5 MiB)")
    print(f"first console line, 2-partition device: median {results[2][0]:.1f} ms (goal <= 50 ms)")
    figures.append(figure("boot.overhead_per_partition", "monitor memory overhead per additional partition",
                          slope, "MiB", "(4 partitions - 1) / 3, medians", goal="<= 5 MiB"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "boot", "script": "scripts/bench_boot.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": runs, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
