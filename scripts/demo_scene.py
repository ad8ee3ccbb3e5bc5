#!/usr/bin/env python3
"""The scene `./scripts/demo` plays (Python 3, standard library only).

1. cold boot of the reference device (examples/device.json, rewritten into the work
   folder: consoles to files, its own vsock bridge socket and control socket there);
   cold_boot_ms = spawn of `duplex run` until the controller reports the engine READY
   (`duplex job ... engine` polled);
2. a short print job (5 pages, seed 7), its checksums checked against the host's own
   computation of the pages (the Python of docs/print-pipeline.md);
3. a long job (300 pages of 512x512, about 1.5 s of printing here) left printing; once some pages are out, a coordinated snapshot
   of the device (`duplex ctl snapshot`), the job goes on a bit, then the whole device
   reboots in place from the set (`duplex ctl reboot --from`): the job goes on from the
   cut and finishes exactly once (300 checksums equal to a fresh reference run of the
   same job and to the host's computation of the pages around the cut; the engine's page
   counter = pages before the job + 300);
4. shutdown of the monitor.

Each step prints one or a few `demo:` lines; the last line of stdout is one JSON object,
`{"demo":"done",...}` or `{"demo":"failed","step":...,"error":...}` (exit status 1;
130 when interrupted). The monitor's pid is written to WORK/monitor.pid so that the
calling script can stop it whatever happens to this process.

    python3 scripts/demo_scene.py [--work DIR] [--duplex PATH] [--pages 300] [--seed 11] [--size 512]
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the host's own computation of a page checksum (docs/print-pipeline.md) -------------
M64 = (1 << 64) - 1


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _page_raster(seed, page, w, h):
    state, out = (seed ^ (page * 0xD1B54A32D192ED03)) & M64, bytearray()
    wd, hd = max(w, 2) - 1, max(h, 2) - 1
    r = 0
    for y in range(h):
        dark = (y // 8) % 4 == page % 4
        for x in range(w):
            if x % 8 == 0:
                state = (state + 0x9E3779B97F4A7C15) & M64
                r = _mix64(state)
            v = (x * 255 // wd + y * 255 // hd) // 2 + (((r >> (8 * (x % 8))) & 0xFF) >> 2) - 32
            v = min(max(v, 0), 255)
            out.append(v // 2 if dark else v)
    return bytes(out)


def _halftone(raster, w, h, g):
    def tdiv(a):
        return abs(a) // 16 * (1 if a >= 0 else -1)
    stride = (w + 7) // 8
    out, cur = bytearray(stride * h), [0] * (w + 2)
    for y in range(h):
        nxt = [0] * (w + 2)
        for x in range(w):
            v = g[raster[y * w + x]] + cur[x + 1]
            if v < 128:
                out[y * stride + x // 8] |= 0x80 >> (x % 8)
                e = v
            else:
                e = v - 255
            e7, e3, e5 = tdiv(e * 7), tdiv(e * 3), tdiv(e * 5)
            cur[x + 2] += e7
            nxt[x] += e3
            nxt[x + 1] += e5
            nxt[x + 2] += e - e7 - e3 - e5
        cur = nxt
    return bytes(out)


_GAMMA = [math.isqrt(v * 255) for v in range(256)]


def expected_page_checksum(seed, page, w=256, h=256):
    return zlib.crc32(_halftone(_page_raster(seed, page, w, h), w, h, _GAMMA))


# --- the scene ---------------------------------------------------------------------------
def write_device_config(work, example):
    """examples/<example> rewritten into `work`: kernels by absolute path, consoles to
    <name>.log files, the controller's vsock bridge socket and the snapshot set in `work`.
    Returns (path, config)."""
    with open(os.path.join(ROOT, "examples", example)) as f:
        cfg = json.load(f)
    for p in cfg["partitions"]:
        p["kernel"] = os.path.normpath(os.path.join(ROOT, "examples", p["kernel"]))
        p["console"] = {"file": f"{p['name']}.log"}
        if "uds" in p.get("vsock", {}):
            p["vsock"]["uds"] = "controller.vsock"
    cfg["snapshot"] = {"dir": "set"}
    path = os.path.join(work, "device.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path, cfg


class Failed(Exception):
    def __init__(self, step, error):
        super().__init__(f"{step}: {error}")
        self.step, self.error = step, error


class Interrupted(Exception):
    pass


def phases(timings):
    """`copy 50, quiesce 32, ...`: a reply's timings_ms without its total."""
    order = ["copy", "quiesce", "pause", "capture", "write", "resume", "commit", "fsync", "rename",
             "open", "verify", "build", "restore", "switch"]
    keys = sorted((k for k in timings if k != "total"), key=lambda k: (order.index(k) if k in order else 99, k))
    return ", ".join(f"{k} {timings[k]:.{2 if timings[k] < 1 else 1 if timings[k] < 10 else 0}f}" for k in keys)


def hexes(sums, limit=6):
    s = " ".join(f"{c:08x}" for c in sums[:limit])
    return s + (f" ... ({len(sums)} in all)" if len(sums) > limit else "")


class Scene:
    def __init__(self, work, duplex, pages, seed, size):
        self.work, self.duplex, self.pages, self.seed, self.size = work, duplex, pages, seed, size
        self.proc = None
        self.step = "setup"
        self.api = os.path.join(work, "api.sock")
        self.uds = os.path.join(work, "controller.vsock")
        self.set_dir = os.path.join(work, "set")
        self.monitor_log = os.path.join(work, "monitor.log")
        self.result = {}

    # -- helpers
    @staticmethod
    def say(msg):
        print(f"demo: {msg}", flush=True)

    def fail(self, error):
        raise Failed(self.step, error)

    def check_alive(self, grace=0.0, why=None):
        """Fails the step if the monitor has exited (waiting up to `grace` seconds for it)."""
        if self.proc is None:
            return
        try:
            rc = self.proc.wait(timeout=grace) if grace else self.proc.poll()
        except subprocess.TimeoutExpired:
            rc = None
        if rc is not None:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            self.fail(f"the monitor {how}" + (f" ({why})" if why else ""))

    def _run(self, argv, timeout):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"`{' '.join(argv[1:4])} ...` did not answer within {timeout} s")
        if r.returncode != 0:
            return None, (r.stderr.strip() or f"exit status {r.returncode}")
        try:
            return json.loads(r.stdout), None
        except ValueError:
            return None, f"not JSON: {r.stdout.strip()[:200]!r}"

    def job(self, *args, timeout=60, may_fail=False):
        out, err = self._run([self.duplex, "job", "--vsock", self.uds, *args], timeout)
        if err is not None and not may_fail:
            self.check_alive(0.5, err)
            self.fail(f"duplex job {' '.join(args)}: {err}")
        return out

    def ctl(self, *args, timeout=90):
        out, err = self._run([self.duplex, "ctl", "--api-sock", self.api, *args], timeout)
        if err is not None:
            self.check_alive(0.5, err)
            self.fail(f"duplex ctl {' '.join(args)}: {err}")
        return out

    def console(self, name, needle):
        """The last line of partition `name`'s console file that contains needle, or None."""
        try:
            with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
                hits = [ln.strip() for ln in f if needle in ln]
        except OSError:
            return None
        return hits[-1] if hits else None

    def job_status(self, job_id):
        j = self.job("status", str(job_id))
        if not isinstance(j, dict) or j.get("id") != job_id:
            self.fail(f"job {job_id} is unknown to the controller: {j}")
        return j

    def wait_job(self, job_id, until, timeout, what):
        t_end = time.monotonic() + timeout
        while True:
            j = self.job_status(job_id)
            if until(j):
                return j
            if j["state"] == "failed":
                self.fail(f"job {job_id} failed: {j.get('error')}")
            if time.monotonic() > t_end:
                self.fail(f"job {job_id} {what} within {timeout} s (at {j['pages_done']}/{j['pages']} pages, {j['state']})")
            self.check_alive()
            time.sleep(0.002)

    # -- the config
    def write_config(self):
        return write_device_config(self.work, "device.json")

    # -- steps
    def cold_boot(self):
        self.step = "cold_boot"
        cfg_path, cfg = self.write_config()
        parts = ", ".join(f"{p['name']} ({p['memory_mib']} MiB)" for p in cfg["partitions"])
        self.say(f"work folder {self.work} (device config, consoles, control and vsock sockets, snapshot set)")
        self.say(f"1. cold boot of {cfg.get('device')}: {parts}")
        log = open(self.monitor_log, "w")
        t0 = time.monotonic()
        # A session of its own: a Ctrl-C on the terminal reaches this script, which then
        # shuts the monitor down in order.
        self.proc = subprocess.Popen([self.duplex, "run", "--config", cfg_path, "--api-sock", self.api],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
                                     start_new_session=True)
        log.close()
        with open(os.path.join(self.work, "monitor.pid"), "w") as f:
            f.write(f"{self.proc.pid}\n")
        t_end = t0 + 60
        last = None
        while True:
            e = self.job("engine", timeout=10, may_fail=True)
            if e is not None:
                last = e
                if e.get("state") in ("ready", "printing"):
                    break
            self.check_alive()
            if time.monotonic() > t_end:
                self.fail(f"the controller did not report the engine READY within 60 s (last answer: {last})")
            time.sleep(0.005)
        cold = (time.monotonic() - t0) * 1000
        self.result["cold_boot_ms"] = round(cold, 1)
        calib = self.console("engine", "calibrated")
        self.say(f"   the controller reports the engine READY {cold:.0f} ms after the spawn of duplex run"
                 + (f" (engine console: \"{calib}\")" if calib else ""))

    def short_job(self):
        self.step = "short_job"
        self.say("2. print job: 5 pages, seed 7 (duplex job submit --pages 5 --seed 7 --wait)")
        t0 = time.monotonic()
        j = self.job("submit", "--pages", "5", "--seed", "7", "--wait")
        ms = (time.monotonic() - t0) * 1000
        if j.get("state") != "done" or j.get("pages_done") != 5 or len(j.get("checksums", [])) != 5:
            self.fail(f"job not done: {j}")
        expected = [expected_page_checksum(7, p) for p in range(5)]
        if j["checksums"] != expected:
            self.fail(f"checksums {hexes(j['checksums'])} differ from the host's {hexes(expected)}")
        self.result["short_job_ms"] = round(ms, 1)
        self.say(f"   job {j['id']} {j['state']}: {j['pages_done']}/{j['pages']} pages in {ms:.0f} ms, "
                 f"checksums {hexes(j['checksums'])} = the host's recomputation")

    def long_job(self):
        self.step = "long_job"
        pages, seed, size = self.pages, self.seed, self.size
        geometry = ["--width", str(size), "--height", str(size)]
        before = self.job("engine")["pages_printed"]
        self.result["engine_pages_before"] = before
        j = self.job("submit", "--pages", str(pages), "--seed", str(seed), *geometry)
        jid = j["id"]
        self.say(f"3. long job {jid}: {pages} pages of {size}x{size}, seed {seed}, submitted without waiting "
                 f"(engine page counter {before})")
        early = max(1, pages // 10)
        j = self.wait_job(jid, lambda j: j["pages_done"] >= early, 60, f"printed no {early} pages")

        self.step = "snapshot"
        snap = self.ctl("snapshot", self.set_dir)
        q = snap.get("quiesce") or {}
        safe = q.get("engine_pages_printed", before) - before
        after_snap = self.job_status(jid)
        t = snap["timings_ms"]
        self.result.update(snapshot_ms=t["total"], downtime_ms=snap["downtime_ms"],
                           snapshot_bytes=snap["bytes_written"], safe_point_page=safe, set_id=snap["set_id"])
        self.say(f"   at page {j['pages_done']}/{pages}: snapshot of the whole device: {t['total']:.0f} ms, "
                 f"device paused {snap['downtime_ms']:.1f} ms ({phases(t)}), {snap['bytes_written'] / 1e6:.1f} MB; "
                 f"the engine's safe point at page {safe}, the job at page {after_snap['pages_done']} when it returned")

        self.step = "go_on"
        goal = min(pages, after_snap["pages_done"] + max(1, pages // 6))
        j = self.wait_job(jid, lambda j: j["pages_done"] >= goal or j["state"] == "done", 60,
                          f"did not reach page {goal}")
        went_on = j["pages_done"]
        self.result["pages_before_reboot"] = went_on
        self.say(f"   the job went on to page {went_on}/{pages} ({j['state']})")

        self.step = "reboot"
        t0 = time.monotonic()
        rb = self.ctl("reboot", "--from", self.set_dir)
        after = self.job_status(jid)
        e = self.job("engine")
        ready_ms = (time.monotonic() - t0) * 1000
        if rb.get("set_id") != snap["set_id"]:
            self.fail(f"rebooted from set {rb.get('set_id')}, not the snapshot's {snap['set_id']}")
        st = self.ctl("status")
        if (st.get("restored_from") or {}).get("set_id") != snap["set_id"]:
            self.fail(f"status does not show the device restored from the set: {st.get('restored_from')}")
        if e.get("state") not in ("ready", "printing"):
            self.fail(f"the engine is not ready after the reboot: {e}")
        t = rb["timings_ms"]
        resumed = after["pages_done"]
        self.result.update(reboot_ms=t["total"], reboot_ready_ms=round(ready_ms, 1), resumed_at_page=resumed)
        if "downtime_ms" in rb:
            self.result["reboot_downtime_ms"] = rb["downtime_ms"]
        stopped = f", device stopped {rb['downtime_ms']:.1f} ms" if "downtime_ms" in rb else ""
        self.say(f"   reboot in place from the set: {t['total']:.1f} ms ({phases(t)}{stopped}); engine and job "
                 f"answering {ready_ms:.0f} ms after the request, vs {self.result['cold_boot_ms']:.0f} ms cold boot to READY")
        undone = (f"; pages {resumed + 1}-{went_on}, printed after the cut, were undone with the rest of its state"
                  if resumed < went_on else "")
        self.say(f"   right after the reboot the job is at page {resumed}/{pages} ({after['state']}): "
                 f"the device went back to the cut{undone}")

        self.step = "finish"
        j = self.wait_job(jid, lambda j: j["state"] == "done", 120, "did not finish")
        e = self.job("engine")
        self.result["engine_pages"] = e["pages_printed"]

        self.step = "exactly_once"
        problems = []
        if j["pages_done"] != pages or len(j["checksums"]) != pages:
            problems.append(f"{j['pages_done']} pages done, {len(j['checksums'])} checksums, not {pages}")
        if e["pages_printed"] != before + pages:
            problems.append(f"engine page counter {e['pages_printed']} != {before} + {pages}")
        self.say(f"   job {jid} {j['state']}: {j['pages_done']}/{pages} pages, {len(j['checksums'])} checksums; "
                 f"engine page counter {e['pages_printed']} = {before} + {pages}"
                 + ("" if e["pages_printed"] == before + pages else "  <-- WRONG"))
        if problems:
            self.fail("; ".join(problems))
        # Reference: the same job again, from scratch, on the running device.
        ref = self.job("submit", "--pages", str(pages), "--seed", str(seed), *geometry, "--wait", timeout=300)
        if ref.get("state") != "done" or ref.get("checksums") != j["checksums"]:
            diff = [i for i, (a, b) in enumerate(zip(j["checksums"], ref.get("checksums", []))) if a != b]
            self.fail(f"checksums differ from a fresh run of the same job ({ref.get('state')}; "
                      f"pages differing: {diff[:10]})")
        # And the host's own computation of the pages around the safe point and the cut.
        check = sorted({p for p in (resumed - 1, resumed, pages - 1) if 0 <= p < pages})
        bad = [p for p in check if j["checksums"][p] != expected_page_checksum(seed, p, size, size)]
        if bad:
            self.fail(f"pages {bad}: checksums differ from the host's computation")
        self.result.update(exactly_once=True, reference_job=ref["id"], host_checked_pages=check)
        self.say(f"   exactly once: the {pages} checksums equal those of job {ref['id']}, the same job printed "
                 f"again from scratch, and the host's recomputation of pages {', '.join(map(str, check))}")

    def shutdown(self):
        """Stops the monitor (shutdown over the control socket, then SIGTERM, SIGKILL)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return p.returncode if p is not None else None
        try:
            subprocess.run([self.duplex, "ctl", "--api-sock", self.api, "shutdown"],
                           capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                p.send_signal(sig)
            try:
                return p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
        return None

    def tail(self, path, n=8):
        try:
            with open(path, errors="replace") as f:
                return [ln.rstrip() for ln in f.readlines()[-n:]]
        except OSError:
            return []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--duplex", default=os.path.join(ROOT, "target/release/duplex"))
    ap.add_argument("--pages", type=int, default=300, help="pages of the long job (default 300)")
    ap.add_argument("--seed", type=int, default=11, help="seed of the long job (default 11)")
    ap.add_argument("--size", type=int, default=512,
                    help="page width and height of the long job (default 512: about 1.5 s of printing here)")
    args = ap.parse_args()
    own = args.work is None
    work = args.work or tempfile.mkdtemp(prefix="duplex-demo.")

    signalled = []

    def on_signal(signum, _frame):
        if signalled:  # once is enough: the scene is already stopping
            return
        signalled.append(signum)
        raise Interrupted(signal.Signals(signum).name)
    # SIGINT too: the calling script runs this in the background, where SIGINT starts ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    scene = Scene(os.path.abspath(work), os.path.abspath(args.duplex), args.pages, args.seed, args.size)
    status, final = 0, None
    try:
        scene.cold_boot()
        scene.short_job()
        scene.long_job()
        scene.step = "shutdown"
        rc = scene.shutdown()
        if rc != 0:
            raise Failed("shutdown", f"the monitor exited with status {rc}")
        scene.say(f"4. monitor shut down (exit status {rc})")
        r = scene.result
        final = {"demo": "done", "snapshot_ms": r["snapshot_ms"], "downtime_ms": r["downtime_ms"],
                 "reboot_ms": r["reboot_ms"], "cold_boot_ms": r["cold_boot_ms"], "job_pages": args.pages,
                 "engine_pages": r["engine_pages"], "exactly_once": r["exactly_once"],
                 "job_page_size": f"{args.size}x{args.size}",
                 "reboot_ready_ms": r["reboot_ready_ms"], "reboot_downtime_ms": r.get("reboot_downtime_ms"),
                 "cold_boot_over_reboot": round(r["cold_boot_ms"] / r["reboot_ms"], 1),
                 "snapshot_bytes": r["snapshot_bytes"], "engine_pages_before": r["engine_pages_before"],
                 "safe_point_page": r["safe_point_page"], "pages_before_reboot": r["pages_before_reboot"],
                 "resumed_at_page": r["resumed_at_page"], "host_checked_pages": r["host_checked_pages"],
                 "short_job_ms": r["short_job_ms"], "set_id": r["set_id"]}
    except (Failed, Interrupted, KeyboardInterrupt, Exception) as e:  # noqa: B902 - every failure is reported
        if isinstance(e, Failed):
            step, error = e.step, e.error
        elif isinstance(e, (Interrupted, KeyboardInterrupt)):
            step, error, status = scene.step, f"interrupted ({e or 'SIGINT'})", 130
        else:
            step, error = scene.step, f"{type(e).__name__}: {e}"
        status = status or 1
        print(f"demo: FAILED at step {step}: {error}", flush=True)
        for name in ("monitor", "engine", "controller"):
            lines = scene.tail(os.path.join(scene.work, f"{name}.log"))
            if lines:
                print(f"demo:   last lines of {name}.log:", flush=True)
                for ln in lines:
                    print(f"demo:     {ln}", flush=True)
        try:
            scene.shutdown()
        except Exception as e2:  # noqa: B902
            print(f"demo: stopping the monitor: {e2}", flush=True)
        final = {"demo": "failed", "step": step, "error": error}
    finally:
        if scene.proc is not None:  # an exception escaped the handler above
            scene.shutdown()
        if own and not os.environ.get("DUPLEX_DEMO_KEEP"):
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(final, separators=(",", ":")), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
