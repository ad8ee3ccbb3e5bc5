#!/usr/bin/env python3
"""Wake benchmark (`scripts/bench wake`, or a section of the full `scripts/bench`): a job for
a sleeping relay's device against the same job for an awake relay's, in the same run, and
the CPU a sleeping relay uses. Needs root, /dev/kvm, ip and nft.

The scene is the substitute-relay demo's (scripts/demo_relays.py): the device of
examples/device-with-relays.json (engine, controller, relay-a awake, relay-b sleeping after
3 s idle) under a monitor in the LAN namespace, `duplex-mediator` and `duplex-cloud`
(release builds) in the WAN.

1. Wake latency: BENCH_RUNS (default 5) pairs, interleaved: a job of 1 page (64x64, no
   document) for mfp-b while relay-b sleeps — the cloud's request, the mediator's
   WakeRelay to relay-a, relay-a's magic packet, the monitor's wake of relay-b, relay-b's
   new network stack, TLS login, TunnelRequest, dial, job — and, as the baseline, the same
   job for mfp-a, whose relay is awake with its session up. `timings_ms.total` of
   `duplex-cloud submit` (request to job done); also the request-to-wake time (the
   monitor's `woken_ms` minus the request).
2. CPU of a sleeping relay: relay-b's vCPU thread (guest and monitor time) over 10 s asleep,
   beside relay-a's (awake, idle but for its heartbeats) over the same 10 s. Goal: zero.

    sudo python3 scripts/bench_wake.py --json wake.json
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_common import figure  # noqa: E402
import demo_relay  # noqa: E402
from demo_relays import RelaysScene, SLEEPER, SUBSTITUTE, unix_ms  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
CPU_S = 10


def say(msg):
    print(f"  {msg}", flush=True)


class Bench(RelaysScene):
    def __init__(self, work, bin_dir):
        super().__init__(work, bin_dir)
        self.prefix = f"bw{os.getpid() % 100000:05d}"

    def job(self, device, seed):
        t0 = unix_ms()
        out, _ = self.run_json([self.exe("duplex-cloud"), "submit", "--device", device, "--pages", "1",
                                "--seed", str(seed), "--width", "64", "--height", "64", "--timeout-s", "120"],
                               180, side="wan")
        if out.get("state") != "done" or not out.get("checksums_ok"):
            self.fail(f"job for {device} did not finish well: {out}")
        return t0, out

    def wait_sleeping(self):
        t_end = time.monotonic() + 60
        while self.partition(SLEEPER)["state"] != "sleeping" or self.relay_state(SLEEPER).get("state") != "sleeping":
            if time.monotonic() > t_end:
                self.fail(f"{SLEEPER} did not go back to sleep")
            time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description="wake benchmark (scripts/bench wake)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    args = ap.parse_args()
    own = args.work is None
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="duplex-bench-wake."))
    os.makedirs(work, exist_ok=True)

    def on_signal(signum, _frame):
        raise demo_relay.Interrupted(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    b = Bench(work, os.path.abspath(args.bin))
    figures, status = [], 0
    try:
        b.network()
        b.servers()
        b.device()
        b.job("mfp-a", 1)  # warm-up: the first job of a cold device
        asleep, awake, wake = [], [], []
        for i in range(RUNS):
            b.wait_sleeping()
            t0, out = b.job("mfp-b", 100 + i)
            woken = (b.partition(SLEEPER).get("sleep") or {}).get("woken_ms")
            rec = b.mediator(f"/v1/tunnels/{out['tunnel_id']}")
            if (rec.get("wake") or {}).get("substitute") != SUBSTITUTE:
                b.fail(f"the job for mfp-b was not woken through {SUBSTITUTE}: {rec}")
            asleep.append(out["timings_ms"]["total"])
            wake.append(woken - t0)
            awake.append(b.job("mfp-a", 200 + i)[1]["timings_ms"]["total"])
            say(f"run {i + 1}: asleep {asleep[-1]} ms (woken {wake[-1]} ms after the request), awake {awake[-1]} ms")
        a50, w50, k50 = statistics.median(asleep), statistics.median(awake), statistics.median(wake)
        say(f"request to job done, relay asleep: median {a50:.0f} ms; relay awake (baseline): median {w50:.0f} ms "
            f"= {a50 / max(w50, 1):.2f} x; request to wake: median {k50:.0f} ms")
        base = {"label": "the same job for mfp-a, whose relay (relay-a) is awake, interleaved", "unit": "ms",
                "value": round(w50, 3)}
        figures += [
            figure("wake.job_asleep_median", "cloud request to job done, relay asleep (woken through a substitute)",
                   a50, "ms", f"median of {RUNS}", base, a50 / max(w50, 1), samples=asleep, baseline_samples=awake),
            figure("wake.request_to_wake_median", "cloud request to the sleeping relay woken (monitor's woken_ms)",
                   k50, "ms", f"median of {RUNS}", samples=wake),
        ]

        b.wait_sleeping()
        before = {n: b.vcpu_ticks(n) for n in (SLEEPER, SUBSTITUTE)}
        wakes = b.partition(SLEEPER)["sleep"]["wakes"]
        time.sleep(CPU_S)
        if b.partition(SLEEPER)["sleep"]["wakes"] != wakes or b.partition(SLEEPER)["state"] != "sleeping":
            b.fail(f"{SLEEPER} woke during the CPU measurement")
        used = {n: b.vcpu_ticks(n) - before[n] for n in before}
        tck = os.sysconf("SC_CLK_TCK")
        asleep_ms, awake_ms = used[SLEEPER] * 1000 / tck, used[SUBSTITUTE] * 1000 / tck
        say(f"vCPU thread CPU over {CPU_S} s: {SLEEPER} asleep {asleep_ms:.0f} ms; "
            f"{SUBSTITUTE} awake and idle (baseline) {awake_ms:.0f} ms")
        figures.append(figure(
            "wake.sleeping_relay_cpu", f"CPU of the sleeping relay's vCPU thread over {CPU_S} s", asleep_ms, "ms",
            f"one {CPU_S} s window (clock ticks of {1000 // tck} ms)",
            {"label": f"the awake, idle relay's vCPU thread over the same {CPU_S} s", "unit": "ms",
             "value": round(awake_ms, 3)},
            None, goal="0 ms"))
    except demo_relay.Failed as e:
        say(f"FAILED at {e.step}: {e.error}")
        for name in ("monitor", SUBSTITUTE, SLEEPER, "mediator", "cloud"):
            for ln in b.tail(name):
                say(f"  {name}: {ln}")
        status = 1
    finally:
        b.stop()
        if own and not os.environ.get("DUPLEX_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    if args.json and status == 0:
        with open(args.json, "w") as f:
            json.dump({"bench": "wake", "script": "scripts/bench_wake.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": RUNS, "figures": figures}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
