#!/usr/bin/env python3
"""Snapshot / restore benchmark (run by scripts/bench).

For the reference device (engine + controller) at 128 MiB, 512 MiB and 1 GiB in total,
with about 64 MiB touched (the engine calibrates 60 MiB): a coordinated snapshot (total
time, downtime, bytes written), a `dd ... conv=fsync` of the same byte count into the same
folder (the baseline, same run), restore-to-running of a new process from the set (the
monitor's own timings: verify, build, switch), and snapshot reboot to READY (spawn of
`duplex run --restore` until the control socket answers, restored) next to cold boot to
READY (spawn of `duplex run` until both partitions print READY). And the in-place reboot:
with the device running and the set taken, `duplex ctl reboot --from SET` (the same request
over the control socket) BENCH_REBOOTS times (default 5) per run, reported by the total of
its reply's `timings_ms` (median, best) beside the whole restore in a new process.

`--json FILE` also writes every figure (with its baseline and unit) and the per-size
medians as JSON, for scripts/bench_report.py.
"""
import sys
import argparse, datetime, json, os, socket, statistics, subprocess, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import figure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLEX = os.path.join(ROOT, "target/release/duplex")
GUESTS = os.path.join(ROOT, "guests/target/x86_64-unknown-none/release")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
REBOOTS = int(os.environ.get("BENCH_REBOOTS", "5"))


def config(d, engine_mib, controller_mib):
    return {"device": "bench", "partitions": [
        {"name": "engine", "role": "engine", "kernel": os.path.join(GUESTS, "engine"),
         "memory_mib": engine_mib, "cmdline": "calib_mib=60", "vsock": {"cid": 3}},
        {"name": "controller", "role": "controller", "kernel": os.path.join(GUESTS, "controller"),
         "memory_mib": controller_mib, "cmdline": "engine_cid=3",
         "vsock": {"cid": 4, "uds": os.path.join(d, "c.vsock")}},
    ]}


def ctl(sock, req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def spawn(cfg_path, sock, *extra):
    return subprocess.Popen([DUPLEX, "run", "--config", cfg_path, "--api-sock", sock, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def wait_ready(p, names=("engine", "controller")):
    seen = set()
    while len(seen) < len(names):
        line = p.stdout.readline()
        if not line:
            raise SystemExit("duplex exited early")
        for n in names:
            if line.startswith(f"[{n}] ") and "READY" in line:
                seen.add(n)


def wait_socket(sock, p, timeout=30):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            r = ctl(sock, {"cmd": "status"})
            if r.get("ok"):
                return r["result"]
        except OSError:
            pass
        if p.poll() is not None:
            raise SystemExit("duplex exited")
        time.sleep(0.0005)
    raise SystemExit("socket never came up")


def stop(p, sock):
    try:
        ctl(sock, {"cmd": "shutdown"})
    except OSError:
        pass
    p.wait(timeout=30)


def one(total_mib):
    controller = max(32, total_mib // 4)
    engine = total_mib - controller
    out = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        cfg_path = os.path.join(d, "device.json")
        with open(cfg_path, "w") as f:
            json.dump(config(d, engine, controller), f)
        sock = os.path.join(d, "api.sock")
        t0 = time.monotonic()
        p = spawn(cfg_path, sock)
        wait_ready(p)
        out["cold_ready_ms"] = (time.monotonic() - t0) * 1000
        time.sleep(0.3)
        set_dir = os.path.join(d, "set")
        r = ctl(sock, {"cmd": "snapshot", "dest": set_dir})
        assert r["ok"], r
        snap = r["result"]
        # Reboot in place (`duplex ctl reboot --from SET`), the device running, REBOOTS times.
        out["reboot_ms"], out["reboot_down_ms"] = [], []
        for _ in range(REBOOTS):
            time.sleep(0.1)
            r = ctl(sock, {"cmd": "reboot", "from": set_dir})
            assert r["ok"], r
            out["reboot_ms"].append(r["result"]["timings_ms"]["total"])
            if "downtime_ms" in r["result"]:  # the device stopped (monitors since the prepare-then-switch reboot)
                out["reboot_down_ms"].append(r["result"]["downtime_ms"])
        out["reboot_phases"] = r["result"]["timings_ms"]
        stop(p, sock)
        out["snapshot_ms"] = snap["timings_ms"]["total"]
        out["downtime_ms"] = snap["downtime_ms"]
        out["bytes"] = snap["bytes_written"]
        out["phases"] = snap["timings_ms"]
        mib = max(1, round(snap["bytes_written"] / (1 << 20)))
        t = time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(d, 'dd.bin')}", "bs=1M", f"count={mib}",
                        "conv=fsync"], check=True, capture_output=True)
        out["dd_ms"] = (time.monotonic() - t) * 1000
        os.unlink(os.path.join(d, "dd.bin"))
        # Snapshot reboot: a new process from the set.
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        p = spawn(cfg_path, sock, "--restore", set_dir)
        st = wait_socket(sock, p)
        out["restore_ready_ms"] = (time.monotonic() - t0) * 1000
        assert st["restored_from"], st
        stop(p, sock)
        # The monitor's own restore timings (from its log line) via a second run.
        q = subprocess.run([DUPLEX, "run", "--config", cfg_path, "--api-sock", sock, "--restore", set_dir,
                            "--seconds", "0.2"], capture_output=True, text=True)
        line = next(l for l in q.stderr.splitlines() if "restored from" in l)
        timings = json.loads(line[line.index("{"):])["timings_ms"]
        out["restore_verify_ms"] = timings["verify"]
        # To running: build + switch (restore + resume in monitors before the prepare-then-switch restore).
        out["restore_to_running_ms"] = sum(timings.get(k, 0) for k in ("build", "switch", "restore", "resume"))
        out["restore_total_ms"] = timings["total"]
    return out


def main():
    ap = argparse.ArgumentParser(description="snapshot / restore benchmark")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    figures, sizes = [], []
    for total in (128, 512, 1024):
        runs = [one(total) for _ in range(RUNS)]
        med = lambda k: statistics.median(r[k] for r in runs)
        reboots = [ms for r in runs for ms in r["reboot_ms"]]
        reboot_med, reboot_best = statistics.median(reboots), min(reboots)
        downs = [ms for r in runs for ms in r["reboot_down_ms"]]
        reboot_down = statistics.median(downs) if downs else None
        print(f"{total} MiB device (~64 MiB touched): snapshot {med('snapshot_ms'):.0f} ms "
              f"(downtime {med('downtime_ms'):.0f} ms), {med('bytes') / 1e6:.1f} MB written; "
              f"dd of the same bytes with fsync {med('dd_ms'):.0f} ms "
              f"(snapshot = {med('snapshot_ms') / med('dd_ms'):.2f} x dd)")
        print(f"    phases (last run): {json.dumps(runs[-1]['phases'])}")
        print(f"    restore: verify {med('restore_verify_ms'):.1f} ms (new process: alongside the build), to running {med('restore_to_running_ms'):.1f} ms, "
              f"whole restore (total of its timings) {med('restore_total_ms'):.1f} ms (goal <= 10 ms); snapshot reboot to READY {med('restore_ready_ms'):.0f} ms vs cold boot to READY "
              f"{med('cold_ready_ms'):.0f} ms = {med('cold_ready_ms') / med('restore_ready_ms'):.1f}x faster (goal >= 20x)")
        print(f"    reboot in place (duplex ctl reboot --from SET, {len(reboots)} times): total median {reboot_med:.1f} ms, "
              f"best {reboot_best:.1f} ms"
              + (f" (device stopped {reboot_down:.2f} ms)" if reboot_down is not None else "")
              + f", vs whole restore in a new process {med('restore_total_ms'):.1f} ms; "
              f"phases (last): {json.dumps(runs[-1]['reboot_phases'])}")
        cold = {"label": "cold boot to READY", "value": round(med("cold_ready_ms"), 3), "unit": "ms"}
        dd = {"label": "dd conv=fsync of the same bytes", "value": round(med("dd_ms"), 3), "unit": "ms"}
        stat = f"median of {RUNS}"
        p = f"snapshot.{total}mib"
        figures += [
            figure(f"{p}.snapshot_total", f"{total} MiB device: coordinated snapshot, total", med("snapshot_ms"), "ms",
                   stat, dd, med("snapshot_ms") / med("dd_ms"), samples=[r["snapshot_ms"] for r in runs]),
            figure(f"{p}.downtime", f"{total} MiB device: snapshot downtime (partitions paused)", med("downtime_ms"), "ms",
                   stat, dd, med("downtime_ms") / med("dd_ms"), samples=[r["downtime_ms"] for r in runs]),
            figure(f"{p}.bytes_written", f"{total} MiB device: snapshot bytes written", med("bytes") / 1e6, "MB", stat),
            figure(f"{p}.dd_fsync", f"{total} MiB device: dd conv=fsync of the snapshot's bytes (baseline)", med("dd_ms"), "ms",
                   stat, samples=[r["dd_ms"] for r in runs]),
            figure(f"{p}.restore_verify", f"{total} MiB device: restore, verify (new process, alongside the build)",
                   med("restore_verify_ms"), "ms", stat),
            figure(f"{p}.restore_to_running", f"{total} MiB device: restore to running (build + resume, new process)",
                   med("restore_to_running_ms"), "ms", stat),
            figure(f"{p}.restore_total", f"{total} MiB device: whole restore in a new process (open + verify + build + resume)",
                   med("restore_total_ms"), "ms", stat, goal="<= 10 ms", samples=[r["restore_total_ms"] for r in runs]),
            figure(f"{p}.restore_ready", f"{total} MiB device: snapshot reboot to READY (spawn of duplex run --restore)",
                   med("restore_ready_ms"), "ms", stat, cold, med("cold_ready_ms") / med("restore_ready_ms"),
                   goal=">= 20x faster than cold boot", ratio_meaning="baseline / value",
                   samples=[r["restore_ready_ms"] for r in runs]),
            figure(f"{p}.cold_ready", f"{total} MiB device: cold boot to READY (baseline)", med("cold_ready_ms"), "ms",
                   stat, samples=[r["cold_ready_ms"] for r in runs]),
            figure(f"{p}.reboot_in_place", f"{total} MiB device: reboot in place (duplex ctl reboot --from SET), total",
                   reboot_med, "ms", f"median of {len(reboots)}", cold, med("cold_ready_ms") / reboot_med,
                   ratio_meaning="baseline / value", best=round(reboot_best, 3),
                   compare={"label": "whole restore in a new process", "value": round(med("restore_total_ms"), 3),
                            "unit": "ms"}, samples=reboots),
        ]
        if reboot_down is not None:
            figures.append(figure(f"{p}.reboot_in_place_downtime",
                                  f"{total} MiB device: reboot in place, device stopped (reply downtime_ms)",
                                  reboot_down, "ms", f"median of {len(downs)}", samples=downs))
        sizes.append({"device_mib": total, "touched_mib": 64, "runs": RUNS, "reboots": len(reboots),
                      **{k: round(med(k), 3) for k in ("snapshot_ms", "downtime_ms", "bytes", "dd_ms",
                                                       "restore_verify_ms", "restore_to_running_ms",
                                                       "restore_total_ms", "restore_ready_ms", "cold_ready_ms")},
                      "reboot_ms": round(reboot_med, 3), "reboot_best_ms": round(reboot_best, 3),
                      "reboot_downtime_ms": None if reboot_down is None else round(reboot_down, 3),
                      "snapshot_phases_last": runs[-1]["phases"], "reboot_phases_last": runs[-1]["reboot_phases"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "snapshot", "script": "scripts/bench_snapshot.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": RUNS, "figures": figures, "sizes": sizes}, f, indent=1)


if __name__ == "__main__":
    main()
