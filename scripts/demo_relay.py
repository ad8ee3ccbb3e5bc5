#!/usr/bin/env python3
"""The relay scene `./scripts/demo --relay` plays (Python 3, standard library only).

1. the network (scripts/relay-net): a LAN with the relay's TAP behind a firewall that
   lets connections out and none in, and a WAN with the mediation server (10.77.0.2) and
   the cloud server (10.77.0.3); checked: the WAN cannot connect into the LAN;
2. the servers: `duplex-mediator serve` and `duplex-cloud serve` in the WAN, with the
   demo keys and registry of examples/relay/;
3. the device (examples/device-with-relay.json, rewritten into the work folder): engine,
   controller and relay partitions, the monitor in the LAN namespace; the relay logs in
   to the mediator (its console says `session up`);
4. a cloud job (`duplex-cloud submit`): the cloud asks the mediator for a tunnel, the
   mediator asks the relay, the relay dials the cloud, the job is printed by the engine
   and its checksums come back and are checked; the cloud sees the tunnel closed;
5. a second job: a new tunnel (another tunnel id), printed and checked;
6. a coordinated snapshot of the device and a reboot in place from it: the relay notices,
   logs in again;
7. a third job goes through a new tunnel;
8. everything is stopped and the network removed.

The last line of stdout is one JSON object, `{"demo":"relay","jobs_done":3,...}` or
`{"demo":"failed","step":...,"error":...}` (exit status 1). Child pids are written to
WORK/*.pid and the namespace prefix to WORK/netns, so the calling script can clean up
whatever happens to this process.

    python3 scripts/demo_relay.py --work DIR [--bin target/release]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from demo_scene import write_device_config  # noqa: E402
DEVICE_ID = "mfp-1"


class Failed(Exception):
    def __init__(self, step, error):
        super().__init__(f"{step}: {error}")
        self.step, self.error = step, error


class Interrupted(Exception):
    pass


class Scene:
    def __init__(self, work, bin_dir):
        self.work, self.bin = work, bin_dir
        self.prefix = f"dm{os.getpid() % 100000:05d}"
        self.procs = {}
        self.step = "setup"
        self.api = os.path.join(work, "api.sock")
        self.result = {"tunnel_ids": [], "tunnel_up_ms": [], "job_ms": []}
        self.net_up = False

    @staticmethod
    def say(msg):
        print(f"demo: {msg}", flush=True)

    def fail(self, error):
        raise Failed(self.step, error)

    def ns(self, side):
        return f"{self.prefix}-{side}"

    def exe(self, name):
        return os.path.join(self.bin, name)

    # -- processes
    def spawn(self, name, side, argv, cwd=None):
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(side), *argv], stdout=log,
                             stderr=subprocess.STDOUT, cwd=cwd or self.work, start_new_session=True)
        log.close()
        self.procs[name] = p
        with open(os.path.join(self.work, f"{name}.pid"), "w") as f:
            f.write(f"{p.pid}\n")
        return p

    def check_alive(self, name):
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            self.fail(f"{name} exited with status {p.returncode}; last lines: {self.tail(name)}")

    def wait_log(self, name, needle, timeout):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            hit = self.log_line(name, needle)
            if hit is not None:
                return hit
            for proc in self.procs:
                self.check_alive(proc)
            time.sleep(0.05)
        self.fail(f"{name} did not print {needle!r} within {timeout} s; last lines: {self.tail(name)}")

    def log_line(self, name, needle, nth=1):
        try:
            with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
                hits = [ln.strip() for ln in f if needle in ln]
        except OSError:
            return None
        return hits[nth - 1] if len(hits) >= nth else None

    def count(self, name, needle):
        try:
            with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
                return sum(needle in ln for ln in f)
        except OSError:
            return 0

    def tail(self, name, n=6):
        try:
            with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
                return [ln.rstrip() for ln in f.readlines()[-n:]]
        except OSError:
            return []

    def run_json(self, argv, timeout, side=None):
        if side is not None:
            argv = ["ip", "netns", "exec", self.ns(side), *argv]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"`{' '.join(argv[-6:])}` did not answer within {timeout} s")
        try:
            return json.loads(r.stdout), r
        except ValueError:
            pass
        try:
            return json.loads(r.stdout.strip().splitlines()[-1]), r
        except (ValueError, IndexError):
            self.fail(f"`{' '.join(argv[-6:])}` printed no JSON (status {r.returncode}): {r.stderr.strip()[-300:]}")

    def ctl(self, *args, timeout=90):
        out, r = self.run_json([self.exe("duplex"), "ctl", "--api-sock", self.api, *args], timeout)
        if r.returncode != 0:
            self.fail(f"duplex ctl {' '.join(args)}: {r.stderr.strip() or out}")
        return out

    # -- steps
    def network(self):
        self.step = "network"
        with open(os.path.join(self.work, "netns"), "w") as f:
            f.write(self.prefix + "\n")
        r = subprocess.run([os.path.join(ROOT, "scripts/relay-net"), "up", self.prefix, "--taps", "1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.fail(f"scripts/relay-net up: {r.stderr.strip()}")
        self.net_up = True
        self.say(f"1. network: {self.ns('lan')} (LAN 10.77.1.0/24, TAP dxtap0, firewall) and "
                 f"{self.ns('wan')} (mediator 10.77.0.2, cloud 10.77.0.3)")
        # The firewall: from the WAN, a connection to the LAN host times out.
        listener = subprocess.Popen(["ip", "netns", "exec", self.ns("host"), "python3", "-c",
                                     "import socket,time;s=socket.socket();s.bind(('10.77.1.2',7000));"
                                     "s.listen();time.sleep(4)"])
        time.sleep(0.3)
        probe = subprocess.run(["ip", "netns", "exec", self.ns("wan"), "python3", "-c",
                                "import socket;s=socket.socket();s.settimeout(1)\n"
                                "try:\n s.connect(('10.77.1.2',7000));print('open')\n"
                                "except OSError as e:\n print('blocked')"],
                               capture_output=True, text=True)
        listener.kill()
        listener.wait()
        verdict = probe.stdout.strip()
        if verdict != "blocked":
            self.fail(f"the firewall let a WAN connection into the LAN ({verdict!r})")
        self.result["wan_to_lan"] = "blocked"
        self.say("   firewall: a connection from the WAN to a LAN host (10.77.1.2:7000) is dropped")

    def servers(self):
        self.step = "servers"
        for name in ("mediator.json", "cloud.json", "keys"):
            src = os.path.join(ROOT, "examples/relay", name)
            dst = os.path.join(self.work, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy(src, dst)
        self.spawn("mediator", "wan", [self.exe("duplex-mediator"), "serve", "--config", os.path.join(self.work, "mediator.json")])
        self.wait_log("mediator", "listening relays=", 30)
        self.spawn("cloud", "wan", [self.exe("duplex-cloud"), "serve", "--config", os.path.join(self.work, "cloud.json")])
        self.wait_log("cloud", "listening tunnels=", 30)
        self.say(f"2. servers: {self.log_line('mediator', 'listening')} ; {self.log_line('cloud', 'listening')}")

    def device(self):
        self.step = "device"
        path, cfg = write_device_config(self.work, "device-with-relay.json")
        t0 = time.monotonic()
        self.spawn("monitor", "lan", [self.exe("duplex"), "run", "--config", path, "--api-sock", self.api])
        parts = ", ".join(p["name"] for p in cfg["partitions"])
        self.say(f"3. device {cfg.get('device')}: {parts}; the monitor runs in {self.ns('lan')}")
        up = self.wait_log("relay", "session up", 120)
        ms = (time.monotonic() - t0) * 1000
        self.result["relay_login_ms"] = round(ms)
        self.say(f"   relay: \"{up}\" {ms:.0f} ms after the spawn")

    def job(self, n, pages, seed, label):
        self.step = f"job_{n}"
        before = len(self.result["tunnel_ids"])
        out, r = self.run_json([self.exe("duplex-cloud"), "submit", "--device", DEVICE_ID, "--pages", str(pages),
                                "--seed", str(seed), "--timeout-s", "90"], 120, side="wan")
        if out.get("state") != "done" or not out.get("checksums_ok"):
            self.fail(f"the cloud job did not finish well: {out}")
        if len(out.get("checksums", [])) != pages:
            self.fail(f"{len(out.get('checksums', []))} checksums for {pages} pages: {out}")
        tid = out.get("tunnel_id")
        if tid in self.result["tunnel_ids"]:
            self.fail(f"job {n} reused tunnel {tid}: every job should get a new one")
        self.result["tunnel_ids"].append(tid)
        self.result["tunnel_up_ms"].append(out["timings_ms"]["tunnel_up"])
        self.result["job_ms"].append(out["timings_ms"]["total"])
        self.say(f"{label}. cloud job {out['job_id']} ({pages} pages, seed {seed}): {out['state']}, "
                 f"checksums checked, tunnel {tid} up in {out['timings_ms']['tunnel_up']} ms, "
                 f"{out['timings_ms']['total']} ms in all (device job {out['device_job']})")
        # The cloud sees the tunnel closed (the relay answered Close).
        t_end = time.monotonic() + 10
        while True:
            tunnels = self.cloud_tunnels()
            t = next((t for t in tunnels if t.get("tunnel_id") == tid), None)
            if t is not None and t.get("closed_by") == "cloud":
                break
            if time.monotonic() > t_end:
                self.fail(f"the cloud does not see tunnel {tid} closed: {t}")
            time.sleep(0.1)
        self.wait_log("relay", f"tunnel {tid} closed", 10)
        self.say(f"   tunnel {tid} closed (cloud: closed_by=cloud; relay: \"{self.log_line('relay', f'tunnel {tid} closed')}\")")
        assert len(self.result["tunnel_ids"]) == before + 1
        return out

    def cloud_tunnels(self):
        r = subprocess.run(["ip", "netns", "exec", self.ns("wan"), "python3", "-c",
                            "import urllib.request,sys;"
                            "print(urllib.request.urlopen('http://127.0.0.1:9080/v1/tunnels',timeout=5).read().decode())"],
                           capture_output=True, text=True, timeout=15)
        try:
            return json.loads(r.stdout)["tunnels"]
        except (ValueError, KeyError):
            self.fail(f"the cloud's /v1/tunnels: {r.stdout.strip()[:200]} {r.stderr.strip()[-200:]}")

    def snapshot_reboot(self):
        self.step = "snapshot_reboot"
        logins = self.count("relay", "session up")
        snap = self.ctl("snapshot", os.path.join(self.work, "set"))
        reboot = self.ctl("reboot", "--from", os.path.join(self.work, "set"))
        self.say(f"6. coordinated snapshot of engine, controller and relay "
                 f"({snap.get('timings_ms', {}).get('total', '?')} ms), reboot in place from it "
                 f"({reboot.get('timings_ms', {}).get('total', '?')} ms)")
        t_end = time.monotonic() + 60
        while self.count("relay", "session up") <= logins:
            if time.monotonic() > t_end:
                self.fail(f"the relay did not log in again after the reboot; last lines: {self.tail('relay')}")
            self.check_alive("monitor")
            time.sleep(0.05)
        restored = self.log_line("relay", "restored")
        self.say(f"   relay: \"{restored}\", then \"{self.log_line('relay', 'session up', logins + 1)}\"")
        self.result["relogin_after_restore"] = True

    def stop(self):
        # The monitor first (over its control socket), then the servers.
        p = self.procs.get("monitor")
        if p is not None and p.poll() is None:
            try:
                subprocess.run([self.exe("duplex"), "ctl", "--api-sock", self.api, "shutdown"],
                               capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name, p in self.procs.items():
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if p.poll() is not None:
                    break
                if sig is not None:
                    p.send_signal(sig)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    continue
        self.procs = {}
        if self.net_up:
            subprocess.run([os.path.join(ROOT, "scripts/relay-net"), "down", self.prefix], capture_output=True)
            self.net_up = False


def run_scene(doc, make_scene, play, logs, tmp_prefix):
    """What every relay scene's main does: parse --work/--bin, run `play(scene)` on
    `make_scene(work, bin)`, report any failure with the last lines of `logs`, stop
    everything, and print the one JSON line `play` returned (or the failure's)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"),
                    help="folder of duplex, duplex-mediator and duplex-cloud")
    args = ap.parse_args()
    own = args.work is None
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix=tmp_prefix))

    def on_signal(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    scene = make_scene(work, os.path.abspath(args.bin))
    status, final = 0, None
    try:
        final = play(scene)
    except (Failed, Interrupted, KeyboardInterrupt, Exception) as e:  # noqa: B902 - every failure is reported
        if isinstance(e, Failed):
            step, error = e.step, e.error
        elif isinstance(e, (Interrupted, KeyboardInterrupt)):
            step, error, status = scene.step, f"interrupted ({e or 'SIGINT'})", 130
        else:
            step, error = scene.step, f"{type(e).__name__}: {e}"
        status = status or 1
        print(f"demo: FAILED at step {step}: {error}", flush=True)
        for name in logs:
            lines = scene.tail(name)
            if lines:
                print(f"demo:   last lines of {name}.log:", flush=True)
                for ln in lines:
                    print(f"demo:     {ln}", flush=True)
        final = {"demo": "failed", "step": step, "error": error}
    finally:
        scene.stop()
        if own and not os.environ.get("DUPLEX_DEMO_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(final, separators=(",", ":")), flush=True)
    return status


def play(scene):
    scene.network()
    scene.servers()
    scene.device()
    scene.job(1, 5, 7, 4)
    scene.job(2, 3, 8, 5)
    scene.snapshot_reboot()
    scene.job(3, 2, 9, 7)
    scene.step = "shutdown"
    scene.stop()
    scene.say("8. monitor and servers stopped, network removed")
    r = scene.result
    return {"demo": "relay", "jobs_done": 3, "tunnels_opened": len(set(r["tunnel_ids"])),
            "tunnel_ids": r["tunnel_ids"], "tunnel_up_ms": r["tunnel_up_ms"], "job_ms": r["job_ms"],
            "relay_login_ms": r["relay_login_ms"], "wan_to_lan": r["wan_to_lan"],
            "relogin_after_restore": r["relogin_after_restore"], "checksums_ok": True}


def main():
    return run_scene(__doc__, Scene, play, ("monitor", "relay", "mediator", "cloud", "controller"),
                     "duplex-demo-relay.")


if __name__ == "__main__":
    sys.exit(main())
