#!/usr/bin/env python3
"""Snapshot / restore benchmark (run by scripts/bench).

For the reference device (engine + controller) at 128 MiB, 512 MiB and 1 GiB in total,
with about 64 MiB touched (the engine calibrates 60 MiB): a coordinated snapshot (total
time, downtime, bytes written), a `dd ... conv=fsync` of the same byte count into the same
folder (the baseline, same run), restore-to-running of a new process from the set (the
monitor's own timings: verify, then build+resume), and snapshot reboot to READY (spawn of
`duplex run --restore` until the control socket answers, restored) next to cold boot to
READY (spawn of `duplex run` until both partitions print READY).
"""
import json, os, socket, statistics, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLEX = os.path.join(ROOT, "target/release/duplex")
GUESTS = os.path.join(ROOT, "guests/target/x86_64-unknown-none/release")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


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
        out["restore_to_running_ms"] = timings["restore"] + timings["resume"]
        out["restore_total_ms"] = timings["total"]
    return out


def main():
    for total in (128, 512, 1024):
        runs = [one(total) for _ in range(RUNS)]
        med = lambda k: statistics.median(r[k] for r in runs)
        print(f"{total} MiB device (~64 MiB touched): snapshot {med('snapshot_ms'):.0f} ms "
              f"(downtime {med('downtime_ms'):.0f} ms), {med('bytes') / 1e6:.1f} MB written; "
              f"dd of the same bytes with fsync {med('dd_ms'):.0f} ms "
              f"(snapshot = {med('snapshot_ms') / med('dd_ms'):.2f} x dd)")
        print(f"    phases (last run): {json.dumps(runs[-1]['phases'])}")
        print(f"    restore: verify {med('restore_verify_ms'):.1f} ms (new process: alongside the build), to running {med('restore_to_running_ms'):.1f} ms, "
              f"whole restore (open + verify + build + resume) {med('restore_total_ms'):.1f} ms (goal <= 10 ms); snapshot reboot to READY {med('restore_ready_ms'):.0f} ms vs cold boot to READY "
              f"{med('cold_ready_ms'):.0f} ms = {med('cold_ready_ms') / med('restore_ready_ms'):.1f}x faster (goal >= 20x)")


if __name__ == "__main__":
    main()
