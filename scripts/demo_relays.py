#!/usr/bin/env python3
"""The substitute-relay scene `./scripts/demo --relays` plays (Python 3, standard library).

1. the network (scripts/relay-net --taps 2): one LAN (segment `lan-1`) holding both relays'
   TAPs behind the firewall, and the WAN with the mediation server and the cloud server;
2. the servers (examples/relay/: the registry lists relay-a for device mfp-a and relay-b
   for device mfp-b);
3. the device (examples/device-with-relays.json): engine, controller, relay-a and relay-b;
   both relays log in;
4. relay-b has nothing to do for 3 s (`sleep_idle_ms=3000`): it registers a lease with the
   mediator (its devices, MAC, segment), closes its session and sleeps. The monitor shows
   it `sleeping`, the mediator `sleeping`, and its vCPU uses no CPU;
5. a cloud job for mfp-b: relay-b has no session, so the mediator asks relay-a (awake, on
   the same segment) to wake it; relay-a broadcasts relay-b's magic packet on the LAN; the
   monitor, reading relay-b's TAP, wakes it (reason `magic packet`); relay-b starts its
   network afresh, logs in, picks the request up, dials the cloud and the job is printed
   through relay-b's own tunnel, checksums checked;
6. everything is stopped and the network removed.

The last line of stdout is one JSON object,
`{"demo":"relays","woken_by":"relay-a","wake_ms":...,"job":"done",...}` or
`{"demo":"failed","step":...,"error":...}` (exit status 1).

    python3 scripts/demo_relays.py --work DIR [--bin target/release]
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from demo_relay import Scene, run_scene  # noqa: E402
from demo_scene import write_device_config  # noqa: E402

MEDIATOR_API = "http://10.77.0.2:8080"
SLEEPER, SUBSTITUTE, DEVICE = "relay-b", "relay-a", "mfp-b"


def unix_ms():
    return int(time.time() * 1000)


class RelaysScene(Scene):
    def __init__(self, work, bin_dir):
        super().__init__(work, bin_dir)
        with open(os.path.join(ROOT, "examples/relay/mediator.json")) as f:
            self.token = json.load(f)["clouds"][0]["token"]

    def network(self):
        self.step = "network"
        with open(os.path.join(self.work, "netns"), "w") as f:
            f.write(self.prefix + "\n")
        r = subprocess.run([os.path.join(ROOT, "scripts/relay-net"), "up", self.prefix, "--taps", "2"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.fail(f"scripts/relay-net up: {r.stderr.strip()}")
        self.net_up = True
        self.say(f"1. network: {self.ns('lan')} (LAN segment lan-1, 10.77.1.0/24, TAPs dxtap0 and dxtap1 "
                 f"on one bridge, firewall) and {self.ns('wan')} (mediator 10.77.0.2, cloud 10.77.0.3)")

    def mediator(self, path):
        """GET a mediator API path from the WAN."""
        code = ("import urllib.request,sys;"
                f"r=urllib.request.Request('{MEDIATOR_API}{path}',headers={{'Authorization':'Bearer {self.token}'}});"
                "print(urllib.request.urlopen(r,timeout=5).read().decode())")
        r = subprocess.run(["ip", "netns", "exec", self.ns("wan"), "python3", "-c", code],
                           capture_output=True, text=True, timeout=15)
        try:
            return json.loads(r.stdout)
        except ValueError:
            self.fail(f"mediator {path}: {r.stdout.strip()[:200]} {r.stderr.strip()[-200:]}")

    def relay_state(self, relay_id):
        relays = self.mediator("/v1/relays").get("relays", [])
        return next((r for r in relays if r.get("relay_id") == relay_id), {})

    def partition(self, name):
        return self.ctl("status", name)["partitions"][0]

    def vcpu_ticks(self, name):
        pid = self.procs["monitor"].pid
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() != f"{name}-vcpu0":
                        continue
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return int(fields[11]) + int(fields[12])
            except OSError:
                continue
        self.fail(f"no vCPU thread for {name} in the monitor")

    def device(self):
        self.step = "device"
        path, cfg = write_device_config(self.work, "device-with-relays.json")
        t0 = time.monotonic()
        self.spawn("monitor", "lan", [self.exe("duplex"), "run", "--config", path, "--api-sock", self.api])
        parts = ", ".join(p["name"] for p in cfg["partitions"])
        self.say(f"3. device {cfg.get('device')}: {parts}; the monitor runs in {self.ns('lan')}")
        for relay in (SUBSTITUTE, SLEEPER):
            up = self.wait_log(relay, "session up", 120)
            self.say(f"   {relay}: \"{up}\" {(time.monotonic() - t0) * 1000:.0f} ms after the spawn")

    def sleep(self):
        self.step = "sleep"
        lease = self.wait_log(SLEEPER, "going to sleep", 60)
        self.wait_log(SLEEPER, "asleep", 10)
        t_end = time.monotonic() + 20
        while (part := self.partition(SLEEPER))["state"] != "sleeping":
            if time.monotonic() > t_end:
                self.fail(f"the monitor does not show {SLEEPER} sleeping: {part}")
            time.sleep(0.1)
        t_end = time.monotonic() + 20
        while (med := self.relay_state(SLEEPER)).get("state") != "sleeping":
            if time.monotonic() > t_end:
                self.fail(f"the mediator does not show {SLEEPER} sleeping: {med}")
            time.sleep(0.1)
        self.say(f"4. {SLEEPER}: \"{lease}\"; monitor: state sleeping since {part['sleep']['sleeping_since_ms']}; "
                 f"mediator: state sleeping, lease {json.dumps(med.get('lease'))}")
        before = self.vcpu_ticks(SLEEPER)
        time.sleep(2)
        ticks = self.vcpu_ticks(SLEEPER) - before
        self.result["asleep_cpu_ticks_2s"] = ticks
        self.say(f"   {SLEEPER}'s vCPU used {ticks} clock ticks of CPU in 2 s asleep")

    def wake_job(self):
        self.step = "wake_job"
        pages, seed = 4, 11
        t0 = unix_ms()
        out, _ = self.run_json([self.exe("duplex-cloud"), "submit", "--device", DEVICE, "--pages", str(pages),
                                "--seed", str(seed), "--timeout-s", "90"], 120, side="wan")
        if out.get("state") != "done" or not out.get("checksums_ok"):
            self.fail(f"the cloud job for {DEVICE} did not finish well: {out}")
        tid = out.get("tunnel_id")
        record = self.mediator(f"/v1/tunnels/{tid}")
        wake = record.get("wake") or {}
        if wake.get("substitute") != SUBSTITUTE or record.get("relay_id") != SLEEPER:
            self.fail(f"tunnel {tid} was not woken through {SUBSTITUTE} for {SLEEPER}: {record}")
        part = self.partition(SLEEPER)
        sleep = part.get("sleep") or {}
        if part["state"] != "running" or sleep.get("wake_reason") != "magic packet":
            self.fail(f"{SLEEPER} is not running woken by its magic packet: {part}")
        sent = self.log_line(SUBSTITUTE, "sent magic packet") or self.log_line(SUBSTITUTE, "waking relay")
        woken = self.log_line(SLEEPER, "woken")
        self.say(f"5. cloud job {out['job_id']} for {DEVICE} ({pages} pages): the mediator asked {SUBSTITUTE}: "
                 f"\"{sent}\"; {SLEEPER}: \"{woken}\"")
        self.say(f"   {SLEEPER} printed it through its own tunnel {tid}: {out['state']}, checksums checked, "
                 f"{out['timings_ms']['total']} ms from the request (device job {out['device_job']})")
        self.result.update({
            "woken_by": wake["substitute"], "wake_ms": sleep["woken_ms"] - t0, "job": out["state"],
            "job_ms": out["timings_ms"]["total"], "tunnel_id": tid, "tunnel_relay": record["relay_id"],
            "wake_reason": sleep["wake_reason"], "wake_attempts": wake.get("attempts"),
        })

    def final(self):
        r = self.result
        return {"demo": "relays", "woken_by": r["woken_by"], "wake_ms": r["wake_ms"], "job": r["job"],
                "job_ms": r["job_ms"], "tunnel_id": r["tunnel_id"], "tunnel_relay": r["tunnel_relay"],
                "wake_reason": r["wake_reason"], "wake_attempts": r["wake_attempts"],
                "asleep_cpu_ticks_2s": r["asleep_cpu_ticks_2s"], "checksums_ok": True}


def play(scene):
    scene.network()
    scene.servers()
    scene.device()
    scene.sleep()
    scene.wake_job()
    scene.step = "shutdown"
    scene.stop()
    scene.say("6. monitor and servers stopped, network removed")
    return scene.final()


def main():
    return run_scene(__doc__, RelaysScene, play,
                     ("monitor", SUBSTITUTE, SLEEPER, "mediator", "cloud", "controller"), "duplex-demo-relays.")


if __name__ == "__main__":
    sys.exit(main())
