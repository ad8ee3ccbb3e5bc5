#!/usr/bin/env python3
"""Merges the benchmarks' JSON results and draws their plots (run by scripts/bench).

    python3 scripts/bench_report.py --out docs/bench boot.json vsock.json snapshot.json relay.json
    python3 scripts/bench_report.py --out docs/bench --merge relay.json   (`scripts/bench relay`)
    python3 scripts/bench_report.py --out docs/bench --from docs/bench/results.json   (plots again)

Inputs are the files `scripts/bench_{boot,vsock,snapshot,relay}.py --json FILE` write. With
--merge, the benches of the inputs replace their namesakes in the --out folder's existing
results.json and the others are kept as they were (each bench carries its own date; the
file's `merged` lists which benches this report did not run). Writes into the --out folder:

- results.json: every figure of every bench (value, unit, statistic, baseline, ratio,
  goal, samples), the snapshot bench's per-size medians, the date, and the machine
  (nproc, kernel, CPU, memory, git commit);
- snapshot.svg: snapshot total time and downtime against device memory size, with the
  `dd conv=fsync` of the same bytes;
- restore.svg: per device size, cold boot to READY, snapshot reboot to READY (new
  process), whole restore in a new process, and reboot in place (`duplex ctl reboot`).

The SVGs are written as text (standard library only), 800x450.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 800, 450
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
INK, GRID, MUTED = "#222222", "#e3e3e3", "#666666"


# --- machine -----------------------------------------------------------------------------
def machine():
    m = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
         "kernel": platform.release(), "arch": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
            m["memory_gib"] = round(kib / (1 << 20), 1)
    except (OSError, StopIteration):
        pass
    m["kvm"] = os.path.exists("/dev/kvm")
    # Other work on the machine skews the figures: the load averages when the report was made.
    m["loadavg_1_5_15_at_report"] = [round(x, 2) for x in os.getloadavg()]
    return m


def git_commit():
    try:
        r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        d = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            return r.stdout.strip() + ("+changes" if d.returncode == 0 and d.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


# --- SVG ---------------------------------------------------------------------------------
def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def fmt(v):
    """A value for a label: 3 significant digits at most, no trailing zeros."""
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def nice_ticks(lo, hi, n=6):
    """Round tick values covering [lo, hi], about n of them."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while not ticks or ticks[-1] < hi:
        ticks.append(round(t, 10))
        t += step
    return ticks


class Svg:
    def __init__(self, title, subtitle=None):
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
                      f'viewBox="0 0 {W} {H}" font-family="{FONT}">',
                      f'<rect width="{W}" height="{H}" fill="#ffffff"/>']
        self.text(W / 2, 26, title, size=18, anchor="middle", weight="bold")
        if subtitle:
            self.text(W / 2, 46, subtitle, size=12, anchor="middle", fill=MUTED)

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=12, anchor="start", fill=INK, weight="normal", rotate=None, baseline=None):
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
        bl = f' dominant-baseline="{baseline}"' if baseline else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
                 f'font-weight="{weight}"{bl}{tr}>{esc(s)}</text>')

    def line(self, x1, y1, x2, y2, stroke=INK, width=1, dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                 f'stroke-width="{width}"{d}/>')

    def rect(self, x, y, w, h, fill, stroke="none"):
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}" stroke="{stroke}"/>')

    def legend(self, items, y):
        """items: (label, colour, kind, dash) with kind 'line' or 'box'; one centred row."""
        widths = [34 + 7.0 * len(label) for label, *_ in items]
        x = (W - sum(widths) - 18 * (len(items) - 1)) / 2
        for (label, colour, kind, dash), w in zip(items, widths):
            if kind == "line":
                self.line(x, y, x + 24, y, colour, 2.5, dash)
                self.add(f'<circle cx="{x + 12:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>')
            else:
                self.rect(x + 4, y - 7, 16, 14, colour)
            self.text(x + 30, y + 4, label, size=12)
            x += w + 18

    def save(self, path):
        self.parts.append("</svg>")
        with open(path, "w") as f:
            f.write("\n".join(self.parts) + "\n")


def footer(svg, meta):
    m = meta["machine"]
    s = (f"{meta['date'][:10]} · nproc {m.get('nproc')} · Linux {m.get('kernel')}"
         + (f" · {meta['git_commit']}" if meta.get("git_commit") else "") + " · scripts/bench")
    svg.text(W - 10, H - 8, s, size=10, anchor="end", fill=MUTED)


# --- plots -------------------------------------------------------------------------------
SNAP, DOWN, DD = "#1f77b4", "#ff7f0e", "#7f7f7f"


def plot_snapshot(meta, sizes, path):
    runs = sizes[0].get("runs")
    mb = ", ".join(f"{s['bytes'] / 1e6:.1f}" for s in sizes)
    svg = Svg("Coordinated snapshot vs dd conv=fsync of the same bytes",
              f"engine + controller, ~64 MiB touched; bytes written {mb} MB; median of {runs} run{'s' if runs != 1 else ''}; lower is better")
    left, right, top, bottom = 78, W - 30, 92, H - 72
    series = [("snapshot, total", "snapshot_ms", SNAP, None),
              ("downtime (partitions paused)", "downtime_ms", DOWN, None),
              ("dd conv=fsync, same bytes (baseline)", "dd_ms", DD, "7 5")]
    svg.legend([(label, c, "line", d) for label, _, c, d in series], 66)
    xs = [s["device_mib"] for s in sizes]
    ymax = max(s[k] for s in sizes for _, k, _, _ in series)
    yt = nice_ticks(0, ymax * 1.12)
    x0, x1 = 0, max(xs) * 1.06
    X = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
    Y = lambda v: bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)
    for t in yt:
        svg.line(left, Y(t), right, Y(t), GRID)
        svg.text(left - 8, Y(t) + 4, fmt(t), anchor="end")
    for v in xs:
        svg.line(X(v), bottom, X(v), bottom + 5)
        svg.text(X(v), bottom + 20, f"{v} MiB", anchor="middle")
    svg.line(left, bottom, right, bottom)
    svg.line(left, top, left, bottom)
    svg.text(18, (top + bottom) / 2, "time (ms)", size=13, anchor="middle", rotate=-90)
    svg.text((left + right) / 2, bottom + 44, "device memory (engine + controller)", size=13, anchor="middle")
    for label, key, colour, dash in series:
        pts = [(X(s["device_mib"]), Y(s[key])) for s in sizes]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        da = f' stroke-dasharray="{dash}"' if dash else ""
        svg.add(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2.5"{da}/>')
        for (x, y), s in zip(pts, sizes):
            svg.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
    # Value labels right of each point: the top one above its point, the others below it
    # (above when below would leave the plot), moved on past labels already placed.
    for s in sizes:
        vals = sorted((Y(s[k]), s[k], c) for _, k, c, _ in series)
        placed = []
        for i, (y, v, c) in enumerate(vals):
            tries = [y - 8, y + 17] if i == 0 or y + 17 > bottom - 2 else [y + 17, y - 8]
            tries += [t + d for t in tries for d in (14, -14, 28, -28)]
            ly = next((t for t in tries if top + 10 <= t <= bottom - 2 and all(abs(t - p) >= 14 for p in placed)),
                      tries[0])
            placed.append(ly)
            svg.text(X(s["device_mib"]) + 7, ly, fmt(v), size=11, fill=c, weight="bold")
    footer(svg, meta)
    svg.save(path)


COLD, NEWP, WHOLE, INPLACE = "#8c8c8c", "#1f77b4", "#9ecae1", "#ff7f0e"


def plot_restore(meta, sizes, path):
    runs = sizes[0].get("runs")
    svg = Svg("Snapshot restore vs cold boot",
              f"engine + controller, ~64 MiB touched; medians of {runs} run{'s' if runs != 1 else ''} "
              f"({sizes[0].get('reboots')} in-place reboots); log scale; lower is better")
    left, right, top, bottom = 78, W - 20, 104, H - 72
    bars = [("cold boot to READY", "cold_ready_ms", COLD),
            ("snapshot reboot to READY (new process)", "restore_ready_ms", NEWP),
            ("whole restore, new process (its timings)", "restore_total_ms", WHOLE),
            ("reboot in place (duplex ctl reboot)", "reboot_ms", INPLACE)]
    svg.legend([(b[0], b[2], "box", None) for b in bars[:2]], 64)
    svg.legend([(b[0], b[2], "box", None) for b in bars[2:]], 84)
    vals = [s[k] for s in sizes for _, k, _ in bars if s.get(k)]
    # The axis starts at the largest 1-2-5 value under 70 % of the smallest bar.
    floor = min(vals) * 0.7
    lo = max(m * 10 ** e for e in range(math.floor(math.log10(floor)) - 1, math.floor(math.log10(floor)) + 1)
             for m in (1, 2, 5) if m * 10 ** e <= floor)
    hi = max(vals) * 1.5
    Y = lambda v: bottom - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - top)
    d = 10 ** math.floor(math.log10(lo))
    while d <= hi:
        for m in range(1, 10):
            v = d * m
            if v > hi:
                break
            if v < lo * 0.999:
                continue
            major = m in (1, 2, 5)
            svg.line(left, Y(v), right, Y(v), "#cfcfcf" if m == 1 else GRID if major else "#f3f3f3")
            svg.line(left - (5 if major else 3), Y(v), left, Y(v))
            if major:
                svg.text(left - 8, Y(v) + 4, fmt(v), anchor="end")
        d *= 10
    svg.line(left, bottom, right, bottom)
    svg.line(left, top, left, bottom)
    svg.text(18, (top + bottom) / 2, "time (ms, log scale)", size=13, anchor="middle", rotate=-90)
    group = (right - left) / len(sizes)
    bw = min(40, group * 0.8 / len(bars))
    for i, s in enumerate(sizes):
        gx = left + group * i + (group - bw * len(bars)) / 2
        for j, (_, key, colour) in enumerate(bars):
            v = s.get(key)
            if not v:
                continue
            x, y = gx + j * bw, Y(v)
            svg.rect(x + 2, y, bw - 4, bottom - y, colour)
            svg.text(x + bw / 2, y - 5, fmt(v), size=11, anchor="middle")
        cx = left + group * (i + 0.5)
        svg.text(cx, bottom + 20, f"{s['device_mib']} MiB device", anchor="middle", size=13)
        speed = s["cold_ready_ms"] / s["restore_ready_ms"]
        svg.text(cx, bottom + 38, f"READY {speed:.0f}x sooner than cold boot", anchor="middle", size=11, fill=MUTED)
    footer(svg, meta)
    svg.save(path)


# --- main --------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description="merge benchmark JSON results and draw their SVG plots")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/bench"), help="output folder (default docs/bench)")
    ap.add_argument("--from", dest="src", help="redraw from an existing results.json instead of bench files")
    ap.add_argument("--merge", action="store_true",
                    help="keep the benches of the existing results.json that the inputs do not replace")
    ap.add_argument("inputs", nargs="*", help="files written by scripts/bench_*.py --json")
    args = ap.parse_args()
    if args.src:
        with open(args.src) as f:
            results = json.load(f)
    else:
        if not args.inputs:
            ap.error("no inputs (or --from results.json)")
        benches, kept = {}, []
        previous = os.path.join(args.out, "results.json")
        if args.merge and os.path.exists(previous):
            with open(previous) as f:
                benches = json.load(f).get("benches", {})
            kept = sorted(benches)
        for path in args.inputs:
            with open(path) as f:
                b = json.load(f)
            benches[b["bench"]] = b
            if b["bench"] in kept:
                kept.remove(b["bench"])
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "git_commit": git_commit(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("BENCH_")},
            "note": "each figure: value (stat over runs) in unit, its baseline measured in the same run, "
                    "ratio (see ratio_meaning), goal where the project set one, samples = every run",
            "benches": benches,
        }
        if kept:
            results["merged"] = {"kept_from_previous_report": kept,
                                 "note": "these benches were not run by this report; see each bench's date"}
    os.makedirs(args.out, exist_ok=True)
    if not args.src:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    written = ["results.json"] if not args.src else []
    snap = results["benches"].get("snapshot")
    if args.merge and "snapshot" in results.get("merged", {}).get("kept_from_previous_report", []):
        # Not run now: its plots stay as they were (their footers say when they were made).
        print("bench_report: snapshot not run: its plots are kept", file=sys.stderr)
    elif snap and snap.get("sizes"):
        plot_snapshot(results, snap["sizes"], os.path.join(args.out, "snapshot.svg"))
        plot_restore(results, snap["sizes"], os.path.join(args.out, "restore.svg"))
        written += ["snapshot.svg", "restore.svg"]
    else:
        print("bench_report: no snapshot results: no plots", file=sys.stderr)
    print(f"bench_report: wrote {', '.join(os.path.join(args.out, w) for w in written)}")


if __name__ == "__main__":
    main()
